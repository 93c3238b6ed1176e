"""Shared helpers of the tpu/ launch kit: accelerator table, argument checks, gcloud commands.

Standard library only, so the scripts run on a laptop with nothing but Python and the Cloud SDK.
Every script builds its gcloud commands here, prints them with `--dry-run`, or runs them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]

try:  # Inside a checkout (or with realm-jax installed) errors share the project's base class.
  if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))
  from realm_jax.errors import RealmError
except ImportError:  # pragma: no cover - the kit copied on its own

  class RealmError(Exception):
    """Stand-in for realm_jax.errors.RealmError when the package is not importable."""


class KitError(RealmError):
  """A bad argument or a failed step of the TPU launch kit; printed without a traceback."""


# ---------------------------------------------------------------------------------------------
# Accelerator types.
# ---------------------------------------------------------------------------------------------

# family: (runtime version, TensorCores per chip, sizes in the accelerator-type name).
# Runtime versions: cloud.google.com/tpu/docs/runtimes (JAX/PyTorch column). Sizes: the
# TensorCore count for v4/v5p (2 cores per chip, megacore: one JAX device per chip) and the chip
# count for v5e/v6e. Hosts: 4 chips per VM on multi-host slices; v5e/v6e up to 8 chips fit one VM.
_FAMILIES = {
    "v4": ("tpu-ubuntu2204-base", 2, (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)),
    "v5litepod": ("v2-alpha-tpuv5-lite", 1, (1, 4, 8, 16, 32, 64, 128, 256)),
    "v5p": ("v2-alpha-tpuv5", 2, (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 12288)),
    "v6e": ("v2-alpha-tpuv6e", 1, (1, 4, 8, 16, 32, 64, 128, 256)),
}
_ALIASES = {"v5e": "v5litepod"}  # v5e-64 is the marketing name of v5litepod-64.


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One TPU slice shape: the gcloud type name, chips, hosts (workers) and runtime version."""

  name: str
  family: str
  chips: int
  hosts: int
  runtime_version: str

  @property
  def chips_per_host(self) -> int:
    return self.chips // self.hosts

  @property
  def devices(self) -> int:
    """JAX devices in the slice: one per chip on every family listed here."""
    return self.chips

  def describe(self) -> str:
    return (f"{self.name}: {self.chips} chips = {self.hosts} worker(s) x {self.chips_per_host} chips, "
            f"{self.devices} JAX devices, runtime {self.runtime_version}")


def _build_table() -> dict[str, Accelerator]:
  table = {}
  for family, (runtime, cores_per_chip, sizes) in _FAMILIES.items():
    for size in sizes:
      chips = size // cores_per_chip
      single_host_max = 4 if cores_per_chip == 2 else 8
      hosts = 1 if chips <= single_host_max else chips // 4
      name = f"{family}-{size}"
      table[name] = Accelerator(name, family, chips, hosts, runtime)
  return table


ACCELERATORS = _build_table()


def accelerator(name: str | None, flag: str = "--train-type") -> Accelerator:
  """Looks up an accelerator type (v5e-N is accepted for v5litepod-N); unknown -> KitError."""
  if not name:
    raise KitError(f"missing accelerator type: pass {flag} (e.g. v4-32, v5litepod-64, v6e-16)")
  key = name.strip().lower()
  family, _, size = key.partition("-")
  family = _ALIASES.get(family, family)
  key = f"{family}-{size}"
  if key in ACCELERATORS:
    return ACCELERATORS[key]
  if family in _FAMILIES:
    known = ", ".join(a for a in ACCELERATORS if a.startswith(family + "-"))
    raise KitError(f"unknown accelerator type {name!r} for {flag}: known {family} types are {known}")
  raise KitError(f"unknown accelerator type {name!r} for {flag}: expected one of the families "
                 f"{', '.join(list(_FAMILIES) + list(_ALIASES))} followed by a size, e.g. v4-32")


# ---------------------------------------------------------------------------------------------
# Argument checks.
# ---------------------------------------------------------------------------------------------

# us-central2-b; AI zones carry an "ai<N>" before the letter: us-south1-ai1b.
_ZONE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-(ai[0-9]+)?[a-z]$")
_PROJECT = re.compile(r"^([a-z][a-z0-9.-]*[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_RESOURCE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
ROLES = ("train", "refresh")


def check_zone(zone: str | None) -> str:
  """A zone like us-central2-b (a region without its letter is the usual slip)."""
  if not zone:
    raise KitError("missing zone: pass --zone (e.g. us-central2-b) or set REALM_TPU_ZONE")
  if not _ZONE.match(zone):
    hint = " (that looks like a region; add the zone letter, e.g. -b)" if re.match(
        r"^[a-z]+-[a-z]+[0-9]+$", zone) else ""
    raise KitError(f"bad zone {zone!r}: expected REGION-LETTER like us-central2-b (or an AI zone like "
                   f"us-south1-ai1b){hint}")
  return zone


def check_project(project: str | None) -> str:
  """A Cloud project id: required, since every gcloud command names it."""
  if not project:
    raise KitError("missing project: pass --project or set CLOUDSDK_CORE_PROJECT")
  if not _PROJECT.match(project):
    raise KitError(f"bad project id {project!r}: 6-30 lowercase letters, digits or hyphens, "
                   "starting with a letter")
  return project


def check_name(name: str | None) -> str:
  """The prefix of node/queued-resource names; the longest derived name must fit 63 chars."""
  if not name:
    raise KitError("missing --name (the prefix of node and queued-resource names)")
  longest = f"{name}-refresh-qr"
  if not _RESOURCE.match(name) or len(longest) > 63:
    raise KitError(f"bad --name {name!r}: lowercase letters, digits and hyphens, starting with a "
                   f"letter, at most {63 - len('-refresh-qr')} characters")
  return name


def check_worker(worker: str, acc: Accelerator) -> str:
  """`all` or a worker index inside the slice."""
  if worker == "all":
    return worker
  if not worker.isdigit():
    raise KitError(f"bad --worker {worker!r}: expected 'all' or a worker index")
  if int(worker) >= acc.hosts:
    raise KitError(f"--worker {worker} is out of range: {acc.name} has {acc.hosts} worker(s) "
                   f"(0-{acc.hosts - 1})")
  return str(int(worker))


def check_storage(uri: str | None, acc: Accelerator, role: str, flag: str = "--storage") -> str:
  """gs://BUCKET/RUN (required on pods and for the refresher); a local path only on one host."""
  if not uri:
    raise KitError(f"missing {flag}: pass gs://BUCKET/RUN or set REALM_STORAGE")
  uri = uri.rstrip("/")
  if uri.startswith("gs://"):
    bucket, _, prefix = uri[len("gs://"):].partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
      raise KitError(f"bad bucket name {bucket!r} in {flag} {uri!r}: lowercase letters, digits, "
                     "'-', '_' and '.', 3-222 characters")
    if not prefix:
      raise KitError(f"{flag} {uri!r} has no run prefix: use gs://{bucket}/RUN so that runs (and "
                     "teardown --delete-storage) never touch the whole bucket")
    return uri
  if "://" in uri and not uri.startswith("file://"):
    raise KitError(f"{flag} {uri!r}: only gs:// (or a local path on a single host) is supported")
  if acc.hosts > 1:
    raise KitError(f"{flag} {uri!r} is a local path, but {acc.name} has {acc.hosts} workers that "
                   "do not share a disk: use gs://BUCKET/RUN")
  if role == "refresh":
    raise KitError(f"{flag} {uri!r} is a local path, but the refresher runs on its own VM and must "
                   "share the trainer's storage: use gs://BUCKET/RUN")
  print(f"note: {flag} {uri!r} is local to the VM; a refresher on another VM cannot see it",
        file=sys.stderr)
  return uri


# ---------------------------------------------------------------------------------------------
# Names and gcloud commands.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
  """One role's TPU: its node, queued resource, zone, project and slice shape."""

  name: str
  role: str
  zone: str
  project: str
  acc: Accelerator

  @property
  def node(self) -> str:
    return f"{self.name}-{self.role}"

  @property
  def queued_resource(self) -> str:
    return f"{self.name}-{self.role}-qr"

  def where(self) -> list[str]:
    """The --zone/--project flags every gcloud command of this target carries."""
    return [f"--zone={self.zone}", f"--project={self.project}"]


PROVISIONING = ("on-demand", "spot", "reserved")
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def qr_create(t: Target, provisioning: str = "on-demand", runtime_version: str | None = None,
              extra: tuple[str, ...] = ()) -> list[str]:
  """`queued-resources create` for one node (flags checked against the gcloud reference)."""
  cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", t.queued_resource,
         f"--node-id={t.node}", f"--accelerator-type={t.acc.name}",
         f"--runtime-version={runtime_version or t.acc.runtime_version}", *t.where()]
  if provisioning == "spot":
    cmd.append("--spot")
  elif provisioning == "reserved":
    cmd.append("--reserved")
  cmd.append(f"--labels=realm-jax-run={t.name},realm-jax-role={t.role}")
  return cmd + list(extra)


def qr_describe(t: Target) -> list[str]:
  """Prints only the queued resource's state (ACTIVE, SUSPENDED, WAITING_FOR_RESOURCES...)."""
  return ["gcloud", "compute", "tpus", "queued-resources", "describe", t.queued_resource,
          *t.where(), "--format=value(state.state)"]


def qr_delete(t: Target) -> list[str]:
  """Deletes the queued resource and (with --force) its node; --quiet skips the prompt."""
  return ["gcloud", "compute", "tpus", "queued-resources", "delete", t.queued_resource,
          *t.where(), "--force", "--quiet"]


def ssh(t: Target, command: str, worker: str = "all") -> list[str]:
  """Runs a bash command on one worker or, with "all", on every worker at once."""
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", t.node, f"--worker={worker}", *t.where(),
          f"--command={command}"]


def scp(t: Target, src: str, dest: str, worker: str = "all", recurse: bool = False) -> list[str]:
  """Copies a local file to dest (relative to $HOME) on one or all workers."""
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "scp", src, f"{t.node}:{dest}",
         f"--worker={worker}", *t.where()]
  return cmd + (["--recurse"] if recurse else [])


def storage_rm(uri: str) -> list[str]:
  """Deletes every object under a run prefix (never called with a bare bucket)."""
  return ["gcloud", "storage", "rm", "--recursive", uri]


# ---------------------------------------------------------------------------------------------
# Remote (worker-side) shell snippets. Paths live under the worker's $HOME.
# ---------------------------------------------------------------------------------------------

SRC_DIR, VENV_DIR, LOG_DIR = "realm-jax", "realm-venv", "realm-jax-logs"
INSTALLED = f"{SRC_DIR}/.realm-jax-installed"  # written last by install.py: the worker is ready
# The worker index: TPU_WORKER_ID if set (GKE), else the TPU VM metadata server (GCE_METADATA_IP
# overrides its address, as for JAX), else the hostname. Exported for the job's own shell.
WORKER_ID = ('export W="${TPU_WORKER_ID:-$(curl -sf -m 5 -H Metadata-Flavor:Google '
             'http://${GCE_METADATA_IP:-metadata.google.internal}/computeMetadata/v1/instance/attributes/'
             'agent-worker-number || hostname)}"')


def home(rel: str) -> str:
  """A double-quoted path under the worker's $HOME, expanded on the worker."""
  return f'"$HOME/{rel}"'


def log_file(name: str) -> str:
  """A double-quoted path inside the worker's log directory ~/realm-jax-logs."""
  return home(f"{LOG_DIR}/{name}")


# ---------------------------------------------------------------------------------------------
# Running or printing.
# ---------------------------------------------------------------------------------------------


class Runner:
  """Runs commands, or with dry_run prints each one (shell-quoted, one per line) instead."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def run(self, cmd: list[str], check: bool = True) -> int:
    if self.dry_run:
      print(shlex.join(cmd), flush=True)
      return 0
    print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    rc = self._call(cmd).returncode
    if check and rc != 0:
      raise KitError(f"command failed with exit code {rc}: {shlex.join(cmd)}")
    return rc

  def capture(self, cmd: list[str]) -> subprocess.CompletedProcess:
    """Runs a read-only query and returns its output (never called in dry-run)."""
    return self._call(cmd, capture=True)

  @staticmethod
  def _call(cmd: list[str], capture: bool = False) -> subprocess.CompletedProcess:
    try:
      return subprocess.run(cmd, text=True, capture_output=capture, check=False)
    except FileNotFoundError:
      raise KitError(f"{cmd[0]!r} not found on PATH: install the Google Cloud CLI "
                     "(https://cloud.google.com/sdk/docs/install)") from None


def note(text: str) -> None:
  """Information for the user: on stderr, so stdout stays a runnable list of commands."""
  print(f"# {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Shared argparse pieces.
# ---------------------------------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
  """A parser with --name/--zone/--project/--dry-run, defaults taken from the environment."""
  p = argparse.ArgumentParser(description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_common_args(p)
  return p


def add_common_args(p: argparse.ArgumentParser) -> None:
  """--name, --zone, --project and --dry-run, with defaults from the environment."""
  p.add_argument("--name", default=os.environ.get("REALM_TPU_NAME", "realm"),
                 help="prefix of node names: NAME-train, NAME-refresh (env REALM_TPU_NAME; "
                 "default realm)")
  p.add_argument("--zone", default=os.environ.get("REALM_TPU_ZONE"),
                 help="zone, e.g. us-central2-b (env REALM_TPU_ZONE)")
  p.add_argument("--project", default=os.environ.get("CLOUDSDK_CORE_PROJECT"),
                 help="Cloud project id (env CLOUDSDK_CORE_PROJECT)")
  p.add_argument("--dry-run", action="store_true",
                 help="print every command, one per line, and run nothing")


def add_type_args(p: argparse.ArgumentParser, refresh: bool = True) -> None:
  """--train-type (alias --accelerator-type) and --refresh-type."""
  p.add_argument("--train-type", "--accelerator-type", dest="train_type",
                 default=os.environ.get("REALM_TRAIN_TYPE"),
                 help="trainer slice type, e.g. v4-32, v5litepod-64 (env REALM_TRAIN_TYPE)")
  if refresh:
    p.add_argument("--refresh-type", default=os.environ.get("REALM_REFRESH_TYPE"),
                   help="refresher slice/VM type, e.g. v4-8 (env REALM_REFRESH_TYPE)")


def add_create_args(p: argparse.ArgumentParser) -> None:
  """Options of `queued-resources create` shared by create.py and watch.py (re-creation)."""
  p.add_argument("--runtime-version", default=None,
                 help="override the TPU software version picked from the accelerator family")
  p.add_argument("--valid-until-duration", default=None,
                 help="give up a queued request after this long, e.g. 6h")
  p.add_argument("--service-account", default=None,
                 help="service account of the TPU VMs (default: the Compute Engine default "
                 "account); it needs roles/storage.objectAdmin on the bucket")
  p.add_argument("--scopes", default=CLOUD_PLATFORM_SCOPE,
                 help="OAuth scopes of the VMs (default cloud-platform, so that IAM roles alone "
                 "decide access; '' leaves the TPU default)")


def create_flags(args: argparse.Namespace) -> tuple[str, ...]:
  """The extra `queued-resources create` flags from add_create_args' options."""
  if args.runtime_version is not None and not args.runtime_version.strip():
    raise KitError("--runtime-version is empty")
  extra = []
  if args.valid_until_duration:
    if not re.match(r"^([0-9]+[smhd])+$", args.valid_until_duration):
      raise KitError(f"bad --valid-until-duration {args.valid_until_duration!r}: expected e.g. "
                     "30m, 6h or 2d")
    extra.append(f"--valid-until-duration={args.valid_until_duration}")
  if args.service_account:
    extra.append(f"--service-account={args.service_account}")
  if args.scopes:
    extra.append(f"--scopes={args.scopes}")
  return tuple(extra)


def target(args: argparse.Namespace, role: str) -> Target:
  """Validates the common flags and returns the Target of one role."""
  name = check_name(args.name)
  zone = check_zone(args.zone)
  project = check_project(args.project)
  flag = "--train-type" if role == "train" else "--refresh-type"
  acc = accelerator(args.train_type if role == "train" else args.refresh_type, flag)
  return Target(name, role, zone, project, acc)


def main_guard(prog: str, fn: Callable[[], int]) -> int:
  """Runs a script's main and turns KitError into one clear line on stderr and exit code 2."""
  try:
    return int(fn() or 0)
  except KitError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130
