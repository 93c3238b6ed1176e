"""`realm-jax demo`: the whole REALM loop on real Wikipedia text on this machine (CPU).

Corpus from the Wikipedia excerpt in the gensim wheel, MiniLM towers, the index refresher as a
second process while REALM pre-trains, then Open-QA fine-tuning and evaluation on real
questions the excerpt answers; prints a summary table and writes a PNG of the curves.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

from realm_jax.errors import RealmError

MARKER = ".realm-jax-demo"  # in every work directory the demo made: only those does --fresh delete


def prepare_workdir(workdir: pathlib.Path, fresh: bool) -> None:
  """Creates the work directory (marked as the demo's), or with `fresh` empties one the demo made;
  refuses to delete a directory without the marker, and a path that is not a directory."""
  marker = workdir / MARKER
  if workdir.exists() and not workdir.is_dir():
    raise RealmError(f"--workdir {workdir}: exists and is not a directory")
  if fresh and workdir.exists():
    if not marker.is_file():
      raise RealmError(f"--workdir {workdir}: not created by realm-jax demo (no {MARKER} in it), so --fresh "
                       "will not delete it; remove it yourself or choose another --workdir")
    shutil.rmtree(workdir)
  try:
    fresh_dir = not workdir.exists() or not any(workdir.iterdir())
    workdir.mkdir(parents=True, exist_ok=True)
    if fresh_dir or (workdir / "recipe.json").is_file():  # new, empty, or a demo run from before the marker
      marker.write_text("created by `realm-jax demo`; `realm-jax demo --fresh` may delete this directory\n")
  except OSError as e:
    raise RealmError(f"--workdir {workdir}: cannot create or write it ({e.strerror})") from None


def register(sub: argparse._SubParsersAction) -> None:
  help_text = "Run the whole REALM loop on real Wikipedia text on this machine"
  p = sub.add_parser("demo", help=help_text, description=help_text + " (meant to take under 15 minutes on 2 CPU cores; "
                     "every stage is cached, so running it again resumes where it stopped).")
  p.add_argument("--workdir", default=None,
                 help="where the run lives (storage roots, logs, summary); default: "
                      "$REALM_JAX_CACHE/demo (or demo-quick), i.e. ~/.cache/realm-jax/demo")
  p.add_argument("--quick", action="store_true",
                 help="tiny random towers and a small corpus: checks the whole loop in about a minute "
                      "(the numbers mean nothing)")
  p.add_argument("--fresh", action="store_true",
                 help="delete the work directory first (only one the demo created; others are refused)")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of every model initialisation and data order (the question split stays fixed); "
                      "default 0. A seed other than 0 has its own default work directory")
  p.add_argument("--verbose", action="store_true", help="print every log line of the trainer")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  import logging

  from rich.markup import escape

  from realm_jax.data import sources
  from realm_jax.data.corpus import CorpusReader
  from realm_jax.demo import report
  from realm_jax.demo.pipeline import Demo
  from realm_jax.demo.recipe import RECIPES
  from realm_jax.demo.ui import ConsoleUI
  from realm_jax.parallel import initialize_distributed
  from realm_jax.storage import Storage

  initialize_distributed("demo", multi_process=False)  # the demo's stages share this one process

  if getattr(args, "log_level", None) is None:  # the console UI shows the run's lines itself
    logging.getLogger("realm_jax").setLevel(logging.WARNING)
    logging.getLogger("realm_jax.openqa").setLevel(logging.ERROR)  # long trivia questions get truncated
  import dataclasses

  if args.seed < 0:
    raise RealmError(f"--seed must be >= 0, got {args.seed}")
  recipe = dataclasses.replace(RECIPES["quick" if args.quick else "full"](), seed=args.seed)
  default = ("demo-quick" if args.quick else "demo") + (f"-seed{args.seed}" if args.seed else "")
  workdir = pathlib.Path(args.workdir) if args.workdir else sources.cache_dir() / default
  prepare_workdir(workdir, args.fresh)
  ui = ConsoleUI(verbose=args.verbose)
  ui.console.print(f"[bold]realm-jax demo[/bold] ({recipe.name} recipe, seed {recipe.seed}) in {workdir}")
  demo = Demo(workdir, recipe, ui)
  try:
    results = demo.run()
  except KeyboardInterrupt:
    ui.console.print("\n[yellow]interrupted[/yellow]: the refresher was stopped and every finished stage and "
                     "checkpoint is kept; run the same command again to resume.")
    return 130

  metrics = demo.metrics_rows("realm")
  control_metrics = demo.metrics_rows("realm", demo.control_root) if "control" in results else []
  summary = report.summarize(results, metrics, control_metrics, recipe.seed)
  (workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  (workdir / "summary.md").write_text(report.markdown(summary))
  png = workdir / "curves.png"
  report.plot(metrics, control_metrics, results, png)
  ui.console.print()
  ui.console.print(report.table(summary))
  ui.console.print(f"curves and recall over time: {png}")

  blocks = CorpusReader(Storage.open(demo.openqa_root))
  ui.console.rule("[bold]Sample held-out questions (the first 4 of the held-out set)")
  for p in report.sample_answers(workdir):
    text = blocks.get_blocks([p["block_id"]])[0].text
    mark = "[green]correct[/green]" if p["correct"] else "[red]wrong[/red]"
    ui.console.print(f"Q: {escape(p['question'])}\n   A: [bold]{escape(p['answer'] or '(no answer)')}[/bold] "
                     f"({mark}; reference: {escape(p['answers'][0])})\n   evidence (\"{escape(p['title'])}\", "
                     f"retrieved #{p['block_rank']}): {escape(report.evidence(text, p['span_chars']))}",
                     soft_wrap=True)
  return 0
