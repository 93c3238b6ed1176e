"""`realm-jax finetune`: Open-QA fine-tuning (query tower + ORQA reader) on a frozen index."""

from __future__ import annotations

import argparse

from realm_jax.cli.pretrain import add_run_flags, run_overrides


def register(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("finetune", help="Open-QA fine-tuning on a frozen index",
                     description="Fine-tune the query tower and the reader on question/answer pairs; the "
                     "document index is built once from the initial document tower (or the published one "
                     "is used) and stays frozen.")
  p.add_argument("--config", default="openqa_smoke",
                 help="named experiment (openqa_nq, openqa_wq, openqa_ct, openqa_smoke; default openqa_smoke) "
                 "or a .py/.json path")
  p.add_argument("--storage", required=True,
                 help="storage root with the corpus: gs://bucket/run, file:///path or a path")
  add_run_flags(p)
  p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                 help="override a config field, e.g. --set train_questions=nq-train.jsonl --set init=gs://b/pretrain")
  p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the root")
  p.add_argument("--index", default=None,
                 help="index version to retrieve from (default: the checkpoint's, else LATEST)")
  p.add_argument("--stop-after", type=int, default=None, help="run at most this many steps now")
  p.add_argument("--eval-out", default=None, help="with eval_questions set: write predictions JSONL here "
                 "(never an input; checked before training)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --eval-out file")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from realm_jax.cli.evaluate import print_summaries
  from realm_jax.cli.outputs import check_output
  from realm_jax.data.qa import load_questions
  from realm_jax.errors import ConfigError
  from realm_jax.openqa import evaluate as ev, loading
  from realm_jax.openqa.config import load_finetune_config
  from realm_jax.openqa.finetune import Finetuner

  if args.stop_after is not None and args.stop_after < 1:
    raise ConfigError(f"--stop-after must be >= 1 (steps to run now), got {args.stop_after}")
  cfg = load_finetune_config(args.config, run_overrides(args) + list(args.set))
  if args.eval_out:
    inputs = [q for q in (cfg.train_questions, cfg.eval_questions) if q]
    check_output(args.eval_out, inputs, overwrite=args.overwrite, flag="--eval-out")
  tuner = Finetuner(cfg, args.storage, resume=args.resume, stop_after=args.stop_after, index_version=args.index)
  result = tuner.run()
  print(f"realm-jax finetune: finished at step {result.step} (index {result.index_version})")
  if cfg.eval_questions:
    examples = load_questions(cfg.eval_questions)
    loaded = loading.load_index_rows(tuner.storage, result.index_version, tuner.tables, tuner.mesh)
    evaluator = ev.Evaluator(tuner.model, cfg.model, tuner.tables, loaded, tuner.mesh)
    preds, summary = evaluator.evaluate(examples, cfg.eval_questions)
    if args.eval_out:
      ev.write_predictions(args.eval_out, preds)
    print_summaries([summary])
  return 0
