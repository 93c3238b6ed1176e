"""`realm-jax evaluate`: exact match and retrieval recall of a fine-tuned model on question sets."""

from __future__ import annotations

import argparse
import json
import logging
import pathlib


def register(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("evaluate", help="exact match and recall@k of a fine-tuned Open-QA model",
                     description="Answer question sets in batches on the mesh; report exact match (SQuAD "
                     "normalisation; regex match for CuratedTrec) and recall@k of the retrieved blocks.")
  p.add_argument("--storage", required=True, help="fine-tuning storage root (corpus, index, checkpoints)")
  p.add_argument("--questions", action="extend", nargs="+", required=True, metavar="SET",
                 help="question sets: nq-test, wq-test, ct-test, nq-dev, trivia-test, ... or JSONL/TSV paths")
  p.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions of each set")
  p.add_argument("--out", default=None, help="predictions JSONL (one set) or a directory (<set>.jsonl per set)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--weights", default=None, help="converted weights (retriever + reader) instead of a checkpoint")
  p.add_argument("--index", default=None, help="index version (default: the one the model was fine-tuned with)")
  p.add_argument("--batch-size", type=int, default=64, help="questions per batch on the mesh")
  p.add_argument("--json", action="store_true", help="also print the summaries as JSON")
  p.set_defaults(func=run)


def _out_path(out: str, name: str, many: bool) -> str:
  path = pathlib.Path(out)
  if not many and path.suffix == ".jsonl":
    return str(path)
  return str(path / f"{pathlib.Path(name).stem if pathlib.Path(name).suffix else name}.jsonl")


def run(args: argparse.Namespace) -> int:
  from rich.console import Console

  from realm_jax.data.qa import load_questions
  from realm_jax.errors import ConfigError
  from realm_jax.openqa import evaluate as ev
  from realm_jax.openqa.loading import load_for_answering

  logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
  if args.limit is not None and args.limit < 1:
    raise ConfigError(f"--limit must be >= 1, got {args.limit}")
  sets = [(name, load_questions(name)[:args.limit]) for name in args.questions]  # fail fast on bad files
  setup = load_for_answering(args.storage, args.step, args.weights, args.index)
  evaluator = ev.Evaluator(setup.finetuned.model, setup.finetuned.config, setup.tables, setup.index.embeddings,
                           setup.mesh, batch_size=args.batch_size)
  summaries = []
  for name, examples in sets:
    preds, summary = evaluator.evaluate(examples, name)
    summaries.append(summary)
    if args.out:
      ev.write_predictions(_out_path(args.out, name, len(sets) > 1), preds)
  Console().print(ev.summary_table(summaries))
  if args.json:
    print(json.dumps([s.to_dict() for s in summaries]))
  return 0
