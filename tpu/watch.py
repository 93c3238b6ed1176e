#!/usr/bin/env python3
"""Watch the trainer (and refresher) TPUs and bring the run back after a preemption.

Every --interval seconds, for at most --max-polls polls, for each watched TPU:
  * queued resource SUSPENDED or FAILED (a Spot preemption) or gone: delete it, create it again;
  * once it is ACTIVE again: install the project and relaunch the job (the trainer with
    --resume, so it continues from the last checkpoint under --storage);
  * ACTIVE but not installed on a worker (a watcher started before install.py): install, then
    start the job;
  * ACTIVE but the job died on a worker for --unhealthy-polls polls in a row: stop it on all
    workers and relaunch it the same way;
  * the job exited 0 on every worker: that TPU is done. The watch ends when all are done.
Re-creations and relaunches back off exponentially while a job keeps failing (--backoff doubling
up to --max-backoff; a healthy poll resets it) and the watch gives up after --max-relaunches.
Re-installs ship `git archive --ref` (HEAD by default), as install.py does. Each job's log is
copied to STORAGE/logs/JOB/worker-W.log every --log-every seconds by the workers themselves.
`--dry-run` prints the commands of one pass of the loop, each branch under a `#` comment.

Example: tpu/watch.py --project my-proj --zone us-central2-b --train-type v4-32 --refresh-type v4-8 \\
             --provisioning spot --config realm_v4_32 --storage gs://b/run1 --corpus gs://b/corpora/wiki \\
             --init gs://b/weights/bert-base-uncased --set init_retriever=gs://b/ict-run1 --dry-run
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

_STATUS = re.compile(r"realm-status (\S+) (\S+) (RUNNING|ABSENT|UNINSTALLED|EXITED (-?\d+))")
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
  streak: int = 0           # re-creations/relaunches since the job last ran on every worker
  not_before: float = 0.0   # monotonic time before which the next one waits (back-off)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Trainer job and config, re-creation options, install source and the loop's bounds."""
  p = _kit.base_parser(__doc__)
  _kit.add_type_args(p)
  p.add_argument("--job", choices=("pretrain", "ict", "finetune"), default="pretrain", help="trainer job")
  p.add_argument("--config", help="trainer config: a named experiment (realm_v4_32) or experiments/FILE.py")
  p.add_argument("--storage", default=os.environ.get("REALM_STORAGE"),
                 help="storage root gs://BUCKET/RUN (env REALM_STORAGE)")
  p.add_argument("--corpus", default=os.environ.get("REALM_CORPUS"),
                 help="the corpus's own URI gs://BUCKET/corpora/NAME (env REALM_CORPUS; default STORAGE/corpus)")
  p.add_argument("--init", help="the trainer's starting weights (gs://... weights directory or run root)")
  p.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", help="trainer config overrides (repeatable)")
  p.add_argument("--env", action="append", metavar="NAME=VALUE", help="job environment")
  p.add_argument("--no-refresher", action="store_true",
                 help="watch only the trainer even if --refresh-type is set (ict never watches "
                 "the refresher: it retrieves in-batch, without an index)")
  p.add_argument("--log-every", type=float, default=launch.LOG_EVERY,
                 help=f"seconds between copies of each worker's log to STORAGE/logs/ (default {launch.LOG_EVERY:g})")
  p.add_argument("--provisioning", choices=_kit.PROVISIONING, default="spot",
                 help="trainer capacity used when re-creating (default spot)")
  p.add_argument("--refresh-provisioning", choices=_kit.PROVISIONING, default=None,
                 help="refresher capacity when re-creating (default: --provisioning)")
  _kit.add_create_args(p)
  p.add_argument("--install-from", choices=("checkout", "pypi"), default="checkout",
                 help="how install.py reinstalls a re-created TPU")
  p.add_argument("--ref", default="HEAD", help="git ref shipped by re-installs with --install-from checkout")
  p.add_argument("--package", default="realm-jax[tpu]", help="pip requirement for pypi installs")
  p.add_argument("--python-version", default=install.PYTHON_VERSION, help="CPython of the worker venv")
  p.add_argument("--staging-dir", default=os.path.join("/tmp", "realm-jax-dist"),
                 help="local folder for the source tarball")
  p.add_argument("--interval", type=float, default=300.0, help="seconds between polls")
  p.add_argument("--max-polls", type=int, default=20000, help="stop watching after this many")
  p.add_argument("--max-relaunches", type=int, default=200,
                 help="give up after this many re-creations/relaunches in total (default 200: a multi-day "
                 "spot run is preempted many times)")
  p.add_argument("--backoff", type=float, default=60.0,
                 help="seconds before the second re-creation/relaunch in a row, doubling with each further one")
  p.add_argument("--max-backoff", type=float, default=3600.0, help="the back-off never exceeds this")
  p.add_argument("--unhealthy-polls", type=int, default=2,
                 help="polls in a row a job must look dead before it is relaunched")
  return p.parse_args(argv)


def check_bounds(args: argparse.Namespace) -> None:
  """The loop must be bounded: positive polls, relaunches and unhealthy-poll threshold."""
  for flag in ("interval", "backoff", "max_backoff"):
    if getattr(args, flag) < 0:
      raise _kit.KitError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 0")
  for flag in ("max_polls", "max_relaunches", "unhealthy_polls"):
    value = getattr(args, flag)
    if value < 1:
      raise _kit.KitError(f"--{flag.replace('_', '-')} {value} must be >= 1")


def backoff_seconds(args: argparse.Namespace, streak: int) -> float:
  """The wait before the next re-creation/relaunch after `streak` in a row: 0, backoff, 2x, 4x..."""
  return 0.0 if streak < 1 else min(args.max_backoff, args.backoff * 2 ** (streak - 1))


def build(args: argparse.Namespace) -> list[Watched]:
  """Validates everything up front and prepares the start command of each watched TPU."""
  check_bounds(args)
  watched = []
  t = _kit.target(args, "train")
  ns = argparse.Namespace(job=args.job, config=args.config, storage=args.storage, set=args.set,
                          env=args.env, corpus=args.corpus, init=args.init, log_every=args.log_every)
  storage, init, corpus = launch.check_job_flags(ns, t)
  jargs = launch.job_args(args.job, ns.config, storage, resume=True, sets=args.set or (), init=init, corpus=corpus)
  start = _kit.ssh(t, launch.remote_start(args.job, jargs, args.env or (), storage, args.log_every))
  create_flags = _kit.create_flags(args)
  watched.append(Watched(t, args.job, args.provisioning, start,
                         _kit.qr_create(t, args.provisioning, args.runtime_version, create_flags)))
  if args.refresh_type and not args.no_refresher and args.job == "pretrain":
    r = _kit.target(args, "refresh")
    # The refresher reads the trainer's config (with its --init/--corpus/--set) from the checkpoints.
    rstorage = _kit.check_storage(args.storage, r.acc, r.role)
    start = _kit.ssh(r, launch.remote_start("refresh", ["--storage", rstorage], args.env or (), rstorage,
                                            args.log_every))
    provisioning = args.refresh_provisioning or args.provisioning
    watched.append(Watched(r, "refresh", provisioning, start,
                           _kit.qr_create(r, provisioning, args.runtime_version, create_flags)))
  return watched


def install_commands(args: argparse.Namespace, t: _kit.Target) -> list[list[str]]:
  """install.py's scp + ssh for a TPU (the tarball of --ref is built once at start)."""
  label = f"checkout {args.ref}" if args.install_from == "checkout" else args.package
  script = install.remote_install_script(args.install_from, args.package, args.python_version, label)
  tarball = os.path.join(args.staging_dir, install.TARBALL)
  return [_kit.scp(t, tarball, install.TARBALL), _kit.ssh(t, script)]


def decide(output: str, hosts: int) -> str:
  """From the status lines: 'running' (all RUNNING), 'finished' (all exited 0), 'uninstalled'
  (a worker without a finished install) or 'failed'."""
  states = {}
  for m in _STATUS.finditer(output):
    states[m.group(1)] = m.group(3)
  if len(states) < hosts:
    return "failed"
  values = set(states.values())
  if "UNINSTALLED" in values:
    return "uninstalled"
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
  print(f"# once: build the source tarball for re-installs ({args.ref})")
  print(shlex.join(install.archive_command(args.install_from, args.ref, args.staging_dir)))
  for w in watched:
    t = w.target
    print(f"# every {args.interval:g} s (at most {args.max_polls} polls): {t.role} {t.node}")
    print(shlex.join(_kit.qr_describe(t)))
    print(shlex.join(_kit.ssh(t, launch.remote_status(w.job))))
    print(f"# if {t.queued_resource} is {'/'.join(PREEMPTED)} (preempted) or missing: re-create")
    print(shlex.join(_kit.qr_delete(t)))
    print(shlex.join(w.create))
    print(f"# once {t.queued_resource} is ACTIVE again, or a worker is UNINSTALLED: install and (re)start")
    for cmd in install_commands(args, t):
      print(shlex.join(cmd))
    print(shlex.join(w.start))
    print(f"# if {w.job} looks dead on a worker for {args.unhealthy_polls} polls: relaunch")
    print(shlex.join(_kit.ssh(t, launch.remote_stop(w.job))))
    print(shlex.join(w.start))
  print(f"# re-creations/relaunches in a row wait {args.backoff:g} s, then twice as long each time (at most "
        f"{args.max_backoff:g} s); at most {args.max_relaunches} in all")


def watch(args: argparse.Namespace, watched: list[Watched], runner: _kit.Runner) -> int:
  """The bounded polling loop; returns 0 when every watched job finished."""
  relaunches = 0

  def spend(w: Watched, what: str) -> bool:
    """Counts a re-creation/relaunch; False (and nothing done) while `w` is backing off."""
    nonlocal relaunches
    wait = w.not_before - time.monotonic()
    if wait > 0:
      _kit.note(f"{what}: backing off, {wait:.0f} s to go")
      return False
    relaunches += 1
    if relaunches > args.max_relaunches:
      raise GiveUp(f"giving up: {relaunches - 1} re-creations/relaunches already "
                   f"(--max-relaunches {args.max_relaunches}); last: {what}")
    w.streak += 1
    w.not_before = time.monotonic() + backoff_seconds(args, w.streak)
    _kit.note(what)
    return True

  def install_and_start(w: Watched) -> None:
    for cmd in install_commands(args, w.target):
      runner.run(cmd)
    runner.run(w.start)

  runner.run(install.archive_command(args.install_from, args.ref, args.staging_dir))
  for poll in range(args.max_polls):
    if poll:
      time.sleep(args.interval)
    for w in (w for w in watched if not w.done):
      try:
        t = w.target
        state = queued_state(runner, t)
        if state in PREEMPTED or state == "MISSING":
          if spend(w, f"{t.queued_resource} is {state}: re-creating it"):
            if state != "MISSING":
              runner.run(_kit.qr_delete(t))
            runner.run(w.create)
            w.needs_install, w.unhealthy = True, 0
          continue
        if state != "ACTIVE":
          _kit.note(f"{t.queued_resource} is {state}; waiting")
          continue
        if w.needs_install:
          install_and_start(w)
          w.needs_install = False
          continue
        verdict = decide(runner.capture(_kit.ssh(t, launch.remote_status(w.job))).stdout,
                         t.acc.hosts)
        if verdict == "finished":
          _kit.note(f"{w.job} on {t.node} finished on every worker")
          w.done = True
        elif verdict == "running":
          w.unhealthy, w.streak, w.not_before = 0, 0, 0.0
        elif verdict == "uninstalled":
          if spend(w, f"{t.node} is not installed on every worker: installing, then starting {w.job}"):
            runner.run(_kit.ssh(t, launch.remote_stop(w.job)))
            install_and_start(w)
            w.unhealthy = 0
        else:
          w.unhealthy += 1
          if w.unhealthy >= args.unhealthy_polls and spend(
              w, f"{w.job} on {t.node} is not running on every worker: relaunching"):
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
