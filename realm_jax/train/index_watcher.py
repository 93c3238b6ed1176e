"""The trainer's view of the index: the version in use on the mesh, and a thread that loads newer ones.

`IndexWatcher` polls `index/LATEST` off the critical path, loads a newer version with the
trainer's loader (this process's rows only, each chunk verified) and hands it to the loop, which
swaps it in between steps (`Trainer._maybe_swap_index`). A version that fails to load is logged
once and skipped; the trainer keeps the index it has.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable

from realm_jax import layout, publish
from realm_jax.errors import RealmError
from realm_jax.logs import RunLog
from realm_jax.retrieval import index as index_lib, mips
from realm_jax.storage import Storage


@dataclasses.dataclass
class ActiveIndex:
  """The index version the step retrieves from, placed on the mesh (and its ScaNN searcher)."""

  info: index_lib.IndexInfo
  on_mesh: mips.RowShardedEmbeddings | None  # None with a ScaNN searcher (retrieval on the host)
  searcher: Any = None  # ScaNN, for cfg.retrieval == "scann"


class IndexWatcher(threading.Thread):
  """Polls `index/LATEST`; loads and verifies a newer version off the critical path.

  The loop calls `take()` between steps; a bad version is logged and skipped (the trainer keeps
  its current index).
  """

  def __init__(self, storage: Storage, load: Callable[[str], tuple[Any, Any]], current: str, poll_s: float,
               log: RunLog):
    super().__init__(daemon=True, name="realm-index-watcher")
    self.storage, self.load, self.poll_s, self.log = storage, load, poll_s, log
    self.current = current
    self._ready: tuple[Any, Any] | None = None
    self._loading: str | None = None  # the version the thread is reading now
    self._lock = threading.Condition()
    self._stopping = threading.Event()
    self.rejected: list[str] = []

  def run(self) -> None:
    while not self._stopping.wait(self.poll_s):
      info = None
      try:
        info = index_lib.latest_index_info(self.storage)
        with self._lock:
          if info is None or info.version == self.current or info.version in self.rejected:
            continue
          self._loading = info.version
        t0 = time.perf_counter()
        try:
          ready = self.load(info.version)
        finally:
          with self._lock:
            self._loading = None
            self._lock.notify_all()
        with self._lock:
          self._ready = ready
          self.current = info.version
        self.log(f"index watcher: loaded {info.version} (checkpoint step {info.step}) in "
                 f"{time.perf_counter() - t0:.1f}s; swapping in at the next step")
      except RealmError as e:
        bad = getattr(e, "version", None) or (info.version if info else self._latest_name())
        if bad not in self.rejected:
          self.rejected.append(bad)
          self.log.warning(f"index watcher: refused index version {bad}: {e}; keeping the current index")
      except Exception as e:  # storage hiccups: try again at the next poll
        self.log.warning(f"index watcher: {type(e).__name__}: {e}")

  def _latest_name(self) -> str:
    """The version LATEST names, read raw (for log lines when its manifest is unreadable)."""
    try:
      return str(self.storage.read_json(f"{layout.INDEX}/{publish.LATEST}").get("version", "?"))
    except Exception:  # noqa: BLE001 - only for a log line
      return "?"

  def take(self) -> tuple[Any, Any] | None:
    """The version loaded since the last call (and its searcher), or None."""
    with self._lock:
      ready, self._ready = self._ready, None
    return ready

  def ready_version(self) -> str | None:
    """The version loaded and not yet handed over (None if none), without handing it over."""
    with self._lock:
      return self._ready[0].info.version if self._ready is not None else None

  def load_now(self, version: str) -> tuple[Any, Any]:
    """`version` now (the version every process swaps to): the thread's read of it if one is under
    way or done, else a read here that the thread will not repeat. Each process thus reads a
    version's rows once."""
    with self._lock:
      while self._loading == version:
        self._lock.wait()
      if self._ready is not None and self._ready[0].info.version == version:
        ready, self._ready = self._ready, None
        return ready
      if self._ready is not None and publish.version_key(self._ready[0].info.version) < publish.version_key(version):
        self._ready = None  # an older version nobody will swap to: free its rows
      self.current = version
    return self.load(version)

  def stop(self) -> None:
    self._stopping.set()
