"""Test doubles of the environment's storage: a backend that runs out of space after a byte budget
(ENOSPC, as a full disk answers), and the commands that make a directory read-only or cap the size
of files a child process may write (RLIMIT_FSIZE: the kernel answers EFBIG, the same OSError path
as a full disk, for writes that orbax/tensorstore make without our storage layer).
"""

from __future__ import annotations

import errno
import os
import resource
import signal

from realm_jax.storage import Backend, ObjectInfo, Storage


class FullDiskBackend:
  """Delegates to `inner` (a real `Backend`) until `budget` bytes have been written; every later
  write raises OSError(ENOSPC) after leaving nothing under its key, as a full disk would."""

  def __init__(self, inner: Backend, budget: int):
    self.inner, self.budget = inner, budget
    self.local_root = inner.local_root
    self.written = 0

  def __getattr__(self, name: str):  # uri, stat, read, token, get_file, find, ls, rm
    return getattr(self.inner, name)

  def _spend(self, key: str, size: int) -> None:
    if self.written + size > self.budget:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.inner.uri(key))
    self.written += size

  def write(self, key: str, data: bytes, if_generation_match: int | None) -> ObjectInfo:
    self._spend(key, len(data))
    return self.inner.write(key, data, if_generation_match)

  def put_file(self, local: str, key: str, if_generation_match: int | None) -> ObjectInfo:
    self._spend(key, os.path.getsize(local))
    return self.inner.put_file(local, key, if_generation_match)


def full_disk_storage(uri: str, budget: int) -> Storage:
  """`Storage.open(uri)` whose backend fails with ENOSPC once `budget` bytes are written."""
  real = Storage.open(uri)
  return Storage(real.root, FullDiskBackend(real.backend, budget))


def cap_file_size(max_bytes: int):
  """A `preexec_fn` for subprocess: files the child writes may not grow past `max_bytes` (writes
  beyond fail with EFBIG instead of the default SIGXFSZ kill)."""

  def limit() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

  return limit


def read_only_command(directory: str, argv: list[str]) -> list[str]:
  """`argv` run with `directory` read-only: a read-only bind mount in a private mount namespace
  when running as root (permissions do not stop root), else the directory made 0555 here."""
  if os.geteuid() != 0:
    os.chmod(directory, 0o555)
    return argv
  quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in argv)
  script = f"mount --bind '{directory}' '{directory}' && mount -o remount,ro,bind '{directory}' && exec {quoted}"
  return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
