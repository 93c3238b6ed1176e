"""Documents -> blocks -> a sharded block corpus on storage, and `CorpusReader` to read it back.

Blocks follow the ORQA rule: sentences are packed greedily into `[CLS] title [SEP] body [SEP]`
of at most `block_len` tokens; a sentence longer than the budget is cut on token boundaries
(between words when it can).
Block ids are consecutive from 0 in input order (row i of the index embeds block i).

Layout under `<root>/<prefix>/` (default prefix `corpus`):
  shard-00000.npz ...   one per `shard_blocks` blocks, written as each fills (bounded memory);
                        `np.savez` (no pickle; `data/shards.py`): `block_ids` int64, and for
                        each ragged field a flat array plus `<field>_splits` int64 [n+1] row
                        boundaries:
                        `title_ids`, `body_ids` int32; `body_offsets`, `sentences`,
                        `salient_spans` int32 [., 2] (char offsets into the block text);
                        `titles`, `texts` as UTF-8 bytes (uint8).
  tokenizer/...         the tokenizer's own files, so the corpus is self-describing.
  manifest.json         written last: num_blocks, block_len, tokenizer spec, tagger, shards with
                        block ranges, sizes and sha256, build statistics.

`--overwrite` builds the new corpus beside the old one: its shards are `shard-<tag>-NNNNN.npz` and
its tokenizer `tokenizer-<tag>/` (a fresh tag per build), the old corpus stays readable, and only
the manifest, replaced atomically at the end, switches readers to the new one; then the old
corpus's files go. A build that fails (bad input, full disk) removes its own files and leaves the
old corpus exactly as it was.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from realm_jax.data.blocks import Block
from realm_jax.data.documents import Document, read_documents
from realm_jax.data.salient import Tagger, get_tagger, title_mentions
from realm_jax.data.sentences import split_sentences
from realm_jax.data.shards import BlockShard, CorpusError, decode_shard, encode_shard
from realm_jax.data.tokenizer import Encoding, Tokenizer, load_tokenizer, tokenizer_from_files

FORMAT = "realm-jax-corpus"
VERSION = 1
MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------------------------
# Packing sentences into blocks (ORQA rule).


def _units(sentences: list[tuple[int, int]], enc: Encoding, budget: int) -> list[tuple[int, int, int, int]]:
  """(char_start, char_end, tok_lo, tok_hi) per sentence; sentences over `budget` tokens are cut
  into pieces that together cover the sentence's text exactly: between words where one lies in
  the last half of the budget, else on a token boundary."""
  if not sentences:
    return []
  starts = np.asarray([s for s, _ in sentences], np.int64)
  mid = np.maximum(enc.offsets[:, 0], enc.offsets[:, 1] - 1) if len(enc) else np.zeros(0, np.int64)
  owner = np.clip(np.searchsorted(starts, mid, side="right") - 1, 0, len(sentences) - 1)
  bounds = np.searchsorted(owner, np.arange(len(sentences) + 1), side="left")
  units = []
  for k, (s, e) in enumerate(sentences):
    lo, hi = int(bounds[k]), int(bounds[k + 1])
    if hi - lo <= budget:
      units.append((s, e, lo, hi))
      continue
    cuts = [lo]
    while hi - cuts[-1] > budget:
      a = cuts[-1]
      cut = a + budget
      # Prefer a cut between words (whitespace before the token), so no word is split in two.
      for c in range(cut, a + max(1, budget // 2), -1):
        if enc.offsets[c, 0] > enc.offsets[c - 1, 1]:
          cut = c
          break
      cuts.append(cut)
    cuts.append(hi)
    for a, b in zip(cuts[:-1], cuts[1:]):
      cs = s if a == lo else int(enc.offsets[a, 0])
      ce = e if b == hi else int(enc.offsets[b, 0])
      units.append((cs, ce, a, b))
  return units


def pack_document(doc: Document, title_enc: Encoding, body_enc: Encoding,
                  sentences: list[tuple[int, int]], salient: list[tuple[int, int]],
                  block_len: int) -> list[Block]:
  """The blocks of one document (block_id -1: the writer numbers them)."""
  budget = block_len - len(title_enc) - 3
  if budget < 1:
    raise CorpusError(
        f"{doc.source}: block length {block_len} is too small for the title {doc.title!r} "
        f"({len(title_enc)} tokens): [CLS] title [SEP] [SEP] plus one body token needs "
        f"{len(title_enc) + 4}")
  blocks, current, used = [], [], 0
  units = _units(sentences, body_enc, budget)
  spans = np.asarray(salient, np.int64).reshape(-1, 2)

  def flush():
    cs, ce = current[0][0], current[-1][1]
    lo, hi = current[0][2], current[-1][3]
    if hi == lo:
      return  # text without a single token (e.g. only zero-width characters): nothing to embed.
    text = doc.text[cs:ce]
    offsets = np.clip(body_enc.offsets[lo:hi].astype(np.int64) - cs, 0, len(text))
    inside = spans[(spans[:, 0] >= cs) & (spans[:, 1] <= ce)] - cs
    blocks.append(Block(
        block_id=-1, title=doc.title, text=text, title_ids=title_enc.ids, body_ids=body_enc.ids[lo:hi],
        body_offsets=offsets, sentences=[(u[0] - cs, u[1] - cs) for u in current], salient_spans=inside))

  for unit in units:
    n = unit[3] - unit[2]
    if current and used + n > budget:
      flush()
      current, used = [], 0
    current.append(unit)
    used += n
  if current:
    flush()
  return blocks


# ----------------------------------------------------------------------------------------------
# Building.


def _open_storage(storage):
  if hasattr(storage, "read_bytes"):
    return storage
  from realm_jax.storage import Storage

  return Storage.open(storage)


def _shard_name(i: int, tag: str = "") -> str:
  return f"shard-{tag}-{i:05d}.npz" if tag else f"shard-{i:05d}.npz"


_OWN_FILE = re.compile(r"^(shard-(?:[0-9a-f]{8}-)?\d+\.npz|tokenizer(?:-[0-9a-f]{8})?/.+)$")


class _ShardWriter:
  """Numbers blocks consecutively and writes a shard each time `shard_blocks` are buffered."""

  def __init__(self, storage, prefix: str, shard_blocks: int, tag: str = ""):
    self.storage, self.prefix, self.shard_blocks, self.tag = storage, prefix, shard_blocks, tag
    self.buffer: list[Block] = []
    self.shards: list[dict] = []
    self.next_id = 0

  def add(self, block: Block) -> None:
    block.block_id = self.next_id
    self.next_id += 1
    self.buffer.append(block)
    if len(self.buffer) >= self.shard_blocks:
      self.flush()

  def flush(self) -> None:
    if not self.buffer:
      return
    data = encode_shard(self.buffer)
    name = _shard_name(len(self.shards), self.tag)
    self.storage.write_bytes(f"{self.prefix}/{name}", data)
    self.shards.append({"path": name, "first_block": self.buffer[0].block_id,
                        "num_blocks": len(self.buffer), "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    self.buffer = []


def _concat(parts: list[Encoding], starts: list[int]) -> Encoding:
  """One document's encoding from its sentences' (offsets shifted to document positions).

  Sentences are encoded one by one, so a block's tokens are exactly its sentences' tokens
  (SentencePiece may segment a word differently inside a long document than in its sentence).
  """
  if not parts:
    return Encoding(np.zeros(0, np.int32), np.zeros((0, 2), np.int32))
  return Encoding(np.concatenate([p.ids for p in parts]),
                  np.concatenate([p.offsets + s for p, s in zip(parts, starts)]).astype(np.int32))


def _batches(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
  batch = []
  for doc in docs:
    batch.append(doc)
    if len(batch) >= size:
      yield batch
      batch = []
  if batch:
    yield batch


def build_corpus(inputs: Sequence[str | Document], storage, prefix: str = "corpus",
                 tokenizer: str | Tokenizer = "minilm", block_len: int = 288,
                 tagger: str | Tagger = "rule", shard_blocks: int = 10_000,
                 overwrite: bool = False, progress: Callable[[int, int], None] | None = None,
                 doc_batch: int = 32, workers: int = 1, title_spans: bool = True) -> dict:
  """Builds the block corpus from document files (or `Document`s) into `<storage>/<prefix>/`;
  returns the manifest.

  Streams documents in batches of `doc_batch` and writes each shard as it fills, so memory is
  bounded by one shard plus one batch. The manifest is written last; a failed build removes
  the files it wrote, so no half-written corpus is ever readable; with `overwrite` the new corpus
  is built beside the old one, which stays intact until the new manifest replaces its own.
  `workers` processes strip MediaWiki markup (the slowest step for dumps). `title_spans`: mentions
  of the article's title are salient spans too (where the tagger found nothing overlapping them).
  `progress(blocks, documents)` is called after each document.
  """
  storage = _open_storage(storage)
  tok = load_tokenizer(tokenizer)
  tag = get_tagger(tagger) if isinstance(tagger, str) else tagger
  if block_len < 4:
    raise CorpusError(f"block length {block_len} is too small: [CLS] [SEP] [SEP] and one token need 4")
  if shard_blocks < 1:
    raise CorpusError(f"shard_blocks must be >= 1, got {shard_blocks}")
  prefix = prefix.strip("/")
  manifest_path = f"{prefix}/{MANIFEST}"
  build_tag = ""
  if storage.exists(manifest_path):
    if not overwrite:
      raise CorpusError(f"{storage.uri(manifest_path)} exists: a corpus is already built there "
                        "(pass --overwrite to replace it)")
    build_tag = secrets.token_hex(4)  # new files beside the old corpus's; the manifest swap switches readers
  tok_dir = f"{prefix}/tokenizer-{build_tag}" if build_tag else f"{prefix}/tokenizer"
  writer = _ShardWriter(storage, prefix, shard_blocks, build_tag)
  stats = {"documents": 0, "sentences": 0, "sentences_with_salient": 0, "salient_spans": 0,
           "body_tokens": 0, "split_sentences": 0}
  t0, c0 = time.perf_counter(), time.process_time()
  try:
    for batch in _batches(read_documents(inputs, workers), doc_batch):
      titles = tok.encode_batch([d.title for d in batch])
      sentences = [split_sentences(d.text) for d in batch]
      flat = [d.text[s:e] for d, sents in zip(batch, sentences) for s, e in sents]
      tags = iter(tag.tag_batch(flat))
      encs = iter(tok.encode_batch(flat))
      for doc, t_enc, sents in zip(batch, titles, sentences):
        salient, parts = [], []
        for s, e in sents:
          found = next(tags)
          if title_spans:
            found = title_mentions(doc.title, doc.text[s:e], found)
          stats["sentences_with_salient"] += bool(found)
          salient += [(s + a, s + b) for a, b in found]
          parts.append(next(encs))
        b_enc = _concat(parts, [s for s, _ in sents])
        blocks = pack_document(doc, t_enc, b_enc, sents, salient, block_len)
        for block in blocks:
          stats["salient_spans"] += len(block.salient_spans)
          writer.add(block)
        stats["documents"] += 1
        stats["sentences"] += len(sents)
        stats["body_tokens"] += len(b_enc)
        stats["split_sentences"] += sum(1 for b in blocks for _ in b.sentences) - len(sents)
        if progress:
          progress(writer.next_id, stats["documents"])
    writer.flush()
    if writer.next_id == 0:
      raise CorpusError(f"empty corpus: the documents of {', '.join(map(str, inputs))} hold no tokens")
    tok_files = {}
    for name, data in sorted(tok.files().items()):
      storage.write_bytes(f"{tok_dir}/{name}", data)
      tok_files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
  except BaseException:
    for shard in writer.shards:  # leave nothing half-built behind (an old corpus stays as it was).
      storage.delete(f"{prefix}/{shard['path']}")
    storage.delete(tok_dir)
    raise
  seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
  stats["seconds"] = round(seconds, 3)
  stats["cpu_seconds"] = round(cpu_seconds, 3)  # this process only (not --workers processes)
  stats["blocks_per_second"] = round(writer.next_id / max(seconds, 1e-9), 1)
  tokenizer = {**tok.spec(), "files": tok_files}
  if build_tag:
    tokenizer["dir"] = tok_dir[len(prefix) + 1:]
  manifest = {
      "format": FORMAT, "version": VERSION, "num_blocks": writer.next_id, "block_len": block_len,
      "tokenizer": tokenizer, "tagger": getattr(tag, "name", str(tagger)),
      "title_spans": title_spans,
      "shard_blocks": shard_blocks, "shards": writer.shards, "stats": stats,
      "inputs": sorted({str(p) for p in inputs if not isinstance(p, Document)}),
  }
  storage.write_json(manifest_path, manifest)  # atomic: readers switch from the old corpus here
  keep = {s["path"] for s in writer.shards} | {f"{tokenizer.get('dir', 'tokenizer')}/{n}" for n in tok_files}
  for path in storage.list(prefix):
    name = path[len(prefix) + 1:]
    if _OWN_FILE.match(name) and name not in keep:
      storage.delete(path)  # the replaced corpus's shards and tokenizer files.
  return manifest


# ----------------------------------------------------------------------------------------------
# Reading.


def split_corpus_uri(uri: str) -> tuple[str, str]:
  """`gs://bucket/corpora/wiki` -> (`gs://bucket/corpora`, `wiki`): the storage root that holds a
  corpus directory, and the directory's name (the corpus prefix inside that root)."""
  text = uri.strip().rstrip("/")
  scheme, sep, rest = text.partition("://")
  path = rest if sep else text
  parent, _, name = path.rpartition("/")
  if not name or (sep and scheme in ("gs", "gcs") and not parent):
    raise CorpusError(f"corpus URI {uri!r}: name the corpus directory, e.g. gs://bucket/corpora/wiki "
                      "(a corpus under the bucket, not the bucket itself)")
  if sep:
    return f"{scheme}://{parent}", name
  return parent or ".", name


def open_corpus(storage, uri: str | None, prefix: str | None) -> CorpusReader:
  """The corpus at its own `uri` (shared between runs) or, when None, at `prefix` under `storage`."""
  if uri is None:
    return CorpusReader(storage, prefix)
  root, name = split_corpus_uri(uri)
  return CorpusReader(root, name)


class CorpusReader:
  """Reads a built corpus: manifest checked on open, each shard's size and sha256 on read."""

  def __init__(self, storage, prefix: str = "corpus", cache_shards: int = 2):
    self.storage = _open_storage(storage)
    self.prefix = prefix.strip("/")
    path = f"{self.prefix}/{MANIFEST}"
    self._where = self.storage.uri(path)
    if not self.storage.exists(path):
      raise CorpusError(f"{self._where}: no corpus manifest (build one with `realm-jax corpus build`)")
    self.manifest = self.storage.read_json(path)
    self._check_manifest()
    self._starts = np.asarray([s["first_block"] for s in self.shards], np.int64)
    self._cache: dict[int, BlockShard] = {}
    self._cache_size = cache_shards

  def _check_manifest(self) -> None:
    m = self.manifest
    if not isinstance(m, dict) or m.get("format") != FORMAT:
      raise CorpusError(f"{self._where}: not a realm-jax corpus manifest")
    if m.get("version") != VERSION:
      raise CorpusError(f"{self._where}: corpus format version {m.get('version')} (this code reads {VERSION})")
    expected = 0
    for i, shard in enumerate(m.get("shards", [])):
      if shard.get("first_block") != expected or shard.get("num_blocks", 0) < 1:
        raise CorpusError(f"{self._where}: shard {i} ({shard.get('path')}) starts at block "
                          f"{shard.get('first_block')}, expected {expected}")
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

  def read_shard(self, i: int) -> BlockShard:
    """Shard `i` (0 <= i < num_shards), verified against the manifest."""
    if not 0 <= i < self.num_shards:
      raise CorpusError(f"{self._where}: no shard {i} (the corpus has {self.num_shards})")
    if i in self._cache:
      return self._cache[i]
    info = self.shards[i]
    path = f"{self.prefix}/{info['path']}"
    where = self.storage.uri(path)
    try:
      data = self.storage.read_bytes(path)
    except FileNotFoundError:
      raise CorpusError(f"{where}: shard listed in the manifest is missing") from None
    if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
      raise CorpusError(f"{where}: size/sha256 differ from the manifest (corrupt or overwritten shard)")
    shard = decode_shard(data, where)
    first = info["first_block"]
    if not np.array_equal(shard.block_ids, np.arange(first, first + info["num_blocks"])):
      raise CorpusError(f"{where}: block ids differ from the manifest's range")
    if len(self._cache) >= self._cache_size:
      self._cache.pop(next(iter(self._cache)))
    self._cache[i] = shard
    return shard

  def shard_of(self, block_id: int) -> int:
    """Index of the shard holding `block_id`."""
    if not 0 <= block_id < self.num_blocks:
      raise CorpusError(f"{self._where}: block id {block_id} out of range [0, {self.num_blocks})")
    return int(np.searchsorted(self._starts, block_id, side="right") - 1)

  def get_blocks(self, ids: Iterable[int]) -> list[Block]:
    """Blocks by id, in the order asked (random access, shard by shard)."""
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

  def iter_blocks(self) -> Iterator[Block]:
    """Every block in id order, one shard in memory at a time."""
    for i in range(self.num_shards):
      yield from self.read_shard(i)
