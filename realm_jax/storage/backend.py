"""What a storage backend is: the `Backend` protocol, `ObjectInfo`, the errors, and checksums.

A backend does the primitive operations of one kind of store on keys relative to its root
(`index/000001/emb.npy`; "" is the root). `Storage` (`root.py`) validates paths and builds the
public API on top; the backends are `local.py` (files), `memory.py` (tests) and `gcs.py`.

Generations: on GCS the object generation; elsewhere a 63-bit content token. Either way 0 means
"absent", so `write(key, data, if_generation_match=token(key)[1])` is a compare-and-swap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from typing import Protocol

import google_crc32c

from realm_jax.errors import RealmError

CHUNK = 8 << 20  # bytes per read when streaming files


class StorageError(RealmError):
  """A storage operation failed; the message names the URI."""


class ObjectNotFound(StorageError, FileNotFoundError):
  """The object does not exist (or not at the requested generation)."""


class ObjectExists(StorageError, FileExistsError):
  """A create-only write found an existing object."""


class GenerationMismatch(StorageError):
  """A compare-and-swap write lost: the object changed since it was read."""



@dataclasses.dataclass(frozen=True)
class ObjectInfo:
  """What a write or stat knows about one object. `generation` is None on local/memory stats."""

  path: str
  size: int
  generation: int | None = None
  crc32c: str | None = None  # 8 lowercase hex digits (big-endian CRC32C), when known


def crc32c_hex(data: bytes | memoryview) -> str:
  """CRC32C of `data` as 8 hex digits (the checksum GCS keeps for every object)."""
  return f"{google_crc32c.value(bytes(data)):08x}"


def file_crc32c(path: str | os.PathLike) -> tuple[int, str]:
  """(size, crc32c hex) of a local file, read in chunks so memory stays bounded."""
  checksum, size = google_crc32c.Checksum(), 0
  with open(path, "rb") as f:
    while chunk := f.read(CHUNK):
      checksum.update(chunk)
      size += len(chunk)
  return size, checksum.digest().hex()



def content_token(data: bytes) -> int:
  """Local/memory stand-in for a GCS generation: nonzero, changes whenever the content does."""
  return (int.from_bytes(hashlib.sha256(data).digest()[:8], "big") >> 1) | 1


class Backend(Protocol):
  """The primitive operations of one store. `if_generation_match`: None = unconditional, 0 =
  create-only (ObjectExists if present), N = only if the object is at generation N
  (GenerationMismatch otherwise). Writes are atomic: readers see the old object or the new one."""

  local_root: pathlib.Path | None  # the root's directory on this machine's disk; None for object stores

  def uri(self, key: str) -> str:
    """Absolute URI of `key` for other libraries (orbax, tensorstore): gs://..., /abs/path."""

  def stat(self, key: str) -> ObjectInfo | None:
    """Size (and on GCS generation + crc32c) of the object at `key`, or None."""

  def read(self, key: str, generation: int | None) -> bytes:
    """The object's bytes (exactly `generation` when given), else ObjectNotFound."""

  def read_range(self, key: str, start: int, length: int, generation: int | None) -> bytes:
    """`length` bytes from offset `start` (fewer at the end of the object), else ObjectNotFound.
    `generation` pins the read on GCS; local and memory objects are written once (create-only)
    and callers verify ranges by their own checksums."""

  def token(self, key: str) -> tuple[bytes | None, int]:
    """(bytes, generation) for a later compare-and-swap; (None, 0) when absent."""

  def write(self, key: str, data: bytes, if_generation_match: int | None) -> ObjectInfo:
    """Writes `data` atomically under the precondition."""

  def put_file(self, local: str, key: str, if_generation_match: int | None) -> ObjectInfo:
    """Uploads a local file (streamed) atomically under the precondition."""

  def get_file(self, key: str, local: str, generation: int | None) -> None:
    """Downloads the object into the local file `local`."""

  def find(self, key: str) -> list[str]:
    """Every object at or under `key`, as keys."""

  def ls(self, key: str) -> list[str]:
    """Names of the immediate children of `key` (objects and non-empty prefixes)."""

  def rm(self, key: str) -> int:
    """Deletes the object or everything under the prefix `key`; returns how many went."""

