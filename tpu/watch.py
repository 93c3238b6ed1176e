#!/usr/bin/env python3
"""Watch the trainer (and refresher) TPUs and bring the run back after a preemption.

Every --interval seconds, for at most --max-polls polls, for each watched TPU:
  * queued resource SUSPENDED or FAILED (a Spot preemption) or gone: delete it, create it again;
  * once it is ACTIVE again: install the project and relaunch the job (the trainer with
    --resume, so it continues from the last checkpoint under --storage);
  * ACTIVE but the job died on a worker for --unhealthy-polls polls in a row: stop it on all
    workers and relaunch it the same way;
  * the job exited 0 on every worker: that TPU is done. The watch ends when all are done.
`--dry-run` prints the commands of one pass of the loop, each branch under a `#` comment.

Example: tpu/watch.py --project my-proj --zone us-central2-b --train-type v4-32 --refresh-type v4-8 \\
             --provisioning spot --config experiments/realm_v4_32.py --storage gs://b/run1 --dry-run
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import sys
import time

import _kit
import install
import launch

_STATUS = re.compile(r"realm-status (\S+) (\S+) (RUNNING|ABSENT|EXITED (-?\d+))")
PREEMPTED = ("SUSPENDED", "SUSPENDING", "FAILED")


class GiveUp(_kit.KitError):
  """The watch stops: too many relaunches, or polls exhausted."""


@dataclasses.dataclass
class Watched:
  """One TPU under watch: its target, job, start command and bookkeeping."""

  target: _kit.Target
  job: str
  provisioning: str
  start: list[str]          # ssh command that starts the job (with --resume for the trainer)
  create: list[str]         # queued-resources create, used after a preemption
  unhealthy: int = 0
  needs_install: bool = False
  done: bool = False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Trainer job and config, re-creation options, install source and the loop's bounds."""
  p = _kit.base_parser(__doc__)
  _kit.add_type_args(p)
  p.add_argument("--job", choices=("pretrain", "ict"), default="pretrain", help="trainer job")
  p.add_argument("--config", help="trainer config (the refresher gets --refresh-config)")
  p.add_argument("--refresh-config", help="refresher config (default: --config)")
  p.add_argument("--storage", default=os.environ.get("REALM_STORAGE"),
                 help="storage root gs://BUCKET/RUN (env REALM_STORAGE)")
  p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="trainer config overrides")
  p.add_argument("--env", action="append", metavar="NAME=VALUE", help="job environment")
  p.add_argument("--no-refresher", action="store_true",
                 help="watch only the trainer even if --refresh-type is set (ict never watches "
                 "the refresher: it retrieves in-batch, without an index)")
  p.add_argument("--provisioning", choices=_kit.PROVISIONING, default="spot",
                 help="trainer capacity used when re-creating (default spot)")
  p.add_argument("--refresh-provisioning", choices=_kit.PROVISIONING, default=None,
                 help="refresher capacity when re-creating (default: --provisioning)")
  _kit.add_create_args(p)
  p.add_argument("--install-from", choices=("checkout", "pypi"), default="checkout",
                 help="how install.py reinstalls a re-created TPU")
  p.add_argument("--package", default="realm-jax[tpu]", help="pip requirement for pypi installs")
  p.add_argument("--staging-dir", default=os.path.join("/tmp", "realm-jax-dist"),
                 help="local folder for the source tarball")
  p.add_argument("--interval", type=float, default=300.0, help="seconds between polls")
  p.add_argument("--max-polls", type=int, default=2000, help="stop watching after this many")
  p.add_argument("--max-relaunches", type=int, default=20,
                 help="give up after this many re-creations/relaunches in total")
  p.add_argument("--unhealthy-polls", type=int, default=2,
                 help="polls in a row a job must look dead before it is relaunched")
  return p.parse_args(argv)


def check_bounds(args: argparse.Namespace) -> None:
  """The loop must be bounded: positive polls, relaunches and unhealthy-poll threshold."""
  if args.interval < 0:
    raise _kit.KitError(f"--interval {args.interval} must be >= 0")
  for flag in ("max_polls", "max_relaunches", "unhealthy_polls"):
    value = getattr(args, flag)
    if value < 1:
      raise _kit.KitError(f"--{flag.replace('_', '-')} {value} must be >= 1")


def build(args: argparse.Namespace) -> list[Watched]:
  """Validates everything up front and prepares the start command of each watched TPU."""
  check_bounds(args)
  watched = []
  t = _kit.target(args, "train")
  ns = argparse.Namespace(job=args.job, config=args.config, storage=args.storage, set=args.set,
                          env=args.env)
  storage, _ = launch.check_job_flags(ns, t)
  jargs = launch.job_args(args.job, args.config, storage, resume=True, sets=args.set or ())
  start = _kit.ssh(t, launch.remote_start(args.job, jargs, args.env or ()))
  create_flags = _kit.create_flags(args)
  watched.append(Watched(t, args.job, args.provisioning, start,
                         _kit.qr_create(t, args.provisioning, args.runtime_version, create_flags)))
  if args.refresh_type and not args.no_refresher and args.job == "pretrain":
    r = _kit.target(args, "refresh")
    config = args.refresh_config or args.config
    ns = argparse.Namespace(job="refresh", config=config, storage=args.storage, set=None,
                            env=args.env)
    storage, _ = launch.check_job_flags(ns, r)
    start = _kit.ssh(r, launch.remote_start("refresh", launch.job_args("refresh", config, storage),
                                            args.env or ()))
    provisioning = args.refresh_provisioning or args.provisioning
    watched.append(Watched(r, "refresh", provisioning, start,
                           _kit.qr_create(r, provisioning, args.runtime_version, create_flags)))
  return watched


def install_commands(args: argparse.Namespace, t: _kit.Target) -> list[list[str]]:
  """install.py's scp + ssh for a re-created TPU (the tarball is built once at start)."""
  script = install.remote_install_script(args.install_from, args.package, "python3.11")
  tarball = os.path.join(args.staging_dir, install.TARBALL)
  return [_kit.scp(t, tarball, install.TARBALL), _kit.ssh(t, script)]


def decide(output: str, hosts: int) -> str:
  """'running' (all workers RUNNING), 'finished' (all exited 0) or 'failed' from status lines."""
  states = {}
  for m in _STATUS.finditer(output):
    states[m.group(1)] = m.group(3)
  if len(states) < hosts:
    return "failed"
  values = set(states.values())
  if values == {"RUNNING"}:
    return "running"
  if values == {"EXITED 0"}:
    return "finished"
  return "failed"


def queued_state(runner: _kit.Runner, t: _kit.Target) -> str:
  """The queued resource's state, 'MISSING' if it does not exist, 'UNKNOWN' on other errors."""
  r = runner.capture(_kit.qr_describe(t))
  if r.returncode == 0:
    return r.stdout.strip() or "UNKNOWN"
  return "MISSING" if "NOT_FOUND" in r.stderr or "not found" in r.stderr.lower() else "UNKNOWN"


def print_plan(args: argparse.Namespace, watched: list[Watched]) -> None:
  """The dry-run: the commands of one pass of the loop, each branch under a comment."""
  print("# once: build the source tarball for re-installs")
  print(shlex.join(install.archive_command(args.install_from, "HEAD", args.staging_dir)))
  for w in watched:
    t = w.target
    print(f"# every {args.interval:g} s (at most {args.max_polls} polls): {t.role} {t.node}")
    print(shlex.join(_kit.qr_describe(t)))
    print(shlex.join(_kit.ssh(t, launch.remote_status(w.job))))
    print(f"# if {t.queued_resource} is {'/'.join(PREEMPTED)} (preempted) or missing: re-create")
    print(shlex.join(_kit.qr_delete(t)))
    print(shlex.join(w.create))
    print(f"# once {t.queued_resource} is ACTIVE again: install and relaunch")
    for cmd in install_commands(args, t):
      print(shlex.join(cmd))
    print(shlex.join(w.start))
    print(f"# if {w.job} looks dead on a worker for {args.unhealthy_polls} polls: relaunch")
    print(shlex.join(_kit.ssh(t, launch.remote_stop(w.job))))
    print(shlex.join(w.start))


def watch(args: argparse.Namespace, watched: list[Watched], runner: _kit.Runner) -> int:
  """The bounded polling loop; returns 0 when every watched job finished."""
  relaunches = 0

  def spend(what: str) -> None:
    nonlocal relaunches
    relaunches += 1
    if relaunches > args.max_relaunches:
      raise GiveUp(f"giving up: {relaunches - 1} re-creations/relaunches already "
                   f"(--max-relaunches {args.max_relaunches}); last: {what}")
    _kit.note(what)

  runner.run(install.archive_command(args.install_from, "HEAD", args.staging_dir))
  for poll in range(args.max_polls):
    if poll:
      time.sleep(args.interval)
    for w in (w for w in watched if not w.done):
      try:
        t = w.target
        state = queued_state(runner, t)
        if state in PREEMPTED or state == "MISSING":
          spend(f"{t.queued_resource} is {state}: re-creating it")
          if state != "MISSING":
            runner.run(_kit.qr_delete(t))
          runner.run(w.create)
          w.needs_install, w.unhealthy = True, 0
          continue
        if state != "ACTIVE":
          _kit.note(f"{t.queued_resource} is {state}; waiting")
          continue
        if w.needs_install:
          for cmd in install_commands(args, t):
            runner.run(cmd)
          runner.run(w.start)
          w.needs_install = False
          continue
        verdict = decide(runner.capture(_kit.ssh(t, launch.remote_status(w.job))).stdout,
                         t.acc.hosts)
        if verdict == "finished":
          _kit.note(f"{w.job} on {t.node} finished on every worker")
          w.done = True
        elif verdict == "running":
          w.unhealthy = 0
        else:
          w.unhealthy += 1
          if w.unhealthy >= args.unhealthy_polls:
            spend(f"{w.job} on {t.node} is not running on every worker: relaunching")
            runner.run(_kit.ssh(t, launch.remote_stop(w.job)))
            runner.run(w.start)
            w.unhealthy = 0
      except GiveUp:
        raise
      except _kit.KitError as e:  # a flaky ssh or API call: try again at the next poll
        _kit.note(f"{w.target.node}: {e}; retrying at the next poll")
    if all(w.done for w in watched):
      return 0
  raise GiveUp(f"still not finished after {args.max_polls} polls; run watch.py again")


def main(argv: list[str] | None = None) -> int:
  """Validates everything, then prints one pass of the loop (--dry-run) or runs the loop."""
  args = parse_args(argv)
  watched = build(args)
  if args.dry_run:
    print_plan(args, watched)
    return 0
  if not shutil.which("gcloud"):
    raise _kit.KitError("gcloud not found on PATH: install the Google Cloud CLI "
                        "(https://cloud.google.com/sdk/docs/install)")
  os.makedirs(args.staging_dir, exist_ok=True)
  return watch(args, watched, _kit.Runner(False))


if __name__ == "__main__":
  sys.exit(_kit.main_guard("watch.py", main))
