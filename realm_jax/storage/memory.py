"""The `memory://` backend: fsspec's in-process store, for unit tests only (other processes do not
see it); a process-wide lock makes every operation atomic."""

from __future__ import annotations

import pathlib
import threading

import fsspec

from realm_jax.storage.backend import (
  GenerationMismatch,
  ObjectExists,
  ObjectInfo,
  ObjectNotFound,
  content_token,
  crc32c_hex,
)

_MEMORY_LOCK = threading.RLock()


class MemoryBackend:
  """fsspec's in-process memory filesystem; a process-wide lock makes every operation atomic."""

  local_root = None

  def __init__(self, base: str):
    self.fs = fsspec.filesystem("memory")
    self.base = base  # "/name/prefix"

  def _p(self, key: str) -> str:
    return f"{self.base}/{key}" if key else self.base

  def uri(self, key: str) -> str:
    return "memory:/" + self._p(key)

  def stat(self, key: str) -> ObjectInfo | None:
    p = self._p(key)
    with _MEMORY_LOCK:
      return ObjectInfo(key, self.fs.size(p)) if self.fs.isfile(p) else None

  def token(self, key: str) -> tuple[bytes | None, int]:
    p = self._p(key)
    with _MEMORY_LOCK:
      if not self.fs.isfile(p):
        return None, 0
      data = self.fs.cat_file(p)
    return data, content_token(data)

  def read(self, key: str, generation: int | None) -> bytes:
    data, token = self.token(key)
    if data is None:
      raise ObjectNotFound(f"{self.uri(key)}: no such object")
    if generation is not None and token != generation:
      raise ObjectNotFound(f"{self.uri(key)}: changed since generation {generation} was read")
    return data

  def read_range(self, key: str, start: int, length: int, generation: int | None) -> bytes:
    p = self._p(key)
    with _MEMORY_LOCK:
      if not self.fs.isfile(p):
        raise ObjectNotFound(f"{self.uri(key)}: no such object")
      return self.fs.cat_file(p, start=start, end=start + length)

  def write(self, key: str, data: bytes, if_generation_match: int | None) -> ObjectInfo:
    with _MEMORY_LOCK:
      if if_generation_match is not None:
        _, current = self.token(key)
        if if_generation_match == 0 and current:
          raise ObjectExists(f"{self.uri(key)}: already exists (create-only write)")
        if current != if_generation_match:
          raise GenerationMismatch(f"{self.uri(key)}: changed since it was read")
      self.fs.pipe_file(self._p(key), bytes(data))
    return ObjectInfo(key, len(data), None, crc32c_hex(data))

  def put_file(self, local: str, key: str, if_generation_match: int | None) -> ObjectInfo:
    return self.write(key, pathlib.Path(local).read_bytes(), if_generation_match)

  def get_file(self, key: str, local: str, generation: int | None) -> None:
    pathlib.Path(local).write_bytes(self.read(key, generation))

  def _rel(self, path: str) -> str:
    return path[len(self.base) + 1:]

  def find(self, key: str) -> list[str]:
    with _MEMORY_LOCK:
      return [self._rel(p) for p in self.fs.find(self._p(key))]

  def ls(self, key: str) -> list[str]:
    p = self._p(key)
    with _MEMORY_LOCK:
      if not self.fs.isdir(p):
        return []
      return [n.rstrip("/").rsplit("/", 1)[-1] for n in self.fs.ls(p, detail=False)]

  def rm(self, key: str) -> int:
    with _MEMORY_LOCK:
      files = self.find(key)
      for f in files:
        self.fs.rm_file(self._p(f))
    return len(files)

