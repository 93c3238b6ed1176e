"""A test double for the refresher's crash tests: a storage backend that pauses at named points of
a refresh, so a test can SIGKILL the refresher inside a narrow window of a publish.

`python -m tests.helpers.pausing_refresher <realm-jax refresh arguments>` runs the real
`realm-jax refresh` on a `Storage` whose backend is a `PausingBackend` around the real one, when
`REALM_JAX_FAULT_PAUSE` names pause points (comma-separated). The points, in the order a refresh
passes them (each recognised from the storage writes the refresher makes):
  restore          the checkpoint's retriever is restored, nothing embedded yet (before embed.json)
  embedding        one embedding shard is staged, the next one is about to be written
  upload           the first file of the version is written, the rest are not
  before_manifest  every file is written, the manifest is not
  before_latest    the manifest is written, LATEST still names the previous version
  after_latest     LATEST names the new version; staging cleanup and pruning have not run
Each pauses once (REALM_JAX_FAULT_PAUSE_SECONDS, default 3600), and every later write of the
process pauses too: a frozen process, as a kill would find it.

In a multi-process refresher (a `jax.distributed` job) every process counts its own writes: the
points `restore`, `embedding` and `upload` are passed by each process (its own staged shards, its
own files of the version); `before_manifest`, `before_latest` and `after_latest` by process 0 only,
the one that commits. `REALM_JAX_FAULT_PAUSE_PROCESS=N` makes only the process whose
`jax.process_index()` is N pause (the others run on, until a barrier makes them wait for it);
unset, every process pauses at the points it passes.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from realm_jax import layout, logs
from realm_jax.cli import refresh as refresh_cli
from realm_jax.cli.main import build_parser
from realm_jax.retrieval.embed import INFO_FILE
from realm_jax.storage import Backend, ObjectInfo, Storage

ENV = "REALM_JAX_FAULT_PAUSE"
ENV_SECONDS = "REALM_JAX_FAULT_PAUSE_SECONDS"
ENV_PROCESS = "REALM_JAX_FAULT_PAUSE_PROCESS"
POINTS = ("restore", "embedding", "upload", "before_manifest", "before_latest", "after_latest")


class FaultPoints:
  """The pause points asked for; `hit(name)` pauses at the first one reached, and at every later hit.
  With `process` set, only that JAX process pauses (checked at the first hit: by then the
  refresher has joined its job)."""

  def __init__(self, names: set[str], seconds: float, process: int | None = None):
    unknown = sorted(names - set(POINTS))
    if unknown:
      raise SystemExit(f"{ENV}: unknown pause point(s) {unknown}; known: {', '.join(POINTS)}")
    self.names, self.seconds, self.process = set(names), seconds, process
    self._frozen = threading.Event()

  def hit(self, name: str) -> None:
    if self.process is not None:
      if _process_index() != self.process:
        self.names.clear()  # not the process asked to pause: never pauses
      self.process = None
    if name in self.names:
      self.names.discard(name)
      print(f"FAULT PAUSE at {name} (pid {os.getpid()}, process {_process_index()})", file=sys.stderr, flush=True)
      self._frozen.set()
    if self._frozen.is_set():
      time.sleep(self.seconds)


def _process_index() -> int:
  import jax
  return jax.process_index() if jax.distributed.is_initialized() else 0


class PausingBackend:
  """Delegates every operation to `inner` (a real `Backend`); calls `faults.hit` before (or after)
  the writes that mark each point."""

  def __init__(self, inner: Backend, faults: FaultPoints):
    self.inner, self.faults = inner, faults
    self.local_root = inner.local_root
    self.staged = self.uploaded = 0

  def __getattr__(self, name: str):  # uri, stat, read, token, get_file, find, ls, rm
    return getattr(self.inner, name)

  def _before(self, key: str) -> None:
    work, index = layout.INDEX_WORK + "/", layout.INDEX + "/"
    if key.startswith(work) and key.endswith("/" + INFO_FILE):
      self.faults.hit("restore")
    elif key.startswith(work) and key.endswith(".npy"):
      self.staged += 1
      if self.staged >= 2:
        self.faults.hit("embedding")
    elif key == index + "LATEST":
      self.faults.hit("before_latest")
    elif key.startswith(index) and key.endswith("/manifest.json"):
      self.faults.hit("before_manifest")
    elif key.startswith(index):
      self.uploaded += 1
      if self.uploaded >= 2:
        self.faults.hit("upload")

  def write(self, key: str, data: bytes, if_generation_match: int | None) -> ObjectInfo:
    self._before(key)
    info = self.inner.write(key, data, if_generation_match)
    if key == layout.INDEX + "/LATEST":
      self.faults.hit("after_latest")
    return info

  def put_file(self, local: str, key: str, if_generation_match: int | None) -> ObjectInfo:
    self._before(key)
    return self.inner.put_file(local, key, if_generation_match)


def pausing_storage(uri: str, faults: FaultPoints) -> Storage:
  """`Storage.open(uri)` with its backend wrapped in a PausingBackend."""
  real = Storage.open(uri)
  return Storage(real.root, PausingBackend(real.backend, faults))


def main(argv: list[str]) -> int:
  args = build_parser().parse_args(["refresh", *argv])
  logs.configure(getattr(args, "log_level", "info"))
  names = {n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()}
  process = os.environ.get(ENV_PROCESS, "").strip()
  faults = FaultPoints(names, float(os.environ.get(ENV_SECONDS, "3600")), int(process) if process else None)
  return refresh_cli.run(args, storage=pausing_storage(args.storage, faults) if names else None)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
