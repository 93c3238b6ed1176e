"""Placeholder for sub-commands whose issue has not landed yet."""

from __future__ import annotations

import argparse

from realm_jax.errors import RealmError


def register_placeholder(sub: argparse._SubParsersAction, name: str, help_text: str, issue: int) -> None:
  """Adds `name` to the CLI; running it says which issue brings it."""
  parser = sub.add_parser(name, help=f"{help_text} (not yet: issue {issue})")

  def run(args: argparse.Namespace) -> int:
    raise RealmError(f"`realm-jax {name}` is not implemented yet (issue {issue}).")

  parser.set_defaults(func=run)
