#!/usr/bin/env python3
"""Launch realm-jax jobs on every worker at once, in the background, with one log per worker.

  pretrain | ict | finetune   run on all workers of the trainer slice (NAME-train)
  refresh                     runs on all workers of the refresher (NAME-refresh)
  stop JOB | status JOB       stop a job / print `realm-status WORKER JOB STATE` per worker

Each worker runs `~/realm-venv/bin/realm-jax JOB ...` from ~/realm-jax under setsid+nohup;
output goes to ~/realm-jax-logs/JOB-worker-W.log, the pid to JOB.pid, the exit code to JOB.exit.
The code calls jax.distributed.initialize() itself: every worker runs the same command.

Example: tpu/launch.py pretrain --project my-proj --zone us-central2-b --train-type v4-32 \\
             --config experiments/realm_v4_32.py --storage gs://my-bucket/run1 --dry-run
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys

import _kit

JOBS = ("pretrain", "ict", "finetune", "refresh")
PAPER_BATCH = 512
_SET = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=.*$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=.*$")


def role_of(job: str) -> str:
  """The TPU a job runs on: the refresher for refresh, the trainer otherwise."""
  return "refresh" if job == "refresh" else "train"


# ---------------------------------------------------------------------------------------------
# Worker-side shell.
# ---------------------------------------------------------------------------------------------


def remote_start(job: str, job_args: list[str], env: list[str] = ()) -> str:
  """Starts `realm-jax JOB job_args` detached; refuses if the job already runs on the worker."""
  pid, done = _kit.log_file(f"{job}.pid"), _kit.log_file(f"{job}.exit")
  log = _kit.log_file(f"{job}-worker-$W.log")
  program = _kit.home(f"{_kit.VENV_DIR}/bin/realm-jax")
  inner = " ".join(["env", *map(shlex.quote, env)] if env else [])
  inner = f"{inner} {program} {shlex.join([job, *job_args])}; echo $? > {done}".lstrip()
  return "; ".join([
      f"mkdir -p {_kit.home(_kit.LOG_DIR)}",
      _kit.WORKER_ID,
      f'if [ -f {pid} ] && kill -0 -- "-$(cat {pid})" 2>/dev/null; then echo "worker $W: '
      f'realm-jax {job} is already running (pid $(cat {pid})): stop it first" >&2; exit 3; fi',
      f"rm -f {done}",
      f'cd {_kit.home(_kit.SRC_DIR)} || {{ echo "worker $W: no ~/{_kit.SRC_DIR}: run '
      'tpu/install.py first" >&2; exit 4; }',
      f"setsid nohup bash -c {shlex.quote(inner)} > {log} 2>&1 < /dev/null & echo $! > {pid}",
      f'echo "worker $W: started realm-jax {job} (pid $(cat {pid})), log '
      f'~/{_kit.LOG_DIR}/{job}-worker-$W.log"',
  ])


def remote_stop(job: str, grace_s: int = 60) -> str:
  """TERM the job's process group, wait up to grace_s, then KILL; fine if nothing runs."""
  pid = _kit.log_file(f"{job}.pid")
  group = f'-- "-$(cat {pid})"'
  return "; ".join([
      _kit.WORKER_ID,
      f"if [ -f {pid} ] && kill -0 {group} 2>/dev/null; then kill -TERM {group}; "
      f"for i in $(seq {grace_s}); do kill -0 {group} 2>/dev/null || break; sleep 1; done; "
      f"kill -KILL {group} 2>/dev/null; echo \"worker $W: stopped realm-jax {job}\"; "
      f"else echo \"worker $W: realm-jax {job} is not running\"; fi",
      "true",
  ])


def remote_status(job: str) -> str:
  """Prints `realm-status W JOB RUNNING|EXITED <code>|ABSENT` on each worker."""
  pid, done = _kit.log_file(f"{job}.pid"), _kit.log_file(f"{job}.exit")
  return "; ".join([
      _kit.WORKER_ID,
      f'if [ -f {done} ]; then S="EXITED $(cat {done})"; '
      f'elif [ -f {pid} ] && kill -0 -- "-$(cat {pid})" 2>/dev/null; then S=RUNNING; '
      "else S=ABSENT; fi",
      f'echo "realm-status $W {job} $S"',
  ])


# ---------------------------------------------------------------------------------------------
# Arguments.
# ---------------------------------------------------------------------------------------------


def job_args(job: str, config: str, storage: str, resume: bool = False, sets: list[str] = (),
             init: str | None = None) -> list[str]:
  """The realm-jax command line after the sub-command name."""
  out = ["--config", config, "--storage", storage]
  if init:
    out += ["--init", init]
  if resume:
    out.append("--resume")
  if sets:
    out += ["--set", *sets]
  return out


def check_job_flags(args: argparse.Namespace, t: _kit.Target) -> tuple[str, str | None]:
  """Validates --config/--storage/--set/--env/--init; returns (storage, init)."""
  if not args.config:
    raise _kit.KitError(f"missing --config for {args.job} (e.g. experiments/realm_base.py)")
  if not args.config.endswith(".py"):
    raise _kit.KitError(f"--config {args.config!r} should be a Python config file (*.py)")
  if not os.path.isabs(args.config) and not (_kit.REPO_ROOT / args.config).exists():
    _kit.note(f"{args.config} is not in this checkout; it must exist in ~/{_kit.SRC_DIR} on the "
              "workers (install.py ships the checkout's files)")
  storage = _kit.check_storage(args.storage, t.acc, t.role)
  for item in args.set or ():
    if not _SET.match(item):
      raise _kit.KitError(f"bad --set {item!r}: expected key=value")
  for item in args.env or ():
    if not _ENV.match(item):
      raise _kit.KitError(f"bad --env {item!r}: expected NAME=value")
  init = None
  if args.job == "finetune":
    if not args.init:
      raise _kit.KitError("finetune needs --init gs://... (the pre-trained checkpoint)")
    init = _kit.check_storage(args.init, t.acc, t.role, flag="--init")
  elif getattr(args, "init", None):
    raise _kit.KitError(f"--init is only for finetune, not {args.job}")
  return storage, init


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Sub-commands pretrain/ict/finetune/refresh/stop/status sharing the common flags."""
  common = argparse.ArgumentParser(add_help=False)
  _kit.add_common_args(common)
  _kit.add_type_args(common)
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="job", required=True, metavar="JOB")
  for job in JOBS:
    s = sub.add_parser(job, parents=[common], help=f"start realm-jax {job} on all workers")
    s.add_argument("--config", help="experiment config, relative to the checkout root")
    s.add_argument("--storage", default=os.environ.get("REALM_STORAGE"),
                   help="storage root gs://BUCKET/RUN (env REALM_STORAGE)")
    if job != "refresh":
      s.add_argument("--resume", action="store_true",
                     help="resume from the last checkpoint under --storage")
    s.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="config overrides")
    s.add_argument("--env", action="append", metavar="NAME=VALUE",
                   help="environment variable for the job (repeatable)")
    if job == "finetune":
      s.add_argument("--init", help="pre-trained checkpoint to start from (gs://...)")
  for action in ("stop", "status"):
    s = sub.add_parser(action, parents=[common], help=f"{action} a job on all workers")
    s.add_argument("target_job", choices=JOBS, metavar="JOB", help=" | ".join(JOBS))
    if action == "stop":
      s.add_argument("--grace", type=int, default=60, help="seconds between TERM and KILL")
  return p.parse_args(argv)


def plan(args: argparse.Namespace) -> list[list[str]]:
  """The one ssh --worker=all command that starts, stops or queries the job."""
  if args.job in ("stop", "status"):
    t = _kit.target(args, role_of(args.target_job))
    if args.job == "stop":
      if args.grace < 0:
        raise _kit.KitError(f"--grace {args.grace} must be >= 0")
      return [_kit.ssh(t, remote_stop(args.target_job, args.grace))]
    return [_kit.ssh(t, remote_status(args.target_job))]
  t = _kit.target(args, role_of(args.job))
  storage, init = check_job_flags(args, t)
  devices = t.acc.devices
  per_device = (f"{PAPER_BATCH // devices} per device" if PAPER_BATCH % devices == 0
                else f"not divisible by {devices} devices")
  _kit.note(f"{args.job} on {t.node}: {t.acc.describe()}; the paper's batch {PAPER_BATCH} -> "
            f"{per_device}")
  jargs = job_args(args.job, args.config, storage, getattr(args, "resume", False),
                   args.set or (), init)
  return [_kit.ssh(t, remote_start(args.job, jargs, args.env or ()))]


def main(argv: list[str] | None = None) -> int:
  """Validates the arguments, then prints (--dry-run) or runs the ssh command."""
  args = parse_args(argv)
  runner = _kit.Runner(args.dry_run)
  for cmd in plan(args):
    runner.run(cmd)
  return 0


if __name__ == "__main__":
  sys.exit(_kit.main_guard("launch.py", main))
