"""`realm-jax refresh`: the index refresher, a separate process next to a trainer.

It shares only the storage root with the trainer: reads finalized checkpoints, publishes
`index/<version>/` and `index/LATEST`, and exits when the trainer writes TRAINING_DONE.
"""

from __future__ import annotations

import argparse
import logging


def register(sub: argparse._SubParsersAction) -> None:
  help_text = "Run the index refresher next to a trainer"
  p = sub.add_parser("refresh", help=help_text, description=help_text + ": re-embed the corpus "
                     "from the newest finalized checkpoint and publish index versions until "
                     "TRAINING_DONE appears.")
  p.add_argument("--storage", required=True, help="the trainer's storage root URI (gs://bucket/run, a path)")
  p.add_argument("--config", default="smoke", help="the trainer's experiment file or name (default smoke)")
  p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                 help="the trainer's config overrides (the model ones must match its checkpoints)")
  p.add_argument("--max-versions", type=int, default=None,
                 help="exit after publishing this many index versions")
  p.add_argument("--poll-seconds", type=float, default=5.0,
                 help="seconds between looks for a new checkpoint (default 5)")
  p.add_argument("--with-scann", action="store_true", help="also build and publish a ScaNN searcher")
  p.add_argument("--keep", type=int, default=None,
                 help="index versions to retain (default: the config's keep_index_versions)")
  p.add_argument("--embed-batch-size", type=int, default=256, help="blocks per embedding call (default 256)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="stored embedding dtype (default float32)")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from realm_jax.errors import ConfigError
  from realm_jax.refresh.refresher import Refresher, RefreshOptions
  from realm_jax.train.config import load_config

  logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
  logging.getLogger("realm_jax").setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on read-only managers
  for name, value in (("--max-versions", args.max_versions), ("--keep", args.keep),
                      ("--embed-batch-size", args.embed_batch_size)):
    if value is not None and value < 1:
      raise ConfigError(f"{name} must be >= 1, got {value}")
  if args.poll_seconds <= 0:
    raise ConfigError(f"--poll-seconds must be > 0, got {args.poll_seconds}")
  cfg = load_config(args.config, list(args.set))
  if cfg.task != "realm":
    raise ConfigError(f"{args.config} is a {cfg.task!r} config: only REALM pre-training retrieves "
                      "from an index, so there is nothing to refresh")
  options = RefreshOptions(max_versions=args.max_versions, poll_seconds=args.poll_seconds,
                           with_scann=args.with_scann, keep=args.keep,
                           embed_batch_size=args.embed_batch_size, dtype=args.dtype)
  result = Refresher(cfg, args.storage, options).run()
  print(f"realm-jax refresh: published {len(result.published)} index version(s), "
        f"{len(result.conflicts)} lost the publish race; stopped: {result.reason}", flush=True)
  return 0
