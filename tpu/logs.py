#!/usr/bin/env python3
"""Stream the log of a realm-jax job from worker N or from all workers (lines prefixed by worker).

Example: tpu/logs.py --job pretrain --worker 0 --project my-proj --zone us-central2-b \\
             --train-type v4-32
"""

from __future__ import annotations

import argparse
import sys

import _kit
import launch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = _kit.base_parser(__doc__)
  _kit.add_type_args(p)
  p.add_argument("--job", choices=launch.JOBS, default="pretrain",
                 help="whose log: pretrain/ict/finetune (trainer) or refresh (refresher)")
  p.add_argument("--worker", default="all", help="'all' (default) or a worker index")
  p.add_argument("--lines", type=int, default=100, help="lines of history to show first")
  p.add_argument("--no-follow", action="store_true", help="print the last lines and exit")
  return p.parse_args(argv)


def remote_tail(job: str, lines: int, follow: bool) -> str:
  """tail (-F) of the worker's own log, each line prefixed with [worker W]."""
  log = _kit.log_file(f"{job}-worker-$W.log")
  flags = f"-n {lines}" + (" -F" if follow else "")
  return "; ".join([_kit.WORKER_ID, f'tail {flags} {log} | sed -u "s/^/[worker $W] /"'])


def plan(args: argparse.Namespace) -> list[list[str]]:
  """The ssh command for the chosen worker(s), after checking the index against the slice."""
  t = _kit.target(args, launch.role_of(args.job))
  worker = _kit.check_worker(args.worker, t.acc)
  if args.lines < 0:
    raise _kit.KitError(f"--lines {args.lines} must be >= 0")
  return [_kit.ssh(t, remote_tail(args.job, args.lines, not args.no_follow), worker=worker)]


def main(argv: list[str] | None = None) -> int:
  """Validates the arguments, then prints (--dry-run) or runs the ssh command."""
  args = parse_args(argv)
  runner = _kit.Runner(args.dry_run)
  for cmd in plan(args):
    runner.run(cmd)
  return 0


if __name__ == "__main__":
  sys.exit(_kit.main_guard("logs.py", main))
