"""Entry point of the `realm-jax` console script (and of `python -m realm_jax`).

Each sub-command lives in its own module under `realm_jax.cli` and exposes
`register(subparsers)`, which adds its parser(s) and sets `func` to a callable taking the parsed
arguments and returning an exit code. Registering imports nothing heavy: a module imports JAX,
Flax or orbax inside its `run`, so `realm-jax --help` starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from realm_jax import host_memory, logs
from realm_jax.errors import RealmError

# Sub-command modules, in the order `--help` lists them (`pretrain` also registers `ict`,
# `convert` also `export`).
COMMANDS = ("demo", "forward", "corpus", "tokenizer", "data", "pretrain", "refresh", "finetune", "evaluate",
            "ask", "convert", "ship_log")


def build_parser() -> argparse.ArgumentParser:
  """The `realm-jax` parser with every sub-command registered."""
  from realm_jax import __version__

  log_level = argparse.ArgumentParser(add_help=False)
  log_level.add_argument("--log-level", choices=logs.LEVELS, default=argparse.SUPPRESS,
                         help="what realm-jax logs (default info; debug also shows the notes of "
                         "libraries such as orbax)")
  parser = argparse.ArgumentParser(
      prog="realm-jax", parents=[log_level],
      description="REALM retrieval-augmented pre-training in JAX: train, refresh the index, "
      "fine-tune for Open-QA, convert checkpoints.")
  parser.add_argument("--version", action="version", version=f"realm-jax {__version__}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name in COMMANDS:
    importlib.import_module(f"realm_jax.cli.{name}").register(sub)
  for command in sub.choices.values():  # `realm-jax pretrain --log-level debug ...` works too
    command.add_argument("--log-level", choices=logs.LEVELS, default=argparse.SUPPRESS,
                         help="what realm-jax logs (default info)")
  return parser


URI_ARGS = ("storage", "out", "data_dir", "weights", "path", "checkpoint", "eval_out", "workdir")


def check_uris(args: argparse.Namespace) -> None:
  """Refuses `memory://` roots: an in-process store (for tests of the library) whose data would
  vanish when the command exits."""
  for name in URI_ARGS:
    values = getattr(args, name, None)
    for value in values if isinstance(values, list) else [values]:
      if isinstance(value, str) and value.startswith("memory://"):
        raise RealmError(f"--{name.replace('_', '-')} {value}: memory:// is an in-process store for tests of "
                         "the library; its data vanishes when the command exits. Use a directory or gs://")


def main(argv: list[str] | None = None) -> int:
  """Runs one sub-command; a RealmError becomes one line `realm-jax <cmd>: error: ...` and exit 2."""
  if argv is None:  # the command itself, before any thread exists (`host_memory`)
    host_memory.keep_freed_memory()
  parser = build_parser()
  args = parser.parse_args(argv)
  if not getattr(args, "func", None):
    parser.print_help()
    return 0
  logs.configure(getattr(args, "log_level", "info"))
  try:
    check_uris(args)
    if os.environ.get("STORAGE_EMULATOR_HOST"):  # the CLI's way to an emulator: this one variable
      from realm_jax.storage import use_emulator
      use_emulator(os.environ["STORAGE_EMULATOR_HOST"])
    return int(args.func(args) or 0)
  except RealmError as e:
    print(f"realm-jax {args.command}: error: {e}", file=sys.stderr)
    return _leave(2, argv is None)
  except KeyboardInterrupt:
    print(f"realm-jax {args.command}: interrupted", file=sys.stderr)
    return _leave(130, argv is None)


def _leave(code: int, command: bool) -> int:
  """`code`, or for the command itself (not a caller in Python) an immediate exit with `code`: the
  command has finished its own clean-up (its `finally` blocks closed checkpoints and metrics), and
  interpreter finalisation with native threads still running (XLA, grain, tensorstore callbacks of
  a failed checkpoint write) can print a hundred tracebacks or segfault after the error line."""
  if command:
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  return code

if __name__ == "__main__":
  sys.exit(main())
