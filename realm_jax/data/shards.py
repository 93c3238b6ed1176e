"""One corpus shard as bytes and back: `encode_shard` (a no-pickle `.npz`), `decode_shard` and
`BlockShard`, the column-wise view that yields `Block`s. The layout is in `data/corpus.py`."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from realm_jax.data.blocks import Block
from realm_jax.errors import RealmError

_RAGGED = ("title_ids", "body_ids", "sentences", "salient_spans", "titles", "texts")


class CorpusError(RealmError):
  """The corpus cannot be built as asked, or what is on storage is not a valid corpus."""


def _ragged(rows: Sequence[np.ndarray], dtype, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  splits = np.zeros(len(rows) + 1, np.int64)
  splits[1:] = np.cumsum([len(r) for r in rows])
  shape = (0,) if width is None else (0, width)
  flat = np.concatenate([np.asarray(r, dtype) for r in rows]) if rows else np.zeros(shape, dtype)
  return flat.astype(dtype, copy=False).reshape((-1,) if width is None else (-1, width)), splits


def encode_shard(blocks: Sequence[Block]) -> bytes:
  """The `.npz` bytes of a shard (no pickle; see the module docstring)."""
  arrays = {"block_ids": np.asarray([b.block_id for b in blocks], np.int64)}
  fields = {
      "title_ids": ([b.title_ids for b in blocks], np.int32, None),
      "body_ids": ([b.body_ids for b in blocks], np.int32, None),
      "sentences": ([b.sentences for b in blocks], np.int32, 2),
      "salient_spans": ([b.salient_spans for b in blocks], np.int32, 2),
      "titles": ([np.frombuffer(b.title.encode("utf-8"), np.uint8) for b in blocks], np.uint8, None),
      "texts": ([np.frombuffer(b.text.encode("utf-8"), np.uint8) for b in blocks], np.uint8, None),
  }
  for name, (rows, dtype, width) in fields.items():
    arrays[name], arrays[name + "_splits"] = _ragged(rows, dtype, width)
  arrays["body_offsets"], _ = _ragged([b.body_offsets for b in blocks], np.int32, 2)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


class BlockShard(Sequence[Block]):
  """One shard, column-wise (flat arrays + row splits); indexing yields `Block`s."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays
    self.block_ids = arrays["block_ids"]

  def __len__(self) -> int:
    return int(self.block_ids.shape[0])

  def _rows(self, name: str, splits: str | None = None) -> list[np.ndarray]:
    s = self.arrays[(splits or name) + "_splits"]
    flat = self.arrays[name]
    return [flat[s[i]:s[i + 1]] for i in range(len(self))]

  def _row(self, name: str, i: int, splits: str | None = None) -> np.ndarray:
    s = self.arrays[(splits or name) + "_splits"]
    return self.arrays[name][s[i]:s[i + 1]]

  @property
  def title_ids(self) -> list[np.ndarray]:
    return self._rows("title_ids")

  @property
  def body_ids(self) -> list[np.ndarray]:
    return self._rows("body_ids")

  @property
  def body_offsets(self) -> list[np.ndarray]:
    return self._rows("body_offsets", "body_ids")

  @property
  def sentences(self) -> list[np.ndarray]:
    return self._rows("sentences")

  @property
  def salient_spans(self) -> list[np.ndarray]:
    return self._rows("salient_spans")

  @property
  def titles(self) -> list[str]:
    return [r.tobytes().decode("utf-8") for r in self._rows("titles")]

  @property
  def texts(self) -> list[str]:
    return [r.tobytes().decode("utf-8") for r in self._rows("texts")]

  def __getitem__(self, i):  # type: ignore[override]
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    if not -len(self) <= i < len(self):
      raise IndexError(i)
    i %= len(self)
    return Block(
        block_id=int(self.block_ids[i]),
        title=self._row("titles", i).tobytes().decode("utf-8"),
        text=self._row("texts", i).tobytes().decode("utf-8"),
        title_ids=self._row("title_ids", i), body_ids=self._row("body_ids", i),
        body_offsets=self._row("body_offsets", i, "body_ids"), sentences=self._row("sentences", i),
        salient_spans=self._row("salient_spans", i))


def decode_shard(data: bytes, name: str = "shard") -> BlockShard:
  """Parses shard bytes written by `encode_shard`."""
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except (ValueError, OSError, EOFError) as e:
    raise CorpusError(f"{name}: not a valid corpus shard: {e}") from None
  needed = ["block_ids", "body_offsets"] + [f for n in _RAGGED for f in (n, n + "_splits")]
  missing = [k for k in needed if k not in arrays]
  if missing:
    raise CorpusError(f"{name}: corpus shard lacks arrays {missing}")
  return BlockShard(arrays)
