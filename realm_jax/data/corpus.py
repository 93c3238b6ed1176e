"""Documents -> blocks -> a sharded block corpus on storage, and `CorpusReader` to read it back.

Blocks follow the ORQA rule: sentences are packed greedily into `[CLS] title [SEP] body [SEP]`
of at most `block_len` tokens; a sentence longer than the budget is cut on token boundaries
(between words when it can).
Block ids are consecutive from 0 in input order (row i of the index embeds block i).

Layout under `<root>/<prefix>/` (default prefix `corpus`), format version 2:
  tokens-00000.npy      per `shard_blocks` blocks, written as each shard fills (bounded memory):
  spans-00000.npz       the blocks' document-tower token rows (uint16), their training spans and
  text-00000.npz        their text (`data/shards.py` says what each file holds; no pickle).
  tokenizer/...         the tokenizer's own files, so the corpus is self-describing.
  manifest.json         written last: num_blocks, block_len, token dtype, tokenizer spec, tagger,
                        shards with block ranges, each file's size and sha256, and for the token
                        files the byte offset of row 0 and a CRC32C per `chunk_rows` rows, so a
                        process that reads only its rows (by byte range) still verifies them.
Version 1 corpora (one `shard-*.npz` per shard) are refused with the command that converts them
(`realm-jax corpus convert`, `data/corpus_v1.py`).

`--overwrite` builds the new corpus beside the old one: its shard files are
`tokens-<tag>-NNNNN.npy`, `spans-<tag>-NNNNN.npz` and `text-<tag>-NNNNN.npz` and its tokenizer
`tokenizer-<tag>/` (a fresh tag per build; the manifest records every path), the old corpus
stays readable, and only the manifest, replaced atomically at the end, switches readers to the
new one; then the old corpus's files go (format 1 or 2, tagged or not). A build that fails (bad
input, full disk) removes its own files and leaves the old corpus exactly as it was.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from realm_jax.data.blocks import Block
from realm_jax.data.corpus_reader import (  # noqa: F401  (FORMAT, VERSION, CorpusReader re-exported)
  FORMAT,
  MANIFEST,
  VERSION,
  CorpusReader,
  open_storage,
)
from realm_jax.data.documents import Document, read_documents
from realm_jax.data.salient import Tagger, get_tagger, title_mentions
from realm_jax.data.sentences import split_sentences
from realm_jax.data.shards import CorpusError, encode_shard, file_names, token_dtype
from realm_jax.data.tokenizer import Encoding, Tokenizer, load_tokenizer
from realm_jax.storage.row_files import CHUNK_ROWS, RowFile

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


def token_file_entry(path: str, data: bytes, rows: int, chunk_rows: int = CHUNK_ROWS) -> dict:
  """The manifest entry of a token file: size, sha256, and its `RowFile` (row 0's offset, bytes
  per row, a CRC32C per chunk of rows) for range reads."""
  return {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
          **RowFile.describe(path, data, rows, chunk_rows).to_json()}


# The files a corpus build owns under its prefix (any format, tagged by an `--overwrite` build or
# not): after the manifest swap, those the new manifest does not name belong to the replaced corpus.
_OWN_FILE = re.compile(r"^(?:shard-(?:[0-9a-f]{8}-)?\d+\.npz|tokens-(?:[0-9a-f]{8}-)?\d+\.npy"
                       r"|(?:spans|text)-(?:[0-9a-f]{8}-)?\d+\.npz|tokenizer(?:-[0-9a-f]{8})?/.+)$")


class ShardWriter:
  """Numbers blocks consecutively and writes a shard (three files) each time `shard_blocks` are
  buffered; `shards` holds their manifest entries. With a `tag` (an `--overwrite` build) every
  file name carries it, and the tokenizer goes to `tokenizer-<tag>/` (`tok_dir`)."""

  def __init__(self, storage, prefix: str, shard_blocks: int, block_len: int, tok: Tokenizer, tag: str = ""):
    self.storage, self.prefix, self.shard_blocks, self.tag = storage, prefix, shard_blocks, tag
    self.block_len, self.tok, self.dtype = block_len, tok, token_dtype(tok.vocab_size)
    self.tok_dir = f"tokenizer-{tag}" if tag else "tokenizer"
    self._written: list[str] = []
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
    files = encode_shard(self.buffer, self.block_len, self.tok, self.dtype)
    names = file_names(len(self.shards), self.tag)
    entry = {"first_block": self.buffer[0].block_id, "num_blocks": len(self.buffer)}
    for kind, data in files.items():
      self._written.append(f"{self.prefix}/{names[kind]}")  # before the write: a failed one is cleaned too
      self.storage.write_bytes(f"{self.prefix}/{names[kind]}", data)
      entry[kind] = (token_file_entry(names[kind], data, len(self.buffer)) if kind == "tokens" else
                     {"path": names[kind], "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    self.shards.append(entry)
    self.buffer = []

  def written(self) -> list[str]:
    """Paths (relative to the storage root) of every file written so far (or being written)."""
    return list(self._written)

  def manifest(self, tok_files: dict, tagger: str, stats: dict, inputs: list[str], **extra) -> dict:
    tokenizer = {**self.tok.spec(), "files": tok_files}
    if self.tok_dir != "tokenizer":
      tokenizer["dir"] = self.tok_dir
    return {"format": FORMAT, "version": VERSION, "num_blocks": self.next_id, "block_len": self.block_len,
            "token_dtype": self.dtype.name, "tokenizer": tokenizer,
            "tagger": tagger, "shard_blocks": self.shard_blocks, "shards": self.shards, "stats": stats,
            "inputs": inputs, **extra}


def write_tokenizer(storage, prefix: str, tok: Tokenizer, dirname: str = "tokenizer") -> dict:
  """Writes the tokenizer's files next to the corpus (into `<prefix>/<dirname>/`); returns their
  manifest entries."""
  files = {}
  for name, data in sorted(tok.files().items()):
    storage.write_bytes(f"{prefix}/{dirname}/{name}", data)
    files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
  return files


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
  storage = open_storage(storage)
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
  writer = ShardWriter(storage, prefix, shard_blocks, block_len, tok, build_tag)
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
    tok_files = write_tokenizer(storage, prefix, tok, writer.tok_dir)
  except BaseException:
    for path in writer.written():  # leave nothing half-built behind (an old corpus stays as it was).
      storage.delete(path)
    storage.delete(f"{prefix}/{writer.tok_dir}")
    raise
  seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
  stats["seconds"] = round(seconds, 3)
  stats["cpu_seconds"] = round(cpu_seconds, 3)  # this process only (not --workers processes)
  stats["blocks_per_second"] = round(writer.next_id / max(seconds, 1e-9), 1)
  manifest = writer.manifest(tok_files, getattr(tag, "name", str(tagger)), stats,
                             sorted({str(p) for p in inputs if not isinstance(p, Document)}), title_spans=title_spans)
  storage.write_json(manifest_path, manifest)  # atomic: readers switch from the old corpus here
  keep = {p[len(prefix) + 1:] for p in writer.written()} | {f"{writer.tok_dir}/{n}" for n in tok_files}
  for path in storage.list(prefix):
    name = path[len(prefix) + 1:]
    if _OWN_FILE.match(name) and name not in keep:
      storage.delete(path)  # the replaced corpus's shard files and tokenizer files.
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
