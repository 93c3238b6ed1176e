"""`realm-jax pretrain` and `realm-jax ict`: REALM pre-training and the ICT warm start."""

from __future__ import annotations

import argparse


def _add(sub: argparse._SubParsersAction, name: str, help_text: str, task: str, default_config: str) -> None:
  p = sub.add_parser(name, help=help_text, description=help_text)
  p.add_argument("--config", default=default_config,
                 help=f"named experiment (realm_jax/experiments; default {default_config}) or a .py/.json path")
  p.add_argument("--storage", required=True, help="storage root URI: gs://bucket/run, file:///path or a path")
  p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the root")
  add_run_flags(p)
  p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                 help="override a config field, e.g. --set batch_size=64 --set model.marginal=span")
  p.add_argument("--synchronous-refresh", action="store_true",
                 help="stop, re-embed and continue every sync_refresh_every steps instead of an async refresher")
  p.add_argument("--stop-after", type=int, default=None, help="run at most this many steps now (no TRAINING_DONE)")
  p.set_defaults(func=lambda args: run(args, task))


def add_run_flags(p: argparse.ArgumentParser) -> None:
  """--corpus and --init, shorthands for --set corpus=URI / --set init=URI (pretrain, ict, finetune)."""
  p.add_argument("--corpus", default=None, metavar="URI",
                 help="the corpus's own URI, shared by runs (gs://bucket/corpora/wiki); default <storage>/corpus")
  p.add_argument("--init", default=None, metavar="URI",
                 help="starting weights: a weights directory, a run's storage root, minilm or random")


def run_overrides(args: argparse.Namespace) -> list[str]:
  """--corpus / --init as `key=value` overrides, before the --set ones (which win)."""
  out = [f"corpus={args.corpus}"] if args.corpus else []
  return out + ([f"init={args.init}"] if args.init else [])


def register(sub: argparse._SubParsersAction) -> None:
  _add(sub, "pretrain", "REALM pre-training with retrieval inside the step", "realm", "smoke")
  _add(sub, "ict", "Inverse Cloze Task warm start of the retriever (ORQA)", "ict", "ict_smoke")


def run(args: argparse.Namespace, task: str) -> int:
  from realm_jax.errors import ConfigError
  from realm_jax.train.config import load_config
  from realm_jax.train.trainer import Trainer

  if args.stop_after is not None and args.stop_after < 1:
    raise ConfigError(f"--stop-after must be >= 1 (steps to run now), got {args.stop_after}")
  overrides = run_overrides(args) + list(args.set)
  if args.synchronous_refresh:
    overrides.append("index_refresh=sync")
  cfg = load_config(args.config, overrides)
  if cfg.task != task:
    command = "ict" if cfg.task == "ict" else "pretrain"
    raise ConfigError(f"{args.config} is a {cfg.task!r} config; use `realm-jax {command}`")
  result = Trainer(cfg, args.storage, resume=args.resume, stop_after=args.stop_after).run()
  print(f"realm-jax {args.command}: finished at step {result.step}; index versions used: {len(result.index_versions)}",
        flush=True)
  return 0
