"""Named pause points for crash tests: `REALM_JAX_FAULT_PAUSE=before_latest` freezes the
refresher right before it swaps `index/LATEST`, so a test can SIGKILL it in that narrow window.

The points, in the order a refresh passes them:
  restore          the checkpoint's retriever is restored, nothing embedded yet
  embedding        one embedding shard is staged, the next one is about to be written
  upload           the first file of the version is written, the rest are not
  before_manifest  every file is written, the manifest is not
  before_latest    the manifest is written, LATEST still names the previous version
  after_latest     LATEST names the new version; staging cleanup and pruning have not run
Without the variable nothing here is active (the refresher uses a plain `Storage`).
"""

from __future__ import annotations

import os
import sys
import threading
import time

from realm_jax.storage import ObjectInfo, Storage

ENV = "REALM_JAX_FAULT_PAUSE"
ENV_SECONDS = "REALM_JAX_FAULT_PAUSE_SECONDS"
POINTS = ("restore", "embedding", "upload", "before_manifest", "before_latest", "after_latest")


class FaultPoints:
  """The pause points named in the environment; each pauses once, then every later storage
  write of the process blocks too (a frozen process, as a kill would see it)."""

  def __init__(self, names: set[str], seconds: float):
    unknown = sorted(names - set(POINTS))
    if unknown:
      from realm_jax.errors import ConfigError
      raise ConfigError(f"{ENV}={','.join(sorted(names))}: unknown pause point(s) {unknown}; "
                        f"known: {', '.join(POINTS)}")
    self.names, self.seconds = names, seconds
    self._frozen = threading.Event()

  @classmethod
  def from_env(cls) -> "FaultPoints | None":
    names = {n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()}
    return cls(names, float(os.environ.get(ENV_SECONDS, "3600"))) if names else None

  def hit(self, name: str) -> None:
    """Pauses here if `name` was asked for (or a pause already began)."""
    if name in self.names:
      self.names.discard(name)
      print(f"[realm-jax refresh] FAULT PAUSE at {name} (pid {os.getpid()})", file=sys.stderr,
            flush=True)
      self._frozen.set()
    if self._frozen.is_set():
      time.sleep(self.seconds)


class PausingStorage(Storage):
  """A Storage that calls `FaultPoints.hit` before the writes that mark each point."""

  faults: FaultPoints
  index_prefix: str = "index"
  work_prefix: str = "index-work"

  @classmethod
  def wrap(cls, uri: str, faults: FaultPoints) -> "PausingStorage":
    storage = cls.open(uri)
    storage.faults = faults
    storage._staged = storage._uploaded = 0
    return storage

  def _before(self, path: str) -> None:
    if path.startswith(self.work_prefix + "/") and path.endswith(".npy"):
      self._staged += 1
      if self._staged >= 2:
        self.faults.hit("embedding")
    elif path == f"{self.index_prefix}/LATEST":
      self.faults.hit("before_latest")
    elif path.startswith(self.index_prefix + "/") and path.endswith("/manifest.json"):
      self.faults.hit("before_manifest")
    elif path.startswith(self.index_prefix + "/"):
      self._uploaded += 1
      if self._uploaded >= 2:
        self.faults.hit("upload")

  def write_bytes(self, path: str, data: bytes, **kwargs) -> ObjectInfo:
    self._before(path)
    info = super().write_bytes(path, data, **kwargs)
    if path == f"{self.index_prefix}/LATEST":
      self.faults.hit("after_latest")
    return info

  def put_file(self, local_file, path: str, **kwargs) -> ObjectInfo:
    self._before(path)
    return super().put_file(local_file, path, **kwargs)


def open_storage(uri: str) -> Storage:
  """`Storage.open(uri)`, or a PausingStorage when REALM_JAX_FAULT_PAUSE names pause points."""
  faults = FaultPoints.from_env()
  return Storage.open(uri) if faults is None else PausingStorage.wrap(uri, faults)
