"""Entry point of the `realm-jax` console script.

Each sub-command lives in its own module under `realm_jax.cli` and exposes
`register(subparsers)`, which adds its parser and sets `func` to a callable
taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from realm_jax.errors import RealmError

# (module, sub-command) in the order `--help` lists them.
COMMANDS = [
    ("demo", "demo"),
    ("forward", "forward"),
    ("corpus", "corpus"),
    ("tokenizer", "tokenizer"),
    ("data", "data"),
    ("pretrain", "pretrain"),
    ("pretrain", "ict"),
    ("refresh", "refresh"),
    ("finetune", "finetune"),
    ("evaluate", "evaluate"),
    ("ask", "ask"),
    ("convert", "convert"),
    ("convert", "export"),
]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="realm-jax",
      description="REALM retrieval-augmented pre-training in JAX: train, refresh the index, "
      "fine-tune for Open-QA, convert checkpoints.",
  )
  from realm_jax import __version__

  parser.add_argument("--version", action="version", version=f"realm-jax {__version__}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  registered = set()
  for module_name, _ in COMMANDS:
    if module_name in registered:
      continue
    registered.add(module_name)
    module = importlib.import_module(f"realm_jax.cli.{module_name}")
    module.register(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if not getattr(args, "func", None):
    parser.print_help()
    return 0
  try:
    return int(args.func(args) or 0)
  except RealmError as e:
    print(f"realm-jax {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"realm-jax {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
