"""`realm-jax refresh`: the index refresher, a separate process next to a trainer.

It shares only the storage root with the trainer: reads finalized checkpoints (and the config the
trainer stored in them), publishes `index/<version>/` and `index/LATEST`, and exits when the
trainer writes TRAINING_DONE.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
  help_text = "Run the index refresher next to a trainer"
  p = sub.add_parser("refresh", help=help_text, description=help_text + ": re-embed the corpus "
                     "from the newest finalized checkpoint and publish index versions until "
                     "TRAINING_DONE appears. The model, corpus and retention are the trainer's, read "
                     "from its checkpoints.")
  p.add_argument("--storage", required=True, help="the trainer's storage root URI (gs://bucket/run, a path)")
  p.add_argument("--config", default=None,
                 help="optional: the trainer's experiment (name, .py or .json); checked against the "
                      "config stored in its checkpoints, a contradicting field is an error")
  p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                 help="optional: the trainer's overrides, checked the same way")
  p.add_argument("--max-versions", type=int, default=None,
                 help="exit after publishing this many index versions")
  p.add_argument("--poll-seconds", type=float, default=5.0,
                 help="seconds between looks for a new checkpoint (default 5)")
  p.add_argument("--no-scann", action="store_true",
                 help="publish embeddings only (by default every version carries a ScaNN searcher)")
  p.add_argument("--keep", type=int, default=None,
                 help="index versions to retain (default: the trainer's keep_index_versions)")
  p.add_argument("--embed-batch-size", type=int, default=256, help="blocks per embedding call (default 256)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="stored embedding dtype (default float32)")
  p.set_defaults(func=run)


def refresher(args: argparse.Namespace, storage=None):
  """The `Refresher` these arguments describe, on `storage` (a `Storage`) or else `--storage`."""
  from realm_jax.errors import ConfigError
  from realm_jax.refresh.refresher import Refresher, RefreshOptions
  from realm_jax.train.config import load_config

  for name, value in (("--max-versions", args.max_versions), ("--keep", args.keep),
                      ("--embed-batch-size", args.embed_batch_size)):
    if value is not None and value < 1:
      raise ConfigError(f"{name} must be >= 1, got {value}")
  if args.poll_seconds <= 0:
    raise ConfigError(f"--poll-seconds must be > 0, got {args.poll_seconds}")
  claimed = load_config(args.config, list(args.set)) if args.config else None
  options = RefreshOptions(max_versions=args.max_versions, poll_seconds=args.poll_seconds,
                           with_scann=not args.no_scann, keep=args.keep,
                           embed_batch_size=args.embed_batch_size, dtype=args.dtype)
  return Refresher(storage or args.storage, options, config=claimed, overrides=[] if claimed else list(args.set))


def run(args: argparse.Namespace, storage=None) -> int:
  """Refreshes until TRAINING_DONE (or --max-versions); `storage` as in `refresher`."""
  result = refresher(args, storage).run()
  print(f"realm-jax refresh: published {len(result.published)} index version(s), "
        f"{len(result.conflicts)} lost the publish race; stopped: {result.reason}", flush=True)
  return 0
