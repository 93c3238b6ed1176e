"""One corpus shard as files and back: `encode_shard` (three no-pickle files), `decode_shard` and
`BlockShard`, the column-wise view that yields `Block`s. The layout is in `data/corpus.py`.

A shard is three files, so each role reads only what it uses:
  tokens   `.npy` [n, block_len] uint16 (int32 for vocabularies over 65,536 ids): every block's
           document-tower row `[CLS] title [SEP] body [SEP] pad...`, the one stored copy of its
           tokens. Title and body ids, and the encoder's `body [SEP]` row, are slices of it.
           Fixed-width rows, so a process reads just its rows by byte range.
  spans    `.npz` what training needs besides the tokens: block ids, title and body lengths, and
           the token ranges of each block's sentences and salient spans.
  text     `.npz` what reading needs: titles, texts, each body token's char offsets, and the
           sentences' and salient spans' char offsets (evaluate, ask, the demo, inspection).
Ragged fields are a flat array plus `<field>_splits` int64 [n+1] row boundaries (body offsets
are split by `body_len`).
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from realm_jax.data.blocks import Block
from realm_jax.data.features import SpecialIds, blocks_doc_inputs
from realm_jax.errors import RealmError

KINDS = ("tokens", "spans", "text")
_SPANS_RAGGED = ("sentence_tokens", "salient_tokens")
_TEXT_RAGGED = ("sentences", "salient_spans", "titles", "texts")


class CorpusError(RealmError):
  """The corpus cannot be built as asked, or what is on storage is not a valid corpus."""


def file_names(i: int, tag: str = "") -> dict[str, str]:
  """The names of shard `i`'s files, by kind (`kind-<tag>-NNNNN` for a build beside another corpus)."""
  t = f"{tag}-" if tag else ""
  return {"tokens": f"tokens-{t}{i:05d}.npy", "spans": f"spans-{t}{i:05d}.npz", "text": f"text-{t}{i:05d}.npz"}


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits (BERT's 30,522 do), else int32."""
  return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _ragged(rows: Sequence[np.ndarray], dtype, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  splits = np.zeros(len(rows) + 1, np.int64)
  splits[1:] = np.cumsum([len(r) for r in rows])
  shape = (0,) if width is None else (0, width)
  flat = np.concatenate([np.asarray(r, dtype) for r in rows]) if rows else np.zeros(shape, dtype)
  return flat.astype(dtype, copy=False).reshape((-1,) if width is None else (-1, width)), splits


def _splits(lengths: np.ndarray) -> np.ndarray:
  return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def encode_shard(blocks: Sequence[Block], block_len: int, specials: SpecialIds,
                 dtype: np.dtype = np.dtype(np.uint16)) -> dict[str, bytes]:
  """The files of a shard, by kind (see the module docstring). Every block must fit `block_len`."""
  title_len = np.asarray([len(b.title_ids) for b in blocks], np.int32)
  body_len = np.asarray([len(b.body_ids) for b in blocks], np.int32)
  too_long = np.flatnonzero(title_len + body_len + 3 > block_len)
  if len(too_long):
    b = blocks[int(too_long[0])]
    raise CorpusError(f"block {b.block_id}: {len(b.title_ids)} title + {len(b.body_ids)} body tokens do not fit "
                      f"a {block_len}-token row with [CLS] [SEP] [SEP]")
  ids = blocks_doc_inputs(blocks, block_len, specials)["input_ids"] if blocks else np.zeros((0, block_len))
  if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(dtype).max):
    raise CorpusError(f"token ids {ids.min()}..{ids.max()} do not fit {np.dtype(dtype).name}")
  buf = io.BytesIO()
  np.save(buf, ids.astype(dtype), allow_pickle=False)
  spans = {"block_ids": np.asarray([b.block_id for b in blocks], np.int64), "title_len": title_len,
           "body_len": body_len}
  for name in _SPANS_RAGGED:
    spans[name], spans[name + "_splits"] = _ragged([getattr(b, name) for b in blocks], np.int32, 2)
  text = {}
  fields = {
      "sentences": ([b.sentences for b in blocks], np.int32, 2),
      "salient_spans": ([b.salient_spans for b in blocks], np.int32, 2),
      "titles": ([np.frombuffer(b.title.encode("utf-8"), np.uint8) for b in blocks], np.uint8, None),
      "texts": ([np.frombuffer(b.text.encode("utf-8"), np.uint8) for b in blocks], np.uint8, None),
  }
  for name, (rows, dt, width) in fields.items():
    text[name], text[name + "_splits"] = _ragged(rows, dt, width)
  text["body_offsets"], _ = _ragged([b.body_offsets for b in blocks], np.int32, 2)
  return {"tokens": buf.getvalue(), "spans": _npz(spans), "text": _npz(text)}


class BlockShard(Sequence[Block]):
  """One shard (or a contiguous run of blocks), column-wise; indexing yields `Block`s.

  `tokens` [n, L] are the document-tower rows; `spans` the training arrays; `text` the reading
  arrays, or None for a training view (its blocks have `text=None`)."""

  def __init__(self, tokens: np.ndarray, spans: dict[str, np.ndarray], text: dict[str, np.ndarray] | None):
    self.tokens, self.spans, self.text = tokens, spans, text
    self.block_ids = spans["block_ids"]
    self.title_len = spans["title_len"].astype(np.int64)
    self.body_len = spans["body_len"].astype(np.int64)
    self._body_splits = _splits(self.body_len)

  def __len__(self) -> int:
    return int(self.block_ids.shape[0])

  @property
  def block_len(self) -> int:
    return int(self.tokens.shape[1])

  def doc_inputs(self, block_len: int, specials: SpecialIds) -> dict[str, np.ndarray]:
    """Document-tower inputs `[n, block_len]` of every block, vectorised over the token rows."""
    total = self.title_len + self.body_len + 3
    pos = np.arange(max(block_len, self.block_len))[None, :]
    if block_len >= self.block_len:
      ids = np.full((len(self), block_len), specials.pad_id, np.int32)
      ids[:, :self.block_len] = self.tokens
      mask = pos < total[:, None]
      types = (pos >= (self.title_len + 2)[:, None]) & mask
      return {"input_ids": ids, "attention_mask": mask.astype(np.int32), "token_type_ids": types.astype(np.int32)}
    # Shorter rows than stored: re-pack title and body (truncating the body first, as doc_inputs does).
    from realm_jax.data.features import ragged_doc_inputs
    pos = pos[:, :self.block_len]
    title = (pos >= 1) & (pos < (1 + self.title_len)[:, None])
    body = (pos >= (self.title_len + 2)[:, None]) & (pos < (total - 1)[:, None])
    return ragged_doc_inputs(self.tokens[title].astype(np.int32), _splits(self.title_len),
                             self.tokens[body].astype(np.int32), _splits(self.body_len), block_len, specials)

  def _ragged_row(self, arrays: dict, name: str, i: int) -> np.ndarray:
    s = arrays[name + "_splits"]
    return arrays[name][s[i]:s[i + 1]]

  def title_ids_of(self, i: int) -> np.ndarray:
    return self.tokens[i, 1:1 + self.title_len[i]].astype(np.int32)

  def body_ids_of(self, i: int) -> np.ndarray:
    t = self.title_len[i]
    return self.tokens[i, t + 2:t + 2 + self.body_len[i]].astype(np.int32)

  @property
  def title_ids(self) -> list[np.ndarray]:
    return [self.title_ids_of(i) for i in range(len(self))]

  @property
  def body_ids(self) -> list[np.ndarray]:
    return [self.body_ids_of(i) for i in range(len(self))]

  @property
  def titles(self) -> list[str]:
    return [self._ragged_row(self.text, "titles", i).tobytes().decode("utf-8") for i in range(len(self))]

  @property
  def texts(self) -> list[str]:
    return [self._ragged_row(self.text, "texts", i).tobytes().decode("utf-8") for i in range(len(self))]

  def __getitem__(self, i):  # type: ignore[override]
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    if not -len(self) <= i < len(self):
      raise IndexError(i)
    i %= len(self)
    text = {}
    if self.text is not None:
      text = {"title": self._ragged_row(self.text, "titles", i).tobytes().decode("utf-8"),
              "text": self._ragged_row(self.text, "texts", i).tobytes().decode("utf-8"),
              "body_offsets": self.text["body_offsets"][self._body_splits[i]:self._body_splits[i + 1]],
              "sentences": self._ragged_row(self.text, "sentences", i),
              "salient_spans": self._ragged_row(self.text, "salient_spans", i)}
    return Block(
        block_id=int(self.block_ids[i]), title=text.get("title"), text=text.get("text"),
        title_ids=self.title_ids_of(i), body_ids=self.body_ids_of(i), body_offsets=text.get("body_offsets"),
        sentences=text.get("sentences"), salient_spans=text.get("salient_spans"),
        sentence_tokens=self._ragged_row(self.spans, "sentence_tokens", i),
        salient_tokens=self._ragged_row(self.spans, "salient_tokens", i))


def _load_npz(data: bytes, name: str, needed: Sequence[str]) -> dict[str, np.ndarray]:
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except (ValueError, OSError, EOFError) as e:
    raise CorpusError(f"{name}: not a valid corpus shard file: {e}") from None
  missing = [k for k in needed if k not in arrays]
  if missing:
    raise CorpusError(f"{name}: corpus shard file lacks arrays {missing}")
  return arrays


def decode_tokens(data: bytes, name: str, rows: int | None = None, block_len: int | None = None) -> np.ndarray:
  """The `[n, L]` token rows of a tokens file, shape checked when `rows` / `block_len` are given."""
  try:
    tokens = np.load(io.BytesIO(data), allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise CorpusError(f"{name}: not a valid token file: {e}") from None
  if tokens.ndim != 2 or tokens.dtype not in (np.uint16, np.int32) or \
      (rows is not None and tokens.shape[0] != rows) or (block_len is not None and tokens.shape[1] != block_len):
    raise CorpusError(f"{name}: token rows {tokens.dtype} {tokens.shape}, expected uint16/int32 "
                      f"[{rows}, {block_len}]")
  return tokens


def decode_spans(data: bytes, name: str) -> dict[str, np.ndarray]:
  return _load_npz(data, name, ["block_ids", "title_len", "body_len"] +
                   [f for n in _SPANS_RAGGED for f in (n, n + "_splits")])


def decode_text(data: bytes, name: str) -> dict[str, np.ndarray]:
  return _load_npz(data, name, ["body_offsets"] + [f for n in _TEXT_RAGGED for f in (n, n + "_splits")])


def decode_shard(files: dict[str, bytes], name: str = "shard") -> BlockShard:
  """Parses the files written by `encode_shard` (`text` may be absent: a training view)."""
  spans = decode_spans(files["spans"], f"{name} (spans)")
  tokens = decode_tokens(files["tokens"], f"{name} (tokens)", len(spans["block_ids"]))
  text = decode_text(files["text"], f"{name} (text)") if "text" in files else None
  return BlockShard(tokens, spans, text)
