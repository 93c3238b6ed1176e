#!/usr/bin/env python3
"""Install realm-jax[tpu] on every worker of the trainer and refresher TPUs.

Each worker gets a virtualenv ~/realm-venv on a released CPython 3.11 that uv installs (jax 0.10
needs Python >= 3.11; the TPU images ship 3.10, and Ubuntu 22.04's `python3.11` package is the
release candidate 3.11.0rc1). No apt-get: on a fresh VM, unattended-upgrades holds dpkg's lock
for minutes, which would fail the install on some workers. uv itself comes from its installer
(https://astral.sh/uv) into ~/.local/bin, without root. `--from checkout` (default) ships
`git archive REF` of this checkout and installs it (not editable: the named experiments come with
the package); `--from pypi` installs a released version and ships only experiments/ (your own
configs). The last step writes ~/realm-jax/.realm-jax-installed, which launch.py's `status` and
watch.py read (a worker without it is UNINSTALLED).

Example: tpu/install.py --project my-proj --zone us-central2-b --train-type v4-32 \\
             --refresh-type v4-8 --dry-run
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

import _kit

TARBALL = "realm-jax-src.tar.gz"
PYTHON_VERSION = "3.11"
UV_INSTALLER = "https://astral.sh/uv/install.sh"


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
  p.add_argument("--python-version", default=PYTHON_VERSION,
                 help=f"CPython for the worker virtualenv, installed by uv (default {PYTHON_VERSION})")
  p.add_argument("--staging-dir", default=os.path.join("/tmp", "realm-jax-dist"),
                 help="local folder for the source tarball")
  return p.parse_args(argv)


def archive_command(source: str, ref: str, staging_dir: str) -> list[str]:
  """`git archive` of the whole tree (checkout) or only experiments/ (pypi)."""
  out = str(Path(staging_dir) / TARBALL)
  cmd = ["git", "-C", str(_kit.REPO_ROOT), "archive", "--format=tar.gz", f"--output={out}", ref]
  return cmd + (["experiments"] if source == "pypi" else [])


def remote_install_script(source: str, package: str, python_version: str = PYTHON_VERSION,
                          label: str = "") -> str:
  """The bash run on every worker: uv, a venv on a released CPython, unpack the tarball, install,
  print the version, then the marker that says the worker is ready (`label` goes into it)."""
  if not re.fullmatch(r"3\.[0-9]+", python_version):
    raise _kit.KitError(f"bad --python-version {python_version!r}: expected a CPython minor version like 3.11")
  venv, python = _kit.home(_kit.VENV_DIR), _kit.home(_kit.VENV_DIR + "/bin/python")
  minor = python_version.split(".")[1]
  released = (f"import sys; sys.exit(sys.version_info[:2] != (3, {minor}) or "
              "sys.version_info.releaselevel != 'final')")
  src = _kit.home(_kit.SRC_DIR)
  requirement = (shlex.quote("realm-jax[tpu] @ file://") + f'"$HOME/{_kit.SRC_DIR}"' if source == "checkout"
                 else shlex.quote(package))
  logs = _kit.home(_kit.LOG_DIR)
  return "; ".join([
      "set -e -o pipefail",
      f"mkdir -p {logs}",
      # Refuse to replace the code under a running job.
      f'for P in {logs}/*.pid; do if [ -f "$P" ] && kill -0 "$(cat "$P")" 2>/dev/null; then '
      'echo "a realm-jax job is running ($P): stop it first" >&2; exit 3; fi; done',
      'export PATH="$HOME/.local/bin:$PATH"',
      f"command -v uv >/dev/null 2>&1 || curl -LsSf {UV_INSTALLER} | env UV_NO_MODIFY_PATH=1 sh",
      # A venv on anything but a released CPython of that version (e.g. 3.11.0rc1) is replaced.
      f'{python} -c "{released}" 2>/dev/null || {{ rm -rf {venv}; '
      f"uv venv --python {python_version} --python-preference only-managed {venv}; }}",
      f"rm -rf {src} && mkdir -p {src}",
      f"tar -xzf {_kit.home(TARBALL)} -C {src}",
      f"uv pip install --python {python} -q {requirement}",
      f"{_kit.home(_kit.VENV_DIR + '/bin/realm-jax')} --version",
      f"echo {shlex.quote(label or source)} > {_kit.home(_kit.INSTALLED)}",
  ])


def plan(args: argparse.Namespace) -> list[list[str]]:
  """git archive, then per TPU: scp the tarball to all workers and run the install script."""
  if args.source == "pypi" and not args.package.strip():
    raise _kit.KitError("--package is empty")
  roles = ["train", "refresh"] if args.role == "both" else [args.role]
  if args.role == "both" and not args.refresh_type:
    roles = ["train"]
  targets = [_kit.target(args, role) for role in roles]
  label = f"checkout {args.ref}" if args.source == "checkout" else args.package
  script = remote_install_script(args.source, args.package, args.python_version, label)
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
