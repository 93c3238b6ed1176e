#!/usr/bin/env python3
"""Install realm-jax[tpu] on every worker of the trainer and refresher TPUs.

Each worker gets a Python 3.11 virtualenv in ~/realm-venv (jax 0.10 needs Python >= 3.11; the
TPU images ship 3.10) and the experiment configs in ~/realm-jax. `--from checkout` (default)
ships `git archive REF` of this checkout and pip-installs it; `--from pypi` pip-installs a
released version (with its named experiments) and ships only experiments/ (your own configs).

Example: tpu/install.py --project my-proj --zone us-central2-b --train-type v4-32 \\
             --refresh-type v4-8 --dry-run
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import _kit

TARBALL = "realm-jax-src.tar.gz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = _kit.base_parser(__doc__)
  _kit.add_type_args(p)
  p.add_argument("--role", choices=("both", "train", "refresh"), default="both",
                 help="which TPU(s) to install on (default both; without --refresh-type: train)")
  p.add_argument("--from", dest="source", choices=("checkout", "pypi"), default="checkout",
                 help="install this checkout (git archive of --ref) or a release from PyPI")
  p.add_argument("--ref", default="HEAD", help="git ref to ship with --from checkout")
  p.add_argument("--package", default="realm-jax[tpu]",
                 help="pip requirement with --from pypi (default 'realm-jax[tpu]')")
  p.add_argument("--python", default="python3.11",
                 help="interpreter for the worker virtualenv (installed with apt if missing)")
  p.add_argument("--staging-dir", default=os.path.join("/tmp", "realm-jax-dist"),
                 help="local folder for the source tarball")
  return p.parse_args(argv)


def archive_command(source: str, ref: str, staging_dir: str) -> list[str]:
  """`git archive` of the whole tree (checkout) or only experiments/ (pypi)."""
  out = str(Path(staging_dir) / TARBALL)
  cmd = ["git", "-C", str(_kit.REPO_ROOT), "archive", "--format=tar.gz", f"--output={out}", ref]
  return cmd + (["experiments"] if source == "pypi" else [])


def remote_install_script(source: str, package: str, python: str) -> str:
  """The bash run on every worker: venv, unpack the tarball, pip install, print the version."""
  if not python.replace(".", "").replace("-", "").isalnum():
    raise _kit.KitError(f"bad --python {python!r}: expected an interpreter name like python3.11")
  pip = f'{_kit.home(_kit.VENV_DIR + "/bin/python")} -m pip install -q'
  requirement = _kit.home(_kit.SRC_DIR + "[tpu]") if source == "checkout" else shlex.quote(package)
  logs = _kit.home(_kit.LOG_DIR)
  return "; ".join([
      "set -e",
      f"mkdir -p {logs}",
      # Refuse to replace the code under a running job.
      f'for P in {logs}/*.pid; do if [ -f "$P" ] && kill -0 "$(cat "$P")" 2>/dev/null; then '
      'echo "a realm-jax job is running ($P): stop it first" >&2; exit 3; fi; done',
      f"if ! command -v {python} >/dev/null 2>&1; then sudo apt-get update -qq && "
      f"sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {python} {python}-venv; fi",
      f"[ -x {_kit.home(_kit.VENV_DIR + '/bin/python')} ] || {python} -m venv "
      f"{_kit.home(_kit.VENV_DIR)}",
      f"{pip} --upgrade pip",
      f"rm -rf {_kit.home(_kit.SRC_DIR)} && mkdir -p {_kit.home(_kit.SRC_DIR)}",
      f"tar -xzf {_kit.home(TARBALL)} -C {_kit.home(_kit.SRC_DIR)}",
      f"{pip} {requirement}",
      f"{_kit.home(_kit.VENV_DIR + '/bin/realm-jax')} --version",
  ])


def plan(args: argparse.Namespace) -> list[list[str]]:
  """git archive, then per TPU: scp the tarball to all workers and run the install script."""
  if args.source == "pypi" and not args.package.strip():
    raise _kit.KitError("--package is empty")
  roles = ["train", "refresh"] if args.role == "both" else [args.role]
  if args.role == "both" and not args.refresh_type:
    roles = ["train"]
  targets = [_kit.target(args, role) for role in roles]
  script = remote_install_script(args.source, args.package, args.python)
  cmds = [archive_command(args.source, args.ref, args.staging_dir)]
  tarball = str(Path(args.staging_dir) / TARBALL)
  for t in targets:
    _kit.note(f"{t.role}: installing on all {t.acc.hosts} worker(s) of {t.node} ({t.acc.name})")
    cmds.append(_kit.scp(t, tarball, TARBALL))
    cmds.append(_kit.ssh(t, script))
  return cmds


def main(argv: list[str] | None = None) -> int:
  """Validates the arguments, then prints (--dry-run) or runs the install commands."""
  args = parse_args(argv)
  cmds = plan(args)
  runner = _kit.Runner(args.dry_run)
  if not args.dry_run:
    Path(args.staging_dir).mkdir(parents=True, exist_ok=True)
    if args.source == "checkout":
      dirty = runner.capture(["git", "-C", str(_kit.REPO_ROOT), "status", "--porcelain",
                              "--untracked-files=no"])
      if dirty.stdout.strip():
        _kit.note(f"uncommitted changes are NOT shipped: git archive {args.ref} sends committed files")
  for cmd in cmds:
    runner.run(cmd)
  return 0


if __name__ == "__main__":
  sys.exit(_kit.main_guard("install.py", main))
