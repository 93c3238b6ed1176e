"""`CorpusReader`: a built corpus read back, by shard or by row range, every byte verified.

What each role reads (the layout is in `data/corpus.py`, the files in `data/shards.py`):
- the trainer's device tables and the refresher: `token_rows(lo, hi)`, byte ranges of the token
  files, each covering chunk checked against its CRC32C in the manifest;
- the trainer's input pipeline: `training_view(lo, hi)`, the token rows and span arrays of its own
  blocks (no text);
- evaluate, ask, the demo and inspection: `read_shard(i)` / `get_blocks(ids)`, with text.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator

import numpy as np

from realm_jax.data.blocks import Block
from realm_jax.data.shards import BlockShard, CorpusError, decode_spans, decode_text, decode_tokens
from realm_jax.data.tokenizer import Tokenizer, tokenizer_from_files
from realm_jax.storage import ObjectNotFound
from realm_jax.storage.row_files import RowFile, RowFileError

FORMAT = "realm-jax-corpus"
VERSION = 2
MANIFEST = "manifest.json"


def open_storage(storage):
  if hasattr(storage, "read_bytes"):
    return storage
  from realm_jax.storage import Storage

  return Storage.open(storage)


def _slice_ragged(arrays: dict[str, np.ndarray], names: Iterable[str], a: int, b: int) -> dict[str, np.ndarray]:
  """Rows [a, b) of ragged fields (flat + `_splits`), splits rebased to 0."""
  out = {}
  for name in names:
    s = arrays[name + "_splits"]
    out[name] = arrays[name][s[a]:s[b]]
    out[name + "_splits"] = s[a:b + 1] - s[a]
  return out


class CorpusReader:
  """Reads a built corpus: manifest checked on open, each file (or row chunk) verified on read."""

  def __init__(self, storage, prefix: str = "corpus", cache_shards: int = 2):
    self.storage = open_storage(storage)
    self.prefix = prefix.strip("/")
    path = f"{self.prefix}/{MANIFEST}"
    self._where = self.storage.uri(path)
    if not self.storage.exists(path):
      raise CorpusError(f"{self._where}: no corpus manifest (build one with `realm-jax corpus build`)")
    self.manifest = self.storage.read_json(path)
    self._check_manifest()
    self._starts = np.asarray([s["first_block"] for s in self.shards], np.int64)
    self._cache: dict[tuple[int, bool], BlockShard] = {}
    self._cache_size = cache_shards

  def _check_manifest(self) -> None:
    m = self.manifest
    if not isinstance(m, dict) or m.get("format") != FORMAT:
      raise CorpusError(f"{self._where}: not a realm-jax corpus manifest")
    if m.get("version") == 1:
      root = self.storage.uri("")
      raise CorpusError(f"{self._where}: a format-1 corpus (one shard-*.npz per shard); convert it in place with "
                        f"`realm-jax corpus convert --storage {root} --prefix {self.prefix}`")
    if m.get("version") != VERSION:
      raise CorpusError(f"{self._where}: corpus format version {m.get('version')} (this code reads {VERSION})")
    if m.get("token_dtype") not in ("uint16", "int32"):
      raise CorpusError(f"{self._where}: token_dtype {m.get('token_dtype')!r}, expected uint16 or int32")
    expected = 0
    for i, shard in enumerate(m.get("shards", [])):
      if shard.get("first_block") != expected or shard.get("num_blocks", 0) < 1:
        raise CorpusError(f"{self._where}: shard {i} starts at block {shard.get('first_block')}, expected {expected}")
      tokens = shard.get("tokens", {})
      chunks = -(-shard["num_blocks"] // max(1, tokens.get("chunk_rows", 1)))
      if (tokens.get("row_bytes") != m["block_len"] * np.dtype(m["token_dtype"]).itemsize
          or len(tokens.get("crc32c", ())) != chunks
          or tokens.get("size") != tokens.get("offset", 0) + shard["num_blocks"] * tokens.get("row_bytes", 0)):
        raise CorpusError(f"{self._where}: shard {i}'s token file entry is inconsistent with its "
                          f"{shard['num_blocks']} rows of {m['block_len']} {m['token_dtype']} tokens")
      expected += shard["num_blocks"]
    if expected != m.get("num_blocks"):
      raise CorpusError(f"{self._where}: shards hold {expected} blocks, manifest says {m.get('num_blocks')}")

  @property
  def shards(self) -> list[dict]:
    return self.manifest["shards"]

  @property
  def num_blocks(self) -> int:
    return int(self.manifest["num_blocks"])

  @property
  def num_shards(self) -> int:
    return len(self.shards)

  @property
  def block_len(self) -> int:
    return int(self.manifest["block_len"])

  @property
  def token_dtype(self) -> np.dtype:
    return np.dtype(self.manifest["token_dtype"])

  def tokenizer(self) -> Tokenizer:
    """The tokenizer the corpus was built with (from its own files, checksums verified)."""
    files = {}
    where = f"{self.prefix}/{self.manifest['tokenizer'].get('dir', 'tokenizer')}"
    for name, info in self.manifest["tokenizer"]["files"].items():
      data = self.storage.read_bytes(f"{where}/{name}")
      if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise CorpusError(f"{self.storage.uri(f'{where}/{name}')}: checksum mismatch")
      files[name] = data
    return tokenizer_from_files(files)

  def check_model(self, vocab_size: int, block_len: int, tok: Tokenizer | None = None) -> None:
    """Raises CorpusError naming the corpus manifest if a model with `vocab_size` ids and blocks of
    `block_len` tokens cannot read this corpus (its token ids would index past the embeddings)."""
    tok = tok or self.tokenizer()
    if tok.vocab_size > vocab_size:
      raise CorpusError(f"{self._where}: the corpus tokenizer has {tok.vocab_size} ids but the model's vocab_size "
                        f"is {vocab_size}")
    if self.block_len > block_len:
      raise CorpusError(f"{self._where}: corpus blocks are up to {self.block_len} tokens, model.block_len is "
                        f"{block_len}")

  # -- whole files --------------------------------------------------------------------------------

  def _check_shard_index(self, i: int) -> dict:
    if not 0 <= i < self.num_shards:
      raise CorpusError(f"{self._where}: no shard {i} (the corpus has {self.num_shards})")
    return self.shards[i]

  def read_file(self, i: int, kind: str) -> bytes:
    """The bytes of shard `i`'s `kind` file (tokens | spans | text), size and sha256 verified."""
    info = self._check_shard_index(i)[kind]
    path = f"{self.prefix}/{info['path']}"
    where = self.storage.uri(path)
    try:
      data = self.storage.read_bytes(path)
    except (FileNotFoundError, ObjectNotFound):
      raise CorpusError(f"{where}: shard file listed in the manifest is missing") from None
    if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
      raise CorpusError(f"{where}: size/sha256 differ from the manifest (corrupt or overwritten shard file)")
    return data

  def _spans(self, i: int) -> dict[str, np.ndarray]:
    where = self.storage.uri(f"{self.prefix}/{self.shards[i]['spans']['path']}")
    spans = decode_spans(self.read_file(i, "spans"), where)
    first, n = self.shards[i]["first_block"], self.shards[i]["num_blocks"]
    if not np.array_equal(spans["block_ids"], np.arange(first, first + n)):
      raise CorpusError(f"{where}: block ids differ from the manifest's range")
    return spans

  def read_shard(self, i: int, text: bool = True) -> BlockShard:
    """Shard `i` (0 <= i < num_shards), verified against the manifest; `text=False` skips the text
    file (a training view: blocks without `text`)."""
    self._check_shard_index(i)
    key = (i, text)
    if key in self._cache:
      return self._cache[key]
    info = self.shards[i]
    tokens = decode_tokens(self.read_file(i, "tokens"), self.storage.uri(f"{self.prefix}/{info['tokens']['path']}"),
                           info["num_blocks"], self.block_len)
    texts = decode_text(self.read_file(i, "text"), self.storage.uri(f"{self.prefix}/{info['text']['path']}")) \
        if text else None
    shard = BlockShard(tokens, self._spans(i), texts)
    if len(self._cache) >= self._cache_size:
      self._cache.pop(next(iter(self._cache)))
    self._cache[key] = shard
    return shard

  def shard_of(self, block_id: int) -> int:
    """Index of the shard holding `block_id`."""
    if not 0 <= block_id < self.num_blocks:
      raise CorpusError(f"{self._where}: block id {block_id} out of range [0, {self.num_blocks})")
    return int(np.searchsorted(self._starts, block_id, side="right") - 1)

  def get_blocks(self, ids: Iterable[int]) -> list[Block]:
    """Blocks by id, in the order asked (random access, shard by shard), with text."""
    ids = [int(i) for i in ids]
    out: list[Block | None] = [None] * len(ids)
    by_shard: dict[int, list[int]] = {}
    for pos, block_id in enumerate(ids):
      by_shard.setdefault(self.shard_of(block_id), []).append(pos)
    for s, positions in sorted(by_shard.items()):
      shard = self.read_shard(s)
      for pos in positions:
        out[pos] = shard[ids[pos] - self.shards[s]["first_block"]]
    return out  # type: ignore[return-value]

  def iter_blocks(self, text: bool = True) -> Iterator[Block]:
    """Every block in id order, one shard in memory at a time."""
    for i in range(self.num_shards):
      yield from self.read_shard(i, text)

  # -- row ranges -------------------------------------------------------------------------------

  def _shard_rows(self, i: int, a: int, b: int) -> np.ndarray:
    """Rows [a, b) of shard `i`'s token file, read by byte range; every chunk read is verified."""
    info = self.shards[i]["tokens"]
    path = f"{self.prefix}/{info['path']}"
    try:
      data = RowFile.from_json(path, self.shards[i]["num_blocks"], info).read(self.storage, a, b)
    except RowFileError as e:
      raise CorpusError(f"token file {e}") from None
    return np.frombuffer(data, self.token_dtype).reshape(-1, self.block_len)

  def _shards_in(self, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
    """(shard, first row in it, stop row in it) of the shards overlapping blocks [lo, hi)."""
    if not 0 <= lo <= hi <= self.num_blocks:
      raise CorpusError(f"{self._where}: block range [{lo}, {hi}) is outside [0, {self.num_blocks})")
    if lo == hi:
      return
    for i in range(self.shard_of(lo), self.shard_of(hi - 1) + 1):
      first, n = self.shards[i]["first_block"], self.shards[i]["num_blocks"]
      yield i, max(lo, first) - first, min(hi, first + n) - first

  def token_rows(self, lo: int, hi: int) -> np.ndarray:
    """The document-tower token rows of blocks [lo, hi): `[hi - lo, block_len]` uint16/int32.
    Reads only those rows' chunks (byte ranges), so a process reads just its share."""
    parts = [self._shard_rows(i, a, b) for i, a, b in self._shards_in(lo, hi)]
    return np.concatenate(parts) if parts else np.zeros((0, self.block_len), self.token_dtype)

  def training_view(self, lo: int, hi: int) -> BlockShard:
    """Blocks [lo, hi) for the input pipeline: token rows and spans, no text (index 0 = block lo)."""
    parts = []
    for i, a, b in self._shards_in(lo, hi):
      spans = self._spans(i)
      part = {k: spans[k][a:b] for k in ("block_ids", "title_len", "body_len")}
      part.update(_slice_ragged(spans, ("sentence_tokens", "salient_tokens"), a, b))
      parts.append(part)
    spans = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, np.int64)
             for k in ("block_ids", "title_len", "body_len")}
    for name in ("sentence_tokens", "salient_tokens"):
      flats = [p[name] for p in parts]
      spans[name] = np.concatenate(flats) if flats else np.zeros((0, 2), np.int32)
      offsets = np.cumsum([0] + [len(f) for f in flats])
      spans[name + "_splits"] = np.concatenate([[0]] + [p[name + "_splits"][1:] + o for p, o in zip(parts, offsets)])
    return BlockShard(self.token_rows(lo, hi), spans, None)
