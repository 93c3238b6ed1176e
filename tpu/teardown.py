#!/usr/bin/env python3
"""Delete the trainer and refresher TPUs (queued resources with their nodes), and optionally the
run's storage prefix gs://BUCKET/RUN after an explicit confirmation.

Example: tpu/teardown.py --project my-proj --zone us-central2-b --train-type v4-32 \\
             --refresh-type v4-8 --delete-storage --storage gs://my-bucket/run1 --dry-run
"""

from __future__ import annotations

import argparse
import os
import sys

import _kit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = _kit.base_parser(__doc__)
  _kit.add_type_args(p)
  p.add_argument("--role", choices=("both", "train", "refresh"), default="both",
                 help="which TPU(s) to delete (default both; without --refresh-type: train)")
  p.add_argument("--delete-storage", action="store_true",
                 help="also delete every object under --storage (asks for confirmation)")
  p.add_argument("--storage", default=os.environ.get("REALM_STORAGE"),
                 help="the run's storage root gs://BUCKET/RUN (env REALM_STORAGE)")
  p.add_argument("--confirm", metavar="URI",
                 help="confirm --delete-storage without a prompt: must repeat the --storage URI")
  return p.parse_args(argv)


def check_storage_deletion(args: argparse.Namespace) -> str:
  """The URI to delete, after checks: gs:// with a run prefix, confirmed by the user."""
  uri = (args.storage or "").rstrip("/")
  if not uri:
    raise _kit.KitError("--delete-storage needs --storage gs://BUCKET/RUN")
  if not uri.startswith("gs://"):
    raise _kit.KitError(f"--delete-storage only deletes gs:// prefixes, not {uri!r}")
  bucket, _, prefix = uri[len("gs://"):].partition("/")
  if not bucket or not prefix:
    raise _kit.KitError(f"refusing to delete {uri!r}: it names a whole bucket, not gs://BUCKET/RUN")
  if args.dry_run:
    return uri
  if args.confirm is not None:
    if args.confirm.rstrip("/") != uri:
      raise _kit.KitError(f"--confirm {args.confirm!r} does not match --storage {uri!r}")
    return uri
  if not sys.stdin.isatty():
    raise _kit.KitError(f"deleting {uri} needs confirmation: pass --confirm {uri} "
                        "(stdin is not a terminal)")
  answer = input(f"Delete every object under {uri}? Type the URI to confirm: ").strip()
  if answer.rstrip("/") != uri:
    raise _kit.KitError(f"not confirmed ({answer!r} != {uri!r}); nothing deleted")
  return uri


def plan(args: argparse.Namespace) -> list[list[str]]:
  """Queued-resource deletions, then (confirmed) the storage prefix deletion."""
  roles = ["train", "refresh"] if args.role == "both" else [args.role]
  if args.role == "both" and not args.refresh_type:
    roles = ["train"]
  targets = [_kit.target(args, role) for role in roles]
  uri = check_storage_deletion(args) if args.delete_storage else None
  cmds = [_kit.qr_delete(t) for t in targets]
  if uri:
    cmds.append(_kit.storage_rm(uri))
  return cmds


def main(argv: list[str] | None = None) -> int:
  """Validates and confirms everything, then prints (--dry-run) or runs the deletions."""
  args = parse_args(argv)
  runner = _kit.Runner(args.dry_run)
  for cmd in plan(args):  # every check (and the confirmation) happens before the first command
    runner.run(cmd)
  return 0


if __name__ == "__main__":
  sys.exit(_kit.main_guard("teardown.py", main))
