#!/usr/bin/env python3
"""Launch realm-jax jobs on every worker at once, in the background, with one log per worker.

  pretrain | ict | finetune   run on all workers of the trainer slice (NAME-train)
  refresh                     runs on all workers of the refresher (NAME-refresh)
  stop JOB | status JOB       stop a job / print `realm-status WORKER JOB STATE` per worker

Each worker runs `~/realm-venv/bin/realm-jax JOB ...` from ~/realm-jax under setsid+nohup;
output goes to ~/realm-jax-logs/JOB-worker-W.log, the pid to JOB.pid, the exit code to JOB.exit,
and `realm-jax ship-log` copies the log to STORAGE/logs/JOB/worker-W.log every --log-every
seconds (a preempted VM loses its disk, not the log). The code calls jax.distributed.initialize()
itself: every worker runs the same command.

Example: tpu/launch.py pretrain --project my-proj --zone us-central2-b --train-type v4-32 \\
             --config realm_v4_32 --storage gs://my-bucket/run1 --corpus gs://my-bucket/corpora/wiki \\
             --init gs://my-bucket/weights/bert-base-uncased --set init_retriever=gs://my-bucket/ict-run1 \\
             --dry-run
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


LOG_EVERY = 60.0


def ship_log(job: str, storage: str, every: float) -> str:
  """`realm-jax ship-log` of the job's log to STORAGE/logs/JOB/worker-$W.log (worker-side shell)."""
  program = _kit.home(f"{_kit.VENV_DIR}/bin/realm-jax")
  return (f"{program} ship-log {_kit.log_file(f'{job}-worker-$W.log')} --storage {shlex.quote(storage)} "
          f'--to "logs/{job}/worker-$W.log" --every {every:g} --until {_kit.log_file(f"{job}.exit")}')


def remote_start(job: str, job_args: list[str], env: list[str] = (), storage: str | None = None,
                 log_every: float = LOG_EVERY) -> str:
  """Starts `realm-jax JOB job_args` detached (with its log shipper when `storage` is given);
  refuses if the job already runs on the worker."""
  pid, done = _kit.log_file(f"{job}.pid"), _kit.log_file(f"{job}.exit")
  log = _kit.log_file(f"{job}-worker-$W.log")
  program = _kit.home(f"{_kit.VENV_DIR}/bin/realm-jax")
  inner = " ".join(["env", *map(shlex.quote, env)] if env else [])
  inner = f"{inner} {program} {shlex.join([job, *job_args])}; echo $? > {done}".lstrip()
  if storage:
    inner = f"{ship_log(job, storage, log_every)} & {inner}"
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
  """Prints `realm-status W JOB RUNNING|EXITED <code>|ABSENT|UNINSTALLED` on each worker
  (UNINSTALLED: install.py has not finished there, e.g. a fresh or re-created VM)."""
  pid, done = _kit.log_file(f"{job}.pid"), _kit.log_file(f"{job}.exit")
  return "; ".join([
      _kit.WORKER_ID,
      f'if [ -f {done} ]; then S="EXITED $(cat {done})"; '
      f'elif [ -f {pid} ] && kill -0 -- "-$(cat {pid})" 2>/dev/null; then S=RUNNING; '
      f"elif [ ! -f {_kit.home(_kit.INSTALLED)} ]; then S=UNINSTALLED; "
      "else S=ABSENT; fi",
      f'echo "realm-status $W {job} $S"',
  ])


# ---------------------------------------------------------------------------------------------
# Arguments.
# ---------------------------------------------------------------------------------------------


def job_args(job: str, config: str | None, storage: str, resume: bool = False, sets: list[str] = (),
             init: str | None = None, corpus: str | None = None) -> list[str]:
  """The realm-jax command line after the sub-command name."""
  out = (["--config", config] if config else []) + ["--storage", storage]
  if corpus:
    out += ["--corpus", corpus]
  if init:
    out += ["--init", init]
  if resume:
    out.append("--resume")
  if sets:
    out += ["--set", *sets]
  return out


NAMED = _kit.REPO_ROOT / "realm_jax" / "experiments"  # the named experiments, installed with the package
SYMBOLIC_INIT = ("minilm", "random")


def check_config(config: str | None, job: str) -> str | None:
  """A named experiment (`realm_v4_32`) or a .py/.json file of the checkout (`experiments/x.py`);
  optional for the refresher, which reads the trainer's config from its checkpoints."""
  if not config and job == "refresh":
    return None
  if not config:
    raise _kit.KitError(f"missing --config for {job} (a named experiment such as realm_v4_32, or "
                        "experiments/my_run.py)")
  if re.fullmatch(r"[a-z][a-z0-9_]*", config):
    if NAMED.is_dir() and not (NAMED / f"{config}.py").exists():
      known = ", ".join(sorted(p.stem for p in NAMED.glob("*.py") if not p.stem.startswith("_")))
      raise _kit.KitError(f"--config {config!r} is not a named experiment (known: {known}); a file of yours is "
                          "passed by path, e.g. experiments/my_run.py")
    return config
  if not config.endswith((".py", ".json")):
    raise _kit.KitError(f"--config {config!r} should be a named experiment or a config file (*.py, *.json)")
  if not os.path.isabs(config) and not (_kit.REPO_ROOT / config).exists():
    _kit.note(f"{config} is not in this checkout; it must exist in ~/{_kit.SRC_DIR} on the "
              "workers (install.py ships the checkout's files)")
  return config


def check_job_flags(args: argparse.Namespace, t: _kit.Target) -> tuple[str, str | None, str | None]:
  """Validates --config/--storage/--corpus/--init/--set/--env; returns (storage, init, corpus)."""
  args.config = check_config(args.config, args.job)
  storage = _kit.check_storage(args.storage, t.acc, t.role)
  corpus = getattr(args, "corpus", None)
  if corpus:
    corpus = _kit.check_storage(corpus, t.acc, t.role, flag="--corpus")
  for item in args.set or ():
    if not _SET.match(item):
      raise _kit.KitError(f"bad --set {item!r}: expected key=value")
  for item in args.env or ():
    if not _ENV.match(item):
      raise _kit.KitError(f"bad --env {item!r}: expected NAME=value")
  init = getattr(args, "init", None)
  if init and init not in SYMBOLIC_INIT:
    init = _kit.check_storage(init, t.acc, t.role, flag="--init")
  if getattr(args, "log_every", LOG_EVERY) <= 0:
    raise _kit.KitError(f"--log-every {args.log_every} must be > 0")
  return storage, init, corpus


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
    s.add_argument("--config", help="a named experiment (realm_v4_32, ...) or a config file relative to the "
                   "checkout root (experiments/my_run.py)" + ("; optional: the refresher reads the trainer's "
                   "config from its checkpoints and only checks this one against it" if job == "refresh" else ""))
    s.add_argument("--storage", default=os.environ.get("REALM_STORAGE"),
                   help="storage root gs://BUCKET/RUN (env REALM_STORAGE)")
    if job != "refresh":
      s.add_argument("--resume", action="store_true",
                     help="resume from the last checkpoint under --storage")
      s.add_argument("--corpus", default=os.environ.get("REALM_CORPUS"),
                     help="the corpus's own URI, shared by runs: gs://BUCKET/corpora/wiki (env REALM_CORPUS; "
                     "default STORAGE/corpus)")
      s.add_argument("--init", help="starting weights: gs://... weights directory or run root, minilm, random")
    s.add_argument("--log-every", type=float, default=LOG_EVERY,
                   help=f"seconds between copies of each worker's log to STORAGE/logs/ (default {LOG_EVERY:g})")
    s.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", help="config overrides (repeatable)")
    s.add_argument("--env", action="append", metavar="NAME=VALUE",
                   help="environment variable for the job (repeatable)")
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
  storage, init, corpus = check_job_flags(args, t)
  devices = t.acc.devices
  per_device = (f"{PAPER_BATCH // devices} per device" if PAPER_BATCH % devices == 0
                else f"not divisible by {devices} devices")
  _kit.note(f"{args.job} on {t.node}: {t.acc.describe()}; the paper's batch {PAPER_BATCH} -> "
            f"{per_device}")
  jargs = job_args(args.job, args.config, storage, getattr(args, "resume", False),
                   args.set or (), init, corpus)
  return [_kit.ssh(t, remote_start(args.job, jargs, args.env or (), storage, args.log_every))]


def main(argv: list[str] | None = None) -> int:
  """Validates the arguments, then prints (--dry-run) or runs the ssh command."""
  args = parse_args(argv)
  runner = _kit.Runner(args.dry_run)
  for cmd in plan(args):
    runner.run(cmd)
  return 0


if __name__ == "__main__":
  sys.exit(_kit.main_guard("launch.py", main))
