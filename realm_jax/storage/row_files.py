"""Row files: `.npy` matrices on storage that a process reads by row range, still verified.

The corpus token files and the index embedding files are `[rows, width]` `.npy` arrays whose rows
are spread over the devices of many processes; each process reads only its rows by byte range
(`Storage.read_range`). A whole-file checksum cannot check a range, so the writer records a
`RowFile`: where row 0 starts, the bytes per row, and a CRC32C per `chunk_rows` rows. A range read
fetches the chunks covering it (at most one chunk more on each side) and checks every one.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np

from realm_jax.storage.backend import ObjectNotFound, StorageError, crc32c_hex

CHUNK_ROWS = 512  # rows per checksummed chunk: 64 KB of 128-d float32 embeddings, ~290 KB of tokens
_CRC32C_POLY = 0x82F63B78  # reflected Castagnoli polynomial


class RowFileError(StorageError):
  """A row range is missing, truncated or fails its checksum; the message names the file."""


def npy_header_size(data: bytes) -> int:
  """Bytes before the array data in `.npy` bytes (where row 0 starts)."""
  buf = io.BytesIO(data)
  major, _ = np.lib.format.read_magic(buf)
  read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
  read(buf)
  return buf.tell()


def _gf2_times(mat: list[int], vec: int) -> int:
  out, i = 0, 0
  while vec:
    if vec & 1:
      out ^= mat[i]
    vec >>= 1
    i += 1
  return out


def _gf2_square(mat: list[int]) -> list[int]:
  return [_gf2_times(mat, mat[n]) for n in range(32)]


def crc32c_shift(length: int) -> list[int]:
  """The GF(2) operator that appends `length` zero bytes to a CRC32C register (zlib's
  crc32_combine construction): `crc32c_combine` applies it."""
  op = [_CRC32C_POLY] + [1 << n for n in range(31)]  # one zero bit
  op = _gf2_square(_gf2_square(op))  # four zero bits
  result = None
  while length:  # op: 2^k zero bytes at step k
    op = _gf2_square(op)
    if length & 1:
      result = op if result is None else [_gf2_times(op, result[n]) for n in range(32)]
    length >>= 1
  return result if result is not None else [1 << n for n in range(32)]


def crc32c_combine(crc1: int, crc2: int, shift: list[int]) -> int:
  """CRC32C of A + B from crc(A), crc(B) and `crc32c_shift(len(B))`."""
  return _gf2_times(shift, crc1) ^ crc2


@dataclasses.dataclass(frozen=True)
class RowFile:
  """How to read and verify row ranges of one `.npy` file (what its manifest entry records)."""

  path: str  # relative to the storage root (or to a published version)
  rows: int
  offset: int  # byte where row 0 starts
  row_bytes: int
  chunk_rows: int
  crc32c: tuple[str, ...]  # one per chunk of `chunk_rows` rows (the last may be shorter)
  generation: int | None = None  # GCS generation reads are pinned to, when known

  @classmethod
  def describe(cls, path: str, data: bytes, rows: int, chunk_rows: int = CHUNK_ROWS) -> "RowFile":
    """The entry of `.npy` bytes holding `rows` rows."""
    offset = npy_header_size(data)
    row_bytes = (len(data) - offset) // rows if rows else 0
    step = chunk_rows * row_bytes
    crcs = tuple(crc32c_hex(memoryview(data)[s:s + step]) for s in range(offset, len(data), step)) if step else ()
    return cls(path, rows, offset, row_bytes, chunk_rows, crcs)

  def to_json(self) -> dict[str, Any]:
    return {"offset": self.offset, "row_bytes": self.row_bytes, "chunk_rows": self.chunk_rows,
            "crc32c": list(self.crc32c)}

  @classmethod
  def from_json(cls, path: str, rows: int, obj: dict[str, Any], generation: int | None = None) -> "RowFile":
    """Parses an entry written by `to_json`; raises RowFileError naming `path` if it is inconsistent."""
    try:
      f = cls(path, int(rows), int(obj["offset"]), int(obj["row_bytes"]), int(obj["chunk_rows"]),
              tuple(str(c) for c in obj["crc32c"]), generation)
    except (KeyError, TypeError, ValueError) as e:
      raise RowFileError(f"{path}: malformed row-file entry ({e})") from None
    if f.chunk_rows < 1 or len(f.crc32c) != -(-f.rows // f.chunk_rows):
      raise RowFileError(f"{path}: {len(f.crc32c)} chunk checksums for {f.rows} rows of {f.chunk_rows}")
    return f

  @property
  def size(self) -> int:
    return self.offset + self.rows * self.row_bytes

  def read(self, storage, a: int, b: int, where: str | None = None) -> bytes:
    """The bytes of rows [a, b), every chunk they touch verified (`where`: the URI for messages)."""
    where = where or storage.uri(self.path)
    if not 0 <= a <= b <= self.rows:
      raise RowFileError(f"{where}: rows [{a}, {b}) outside [0, {self.rows})")
    if a == b:
      return b""
    c0, c1 = a // self.chunk_rows, -(-b // self.chunk_rows)
    start = self.offset + c0 * self.chunk_rows * self.row_bytes
    stop = self.offset + min(c1 * self.chunk_rows, self.rows) * self.row_bytes
    try:
      data = storage.read_range(self.path, start, stop - start, generation=self.generation)
    except (FileNotFoundError, ObjectNotFound):
      raise RowFileError(f"{where}: missing") from None
    if len(data) != stop - start:
      raise RowFileError(f"{where}: shorter than its manifest says (truncated)")
    step = self.chunk_rows * self.row_bytes
    for c in range(c0, c1):
      lo = (c - c0) * step
      if crc32c_hex(memoryview(data)[lo:lo + step]) != self.crc32c[c]:
        raise RowFileError(f"{where}: rows {c * self.chunk_rows}..{min((c + 1) * self.chunk_rows, self.rows) - 1} "
                           "fail their checksum (corrupt or overwritten)")
    lo = (a - c0 * self.chunk_rows) * self.row_bytes
    return data[lo:lo + (b - a) * self.row_bytes]

  def check_whole(self, storage, size: int, crc32c: str, where: str | None = None) -> int:
    """Checks that the chunk checksums, with the file's header (read here, verified to be the
    `.npy` header of `rows` rows), make up the whole file the manifest describes (`size` bytes,
    CRC32C `crc32c`): range reads verified chunk by chunk then verify against the manifest too.
    Returns the bytes read; raises RowFileError naming the file otherwise."""
    where = where or storage.uri(self.path)
    if size != self.size:
      raise RowFileError(f"{where}: row layout gives {self.size} bytes; manifest says {size} bytes")
    try:
      header = storage.read_range(self.path, 0, self.offset, generation=self.generation)
    except (FileNotFoundError, ObjectNotFound):
      raise RowFileError(f"{where}: missing") from None
    if len(header) != self.offset:
      raise RowFileError(f"{where}: shorter than its manifest says (truncated)")
    crc = int(crc32c_hex(header), 16)
    step = self.chunk_rows * self.row_bytes
    full = crc32c_shift(step) if self.crc32c else None
    for c, chunk in enumerate(self.crc32c):
      last = self.size - self.offset - c * step
      shift = full if last >= step else crc32c_shift(last)
      crc = crc32c_combine(crc, int(chunk, 16), shift)
    if f"{crc:08x}" != crc32c:
      raise RowFileError(f"{where}: header and row checksums give crc32c {crc:08x}; manifest says "
                         f"{size} bytes, crc32c {crc32c}")
    return len(header)
