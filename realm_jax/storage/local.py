"""The local backend: plain files under a directory, atomic through temp file + fsync + rename,
create-only through a hard link, compare-and-swap under an advisory lock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pathlib
import shutil
import stat as stat_lib
import tempfile
from typing import Iterator

import google_crc32c

from realm_jax.storage.backend import (
  CHUNK,
  GenerationMismatch,
  ObjectExists,
  ObjectInfo,
  ObjectNotFound,
  content_token,
  crc32c_hex,
)

HIDDEN = ".realm-"  # prefix of our temp and lock files in local roots; never listed


def _read_umask() -> int:
  umask = os.umask(0o022)
  os.umask(umask)
  return umask


_UMASK = _read_umask()  # read once: os.umask is process-wide and racy between threads


def _is_non_directory(path: pathlib.Path) -> bool:
  """Whether something other than a directory is at `path` (one stat: no exists-then-is_dir race)."""
  try:
    return not stat_lib.S_ISDIR(path.stat().st_mode)
  except (FileNotFoundError, NotADirectoryError):
    return False


def _tmp_sibling(final: pathlib.Path, attempts: int = 5) -> tuple[int, str]:
  """A temp file in `final`'s directory (same filesystem, so rename/link is atomic).

  A concurrent delete of that directory (another publisher cleaning staged files) is retried:
  it shows as FileNotFoundError from mkstemp, or as FileExistsError from pathlib's
  `mkdir(exist_ok=True)` when the directory it found present is gone by the time it checks.
  A file in the way is an error at once; a directory that keeps vanishing is FileNotFoundError."""
  for _ in range(attempts):
    try:
      final.parent.mkdir(parents=True, exist_ok=True)
      fd, tmp = tempfile.mkstemp(prefix=f"{HIDDEN}tmp-", dir=final.parent)
      break
    except FileExistsError:
      if any(_is_non_directory(p) for p in (final.parent, *final.parent.parents)):
        raise
    except FileNotFoundError:
      pass
  else:
    raise FileNotFoundError(errno.ENOENT, "removed by a concurrent delete while writing", str(final.parent))
  os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; published files are shared
  return fd, tmp


@contextlib.contextmanager
def _flock(final: pathlib.Path) -> Iterator[None]:
  """Exclusive advisory lock next to `final`; released by the kernel if the process dies."""
  fd = os.open(final.parent / f"{HIDDEN}lock-{final.name}", os.O_CREAT | os.O_RDWR, 0o666)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)


def _ignore_missing(func, path, exc_info) -> None:
  """shutil.rmtree error handler: files a concurrent delete already removed are fine."""
  if not issubclass(exc_info[0], FileNotFoundError):
    raise exc_info[1]


class LocalBackend:
  """Plain files; atomic via temp file + fsync + rename, create-only via hard link."""

  def __init__(self, root: pathlib.Path):
    self.root = self.local_root = root

  def _p(self, key: str) -> pathlib.Path:
    return self.root / key if key else self.root

  def uri(self, key: str) -> str:
    return str(self._p(key))

  def stat(self, key: str) -> ObjectInfo | None:
    try:
      st = self._p(key).stat()
    except (FileNotFoundError, NotADirectoryError):
      return None
    return ObjectInfo(key, st.st_size) if stat_lib.S_ISREG(st.st_mode) else None

  def read(self, key: str, generation: int | None) -> bytes:
    try:
      data = self._p(key).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
      raise ObjectNotFound(f"{self.uri(key)}: no such file") from None
    if generation is not None and content_token(data) != generation:
      raise ObjectNotFound(f"{self.uri(key)}: changed since generation {generation} was read")
    return data

  def read_range(self, key: str, start: int, length: int, generation: int | None) -> bytes:
    try:
      with open(self._p(key), "rb") as f:
        f.seek(start)
        return f.read(length)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
      raise ObjectNotFound(f"{self.uri(key)}: no such file") from None

  def token(self, key: str) -> tuple[bytes | None, int]:
    try:
      data = self._p(key).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
      return None, 0
    return data, content_token(data)

  def _commit(self, tmp: str, key: str, if_generation_match: int | None) -> None:
    final = self._p(key)
    if if_generation_match is None:
      os.replace(tmp, final)
    elif if_generation_match == 0:
      try:
        os.link(tmp, final)  # atomic create-only: fails if `final` exists
      except FileExistsError:
        raise ObjectExists(f"{self.uri(key)}: already exists (create-only write)") from None
    else:
      with _flock(final):
        _, current = self.token(key)
        if current != if_generation_match:
          raise GenerationMismatch(
              f"{self.uri(key)}: changed since it was read (generation {if_generation_match}, "
              f"now {current or 'absent'})")
        os.replace(tmp, final)
    with contextlib.suppress(OSError):  # make the rename durable
      dfd = os.open(final.parent, os.O_RDONLY)
      try:
        os.fsync(dfd)
      finally:
        os.close(dfd)

  def _write(self, key: str, fill, if_generation_match: int | None) -> None:
    fd, tmp = _tmp_sibling(self._p(key))
    try:
      with os.fdopen(fd, "wb") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())
      self._commit(tmp, key, if_generation_match)
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)

  def write(self, key: str, data: bytes, if_generation_match: int | None) -> ObjectInfo:
    self._write(key, lambda f: f.write(data), if_generation_match)
    return ObjectInfo(key, len(data), None, crc32c_hex(data))

  def put_file(self, local: str, key: str, if_generation_match: int | None) -> ObjectInfo:
    checksum, size = google_crc32c.Checksum(), [0]

    def fill(f):
      with open(local, "rb") as src:
        while chunk := src.read(CHUNK):
          checksum.update(chunk)
          size[0] += len(chunk)
          f.write(chunk)

    self._write(key, fill, if_generation_match)
    return ObjectInfo(key, size[0], None, checksum.digest().hex())

  def get_file(self, key: str, local: str, generation: int | None) -> None:
    if generation is not None:
      pathlib.Path(local).write_bytes(self.read(key, generation))
      return
    try:
      with open(self._p(key), "rb") as src, open(local, "wb") as dst:
        while chunk := src.read(CHUNK):
          dst.write(chunk)
    except (FileNotFoundError, IsADirectoryError):
      raise ObjectNotFound(f"{self.uri(key)}: no such file") from None

  def find(self, key: str) -> list[str]:
    p = self._p(key)
    if p.is_file():
      return [key]
    out = []
    for dirpath, dirnames, filenames in os.walk(p):
      dirnames[:] = [d for d in dirnames if not d.startswith(HIDDEN)]
      rel = pathlib.Path(dirpath).relative_to(self.root).as_posix()
      out += [f if rel == "." else f"{rel}/{f}" for f in filenames if not f.startswith(HIDDEN)]
    return out

  @staticmethod
  def _has_files(d: pathlib.Path) -> bool:
    for _, dirnames, filenames in os.walk(d):
      dirnames[:] = [n for n in dirnames if not n.startswith(HIDDEN)]
      if any(not f.startswith(HIDDEN) for f in filenames):
        return True
    return False

  def ls(self, key: str) -> list[str]:
    """Like an object store: a directory is listed only if it holds a (visible) file."""
    try:
      children = list(self._p(key).iterdir())
    except (FileNotFoundError, NotADirectoryError):
      return []
    return [c.name for c in children
            if not c.name.startswith(HIDDEN) and (c.is_file() or self._has_files(c))]

  def rm(self, key: str) -> int:
    p = self._p(key)
    if p.is_file():
      with contextlib.suppress(FileNotFoundError):  # a concurrent delete got there first
        p.unlink()
      n = 1
    else:
      n = len(self.find(key))
      if p.is_dir():
        shutil.rmtree(p, onerror=_ignore_missing)
    parent = p.parent  # drop now-empty parents, as prefixes vanish on object stores
    while parent != self.root and self.root in parent.parents:
      try:
        parent.rmdir()
      except OSError:
        break
      parent = parent.parent
    return n

