"""`realm-jax evaluate`: exact match and retrieval recall of a fine-tuned model on question sets."""

from __future__ import annotations

import argparse
import json
import pathlib


def register(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("evaluate", help="Exact match and recall@k of a fine-tuned Open-QA model",
                     description="Answer question sets in batches on the mesh; report exact match (SQuAD "
                     "normalisation; regex match for CuratedTrec) and recall@k of the retrieved blocks.")
  p.add_argument("--storage", required=True, help="fine-tuning storage root (corpus, index, checkpoints)")
  p.add_argument("--questions", action="extend", nargs="+", required=True, metavar="SET",
                 help="question sets: nq-test, wq-test, ct-test, nq-dev, trivia-test, ... or JSONL/TSV paths")
  p.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions of each set")
  p.add_argument("--out", default=None, help="predictions JSONL (one set) or a directory (<set>.jsonl per set); "
                 "never an input, checked before any work")
  p.add_argument("--overwrite", action="store_true", help="replace existing --out files")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--weights", default=None, help="converted weights (retriever + reader) instead of a checkpoint")
  p.add_argument("--index", default=None, help="index version (default: the one the model was fine-tuned with)")
  p.add_argument("--retrieval", choices=("device", "scann"), default="device",
                 help="device: exact MIPS over the index on the mesh (default); scann: the index version's "
                 "ScaNN searcher on the host (no accelerator needed for retrieval)")
  p.add_argument("--batch-size", type=int, default=64, help="questions per batch on the mesh")
  p.add_argument("--json", action="store_true", help="also print the summaries as JSON")
  p.set_defaults(func=run)


def _out_path(out: str, name: str, many: bool) -> str:
  path = pathlib.Path(out)
  if not many and path.suffix == ".jsonl":
    return str(path)
  return str(path / f"{short_name(name)}.jsonl")


def short_name(name: str) -> str:
  """A question set as a table shows it: its short name (`nq-test`), or a file's stem."""
  path = pathlib.Path(name)
  return path.stem if path.suffix or len(path.parts) > 1 else name


def plain_table(summaries, width: int = 80) -> str:
  """The summaries as plain text that fits `width` columns (logs, files, CI): one row per set."""
  ks = sorted({k for s in summaries for k in s.recall})
  heads = ["questions", "exact match"] + [f"recall@{k}" for k in ks] + ["q/s"]
  rows = [[str(s.num_questions), f"{100 * s.exact_match:.1f}"]
          + [f"{100 * s.recall[k]:.1f}" if k in s.recall else "-" for k in ks] + [f"{s.questions_per_second:.1f}"]
          for s in summaries]
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
  room = max(8, width - sum(w + 1 for w in widths))
  names = [short_name(s.name) for s in summaries]
  names = [n if len(n) <= room else n[:room - 1] + "~" for n in names]
  name_w = max(3, *(len(n) for n in names))

  def line(first: str, cells: list[str]) -> str:
    return " ".join([first.ljust(name_w)] + [c.rjust(w) for c, w in zip(cells, widths)])

  return "\n".join(["Open-QA evaluation (exact match and recall@k in %)", line("set", heads)]
                   + [line(n, r) for n, r in zip(names, rows)])


def print_summaries(summaries) -> None:
  """A rich table on a terminal, plain text (80 columns) when the output is a file or a pipe."""
  import sys

  if not sys.stdout.isatty():
    print(plain_table(summaries), flush=True)
    return
  from rich.console import Console
  from rich.table import Table

  ks = sorted({k for s in summaries for k in s.recall})
  table = Table(title="Open-QA evaluation")
  for col in ["set", "questions", "exact match"] + [f"recall@{k}" for k in ks] + ["questions/s"]:
    table.add_column(col, justify="left" if col == "set" else "right")
  for s in summaries:
    table.add_row(short_name(s.name), str(s.num_questions), f"{100 * s.exact_match:.1f}",
                  *[f"{100 * s.recall[k]:.1f}" if k in s.recall else "-" for k in ks], f"{s.questions_per_second:.1f}")
  Console().print(table)


def run(args: argparse.Namespace) -> int:
  from realm_jax.cli.outputs import check_output
  from realm_jax.data.qa import load_questions
  from realm_jax.errors import ConfigError
  from realm_jax.openqa import evaluate as ev
  from realm_jax.openqa.loading import load_for_answering

  if args.limit is not None and args.limit < 1:
    raise ConfigError(f"--limit must be >= 1, got {args.limit}")
  if args.batch_size < 1:
    raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
  outs = {}
  if args.out:  # before any work: a long evaluation must not end on an unusable path
    many = len(args.questions) > 1
    for name in args.questions:
      outs[name] = check_output(_out_path(args.out, name, many), args.questions, overwrite=args.overwrite,
                                flag="--out")
  sets = [(name, load_questions(name)[:args.limit]) for name in args.questions]  # fail fast on bad files
  setup = load_for_answering(args.storage, args.step, args.weights, args.index,
                             retrieval=args.retrieval)
  evaluator = ev.Evaluator(setup.finetuned.model, setup.finetuned.config, setup.tables, setup.index,
                           setup.mesh, batch_size=args.batch_size, searcher=setup.searcher)
  summaries = []
  for name, examples in sets:
    preds, summary = evaluator.evaluate(examples, name)
    summaries.append(summary)
    if name in outs:
      ev.write_predictions(str(outs[name]), preds)
  print_summaries(summaries)
  if args.json:
    print(json.dumps([s.to_dict() for s in summaries]))
  return 0
