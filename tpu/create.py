#!/usr/bin/env python3
"""Create the trainer slice and the refresher slice/VM as Cloud TPU queued resources.

Example (prints the commands only):
  tpu/create.py --project my-proj --zone us-central2-b --train-type v4-32 \\
      --refresh-type v4-8 --provisioning spot --dry-run
"""

from __future__ import annotations

import argparse
import sys

import _kit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = _kit.base_parser(__doc__)
  _kit.add_type_args(p)
  p.add_argument("--role", choices=("both", "train", "refresh"), default="both",
                 help="which TPU(s) to create (default both; 'both' without --refresh-type "
                 "creates only the trainer)")
  p.add_argument("--provisioning", choices=_kit.PROVISIONING, default="on-demand",
                 help="trainer capacity: on-demand, spot (preemptible, cheap) or reserved")
  p.add_argument("--refresh-provisioning", choices=_kit.PROVISIONING, default=None,
                 help="refresher capacity (default: same as --provisioning)")
  _kit.add_create_args(p)
  return p.parse_args(argv)


def plan(args: argparse.Namespace) -> list[list[str]]:
  """The queued-resource create commands for the requested roles."""
  roles = ["train", "refresh"] if args.role == "both" else [args.role]
  if args.role == "both" and not args.refresh_type:
    _kit.note("no --refresh-type: creating the trainer only (REALM pre-training needs a refresher)")
    roles = ["train"]
  extra = _kit.create_flags(args)
  cmds = []
  for role in roles:
    t = _kit.target(args, role)
    prov = args.provisioning if role == "train" else (args.refresh_provisioning or args.provisioning)
    _kit.note(f"{role}: node {t.node} ({t.acc.describe()}), {prov}")
    cmds.append(_kit.qr_create(t, prov, args.runtime_version, extra))
  return cmds


def main(argv: list[str] | None = None) -> int:
  """Validates the arguments, then prints (--dry-run) or runs the create commands."""
  args = parse_args(argv)
  runner = _kit.Runner(args.dry_run)
  for cmd in plan(args):
    runner.run(cmd)
  if not args.dry_run:
    _kit.note("queued; watch the state with: gcloud compute tpus queued-resources list "
              f"--zone={args.zone} --project={args.project}")
  return 0


if __name__ == "__main__":
  sys.exit(_kit.main_guard("create.py", main))
