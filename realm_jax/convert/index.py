"""The released ORQA/REALM index -> our formats (`realm-jax convert index`).

`block_emb` (13,353,718 x 128 float32 in the release, 6.8 GB) is streamed out of the TF checkpoint
bundle in row slices: the bundle's `.index` (a LevelDB table of `BundleEntryProto`s) gives the
variable's shard, offset and dtype, and rows are read straight from the `.data-*` file, so at most
one slice is in memory (TF's own `RestoreV2` with a slice spec reads the whole tensor first).
The bundle's crc32c is checked as the rows stream by. `blocks.tfr` / `titles.tfr` (TFRecords of
UTF-8 strings, one per block, in row order) become our corpus; embedding shards are aligned with
the corpus shards and published as an index version (optionally with a ScaNN searcher) that
`realm_jax.retrieval.index.load_index` reads. Neither TensorFlow nor torch is needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import pathlib
import struct
import tempfile
import time
from typing import Callable, Iterator

import google_crc32c
import numpy as np

from realm_jax.convert.names import ConversionError

# tensorflow/core/framework/types.proto
_TF_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8, 9: np.int64,
              10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}
_MAGIC = 0xDB4775248B80FB57


class IndexConversionError(ConversionError):
  """The embedding checkpoint or the block records are unreadable or inconsistent."""


# -- the TF bundle format ----------------------------------------------------------------------

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if not b & 0x80:
      return result, pos
    shift += 7


def _proto_fields(buf: bytes) -> dict[int, list]:
  """Protobuf wire format -> {field number: [int | bytes, ...]} (enough for bundle entries)."""
  out: dict[int, list] = {}
  pos = 0
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(buf, pos)
    elif wire == 1:
      value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
    elif wire == 2:
      n, pos = _varint(buf, pos)
      value, pos = bytes(buf[pos:pos + n]), pos + n
    elif wire == 5:
      value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    out.setdefault(field, []).append(value)
  return out


def _block_entries(table: bytes, offset: int, size: int, where: str) -> Iterator[tuple[bytes, bytes]]:
  """Key/value entries of one LevelDB table block (prefix-compressed keys, restart array)."""
  if table[offset + size] != 0:
    raise IndexConversionError(f"{where}: compressed index blocks are not supported")
  block = table[offset:offset + size]
  num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
  end = len(block) - 4 - 4 * num_restarts
  pos, key = 0, b""
  while pos < end:
    shared, pos = _varint(block, pos)
    non_shared, pos = _varint(block, pos)
    value_len, pos = _varint(block, pos)
    key = key[:shared] + block[pos:pos + non_shared]
    pos += non_shared
    yield key, block[pos:pos + value_len]
    pos += value_len


@dataclasses.dataclass(frozen=True)
class BundleEntry:
  """Where one variable's bytes are in the bundle's data files."""

  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  shard: int
  offset: int
  size: int
  crc32c: int | None
  sliced: bool


def read_bundle_index(data: bytes, where: str) -> tuple[int, dict[str, BundleEntry]]:
  """Parses a `.index` file: (number of data shards, entries by variable name)."""
  try:
    if struct.unpack_from("<Q", data, len(data) - 8)[0] != _MAGIC:
      raise ValueError("bad table magic")
    footer = data[len(data) - 48:]
    _, pos = _varint(footer, 0)
    _, pos = _varint(footer, pos)
    idx_off, pos = _varint(footer, pos)
    idx_size, _ = _varint(footer, pos)
    num_shards, entries = 1, {}
    for _, handle in _block_entries(data, idx_off, idx_size, where):
      off, p = _varint(handle, 0)
      size, _ = _varint(handle, p)
      for key, value in _block_entries(data, off, size, where):
        f = _proto_fields(value)
        if key == b"":  # BundleHeaderProto
          num_shards = f.get(1, [1])[0]
          if f.get(2, [0])[0] != 0:
            raise IndexConversionError(f"{where}: big-endian bundles are not supported")
          continue
        name = key.decode("utf-8")
        dims = [_proto_fields(d).get(1, [0])[0] for d in _proto_fields(f[2][0]).get(2, [])] if 2 in f else []
        dtype = _TF_DTYPES.get(f.get(1, [0])[0])
        entries[name] = BundleEntry(name, np.dtype(dtype) if dtype else None, tuple(dims), f.get(3, [0])[0],
                                    f.get(4, [0])[0], f.get(5, [0])[0], f.get(6, [None])[0], 7 in f)
  except IndexConversionError:
    raise
  except (IndexError, ValueError, struct.error, UnicodeDecodeError) as e:
    raise IndexConversionError(f"{where}: not a TF checkpoint index ({e})") from None
  return num_shards, entries


def _masked_crc(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@contextlib.contextmanager
def _local_file(uri: str) -> Iterator[str]:
  """A local path for `uri`: local paths as they are; storage objects staged to a temp file."""
  if "://" not in uri or uri.startswith("file://"):
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if not os.path.exists(path):
      raise IndexConversionError(f"{uri}: no such file")
    yield path
    return
  from realm_jax.storage import Storage
  parent, _, name = uri.rpartition("/")
  store = Storage.open(parent)
  if store.stat(name) is None:
    raise IndexConversionError(f"{uri}: no such object")
  with tempfile.TemporaryDirectory(prefix="realm-import-") as tmp:
    yield str(store.get_file(name, os.path.join(tmp, name)))


class RowReader:
  """Streams row slices of one 2-D variable of a TF checkpoint (local prefix or storage URI)."""

  def __init__(self, prefix: str, var: str):
    self._stack = contextlib.ExitStack()
    with _local_file(prefix + ".index") as idx:
      num_shards, entries = read_bundle_index(pathlib.Path(idx).read_bytes(), prefix + ".index")
    if var not in entries:
      names = sorted(entries)
      raise IndexConversionError(f"{prefix}: no variable {var!r} (it has {names[:20]}"
                                 f"{' ...' if len(names) > 20 else ''})")
    e = entries[var]
    if e.sliced:
      raise IndexConversionError(f"{prefix}: {var} was saved partitioned; re-save it whole")
    if e.dtype is None or len(e.shape) != 2:
      raise IndexConversionError(f"{prefix}: {var} has shape {e.shape} and dtype {e.dtype}; "
                                 "expected a 2-D numeric array")
    if e.size != int(np.prod(e.shape)) * e.dtype.itemsize:
      raise IndexConversionError(f"{prefix}: {var} holds {e.size} bytes, not {e.shape} x {e.dtype}")
    self.entry, self.shape, self.dtype = e, e.shape, e.dtype
    self._data_uri = f"{prefix}.data-{e.shard:05d}-of-{num_shards:05d}"
    self._path = self._stack.enter_context(_local_file(self._data_uri))
    self._file = self._stack.enter_context(open(self._path, "rb"))
    self._crc = google_crc32c.Checksum()
    self._next = 0

  def read(self, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) as a new array; reading every row in order also checks the crc32c."""
    rows, dim = self.shape
    if not 0 <= start <= stop <= rows:
      raise IndexConversionError(f"rows [{start}, {stop}) outside {self.entry.name} {self.shape}")
    row_bytes = dim * self.dtype.itemsize
    self._file.seek(self.entry.offset + start * row_bytes)
    out = np.empty((stop - start, dim), self.dtype)
    got = self._file.readinto(memoryview(out).cast("B"))
    if got != out.nbytes:
      raise IndexConversionError(f"{self._data_uri}: truncated ({self.entry.name} rows {start}:{stop})")
    if start == self._next:
      self._crc.update(out.tobytes())  # one chunk copied, briefly
      self._next = stop
      if stop == rows and self.entry.crc32c is not None:
        crc = _masked_crc(int.from_bytes(self._crc.digest(), "big"))
        if crc != self.entry.crc32c:
          raise IndexConversionError(f"{self._data_uri}: crc32c of {self.entry.name} does not match the index "
                                     "(corrupt download?)")
    return out

  def close(self) -> None:
    self._stack.close()

  def __enter__(self) -> "RowReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# -- TFRecords ---------------------------------------------------------------------------------

def read_tfrecords(uri: str) -> Iterator[bytes]:
  """The records of a TFRecord file (uncompressed), crc-checked, streamed."""
  with _local_file(uri) as path, open(path, "rb") as f:
    n = 0
    while True:
      head = f.read(12)
      if not head:
        return
      if len(head) < 12:
        raise IndexConversionError(f"{uri}: truncated after record {n}")
      length, length_crc = struct.unpack("<QI", head)
      if _masked_crc(google_crc32c.value(head[:8])) != length_crc:
        raise IndexConversionError(f"{uri}: record {n}: bad length checksum (not an uncompressed TFRecord file?)")
      data = f.read(length)
      tail = f.read(4)
      if len(data) < length or len(tail) < 4:
        raise IndexConversionError(f"{uri}: record {n} is truncated")
      if _masked_crc(google_crc32c.value(data)) != struct.unpack("<I", tail)[0]:
        raise IndexConversionError(f"{uri}: record {n}: data checksum mismatch")
      yield data
      n += 1


# -- conversion --------------------------------------------------------------------------------

def _write_npy(path: pathlib.Path, reader: RowReader, start: int, stop: int, chunk: int) -> None:
  """Rows [start, stop) of `reader` as a float32 `.npy` file, `chunk` rows at a time."""
  with open(path, "wb") as f:
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                             "fortran_order": False, "shape": (stop - start, reader.shape[1])})
    for s in range(start, stop, chunk):
      f.write(reader.read(s, min(stop, s + chunk)).astype(np.float32, copy=False).tobytes())


def _blocks(blocks: str, titles: str | None) -> Iterator[tuple[str, str]]:
  title_it = read_tfrecords(titles) if titles else None
  n = 0
  for body in read_tfrecords(blocks):
    title = b""
    if title_it is not None:
      title = next(title_it, None)
      if title is None:
        raise IndexConversionError(f"{titles}: has {n} records, fewer than {blocks}")
    try:
      yield title.decode("utf-8"), body.decode("utf-8")
    except UnicodeDecodeError as e:
      raise IndexConversionError(f"{blocks} / {titles}: record {n} is not UTF-8 ({e})") from None
    n += 1
  if title_it is not None and next(title_it, None) is not None:
    raise IndexConversionError(f"{titles}: has more records than {blocks} ({n})")


def write_corpus(storage, records: Iterator[tuple[str, str]], shard_blocks: int, tokenizer: str,
                 block_len: int = 288, tagger: str | None = None, prefix: str = "corpus") -> dict:
  """ORQA blocks (title, text) -> our corpus, one corpus block per record, in order."""
  from realm_jax.data import corpus as corpus_lib
  from realm_jax.data.blocks import Block
  from realm_jax.data.salient import get_tagger
  from realm_jax.data.tokenizer import load_tokenizer

  tok = load_tokenizer(tokenizer)
  tag = get_tagger(tagger) if tagger else None
  manifest_path = f"{prefix}/{corpus_lib.MANIFEST}"
  if storage.exists(manifest_path):
    raise IndexConversionError(f"{storage.uri(manifest_path)} exists: a corpus is already there")
  writer = corpus_lib.ShardWriter(storage, prefix, shard_blocks, block_len, tok)
  t0 = time.perf_counter()

  def flush(batch):
    titles = tok.encode_batch([t for t, _ in batch])
    bodies = tok.encode_batch([b for _, b in batch])
    spans = tag.tag_batch([b for _, b in batch]) if tag else [[] for _ in batch]
    for (title, text), t_enc, b_enc, sal in zip(batch, titles, bodies, spans):
      writer.add(Block(block_id=-1, title=title, text=text, title_ids=t_enc.ids, body_ids=b_enc.ids,
                       body_offsets=b_enc.offsets, sentences=corpus_lib.split_sentences(text) or [(0, len(text))],
                       salient_spans=sal))

  batch = []
  for record in records:
    batch.append(record)
    if len(batch) == shard_blocks:
      flush(batch)
      batch = []
  if batch:
    flush(batch)
  writer.flush()
  n, seconds = writer.next_id, time.perf_counter() - t0
  manifest = writer.manifest(corpus_lib.write_tokenizer(storage, prefix, tok), getattr(tag, "name", "none"),
                             {"documents": n, "seconds": round(seconds, 3),
                              "blocks_per_second": round(n / max(seconds, 1e-9), 1)},
                             ["ORQA block records (realm-jax convert index)"])
  storage.write_json(manifest_path, manifest)
  return manifest


def convert_index(checkpoint: str, storage_uri: str, *, var: str = "block_emb", blocks: str | None = None,
                  titles: str | None = None, rows_per_shard: int = 50_000, build_scann: bool = True,
                  tokenizer: str | None = None, tagger: str | None = None, config=None, step: int = 0,
                  chunk_rows: int = 65_536, log: Callable[[str], None] = print) -> dict:
  """`block_emb` (+ blocks) -> corpus, embedding shards and a published index version.

  Without `blocks`, only the embedding shards are written (under `imported-embeddings/`,
  the `retrieval.embed` layout). Returns a summary dict.
  """
  from realm_jax import publish
  from realm_jax.config import get_preset
  from realm_jax.retrieval import embed as embed_lib, index as index_lib
  from realm_jax.storage import Storage

  if rows_per_shard < 1 or chunk_rows < 1:
    raise IndexConversionError("rows_per_shard and chunk_rows must be >= 1")
  storage = Storage.open(storage_uri)
  t0 = time.perf_counter()
  with RowReader(checkpoint, var) as reader, tempfile.TemporaryDirectory(prefix="realm-index-") as tmp:
    rows, dim = reader.shape
    log(f"{checkpoint}: {var} {rows:,} x {dim} {reader.dtype}")
    corpus = None
    if blocks:
      manifest = write_corpus(storage, _blocks(blocks, titles), rows_per_shard, tokenizer or "minilm",
                              tagger=tagger)
      if manifest["num_blocks"] != rows:
        storage.delete("corpus/" + "manifest.json")
        raise IndexConversionError(f"{blocks}: {manifest['num_blocks']:,} blocks, but {var} has {rows:,} rows")
      from realm_jax.data.corpus import CorpusReader
      corpus = CorpusReader(storage)
      bounds = [(s["first_block"], s["first_block"] + s["num_blocks"]) for s in corpus.shards]
      log(f"wrote corpus: {rows:,} blocks in {len(bounds)} shards")
    else:
      bounds = [(s, min(rows, s + rows_per_shard)) for s in range(0, rows, rows_per_shard)]
    emb_dir = pathlib.Path(tmp) / "emb"
    emb_dir.mkdir()
    names = []
    for i, (s, e) in enumerate(bounds):
      name = embed_lib.shard_name(i)
      _write_npy(emb_dir / name, reader, s, e, chunk_rows)
      names.append((name, e - s))
      if not blocks:  # embeddings only: upload each shard as it is written, keep the disk small
        storage.put_file(emb_dir / name, f"imported-embeddings/{name}", exclusive=True)
        (emb_dir / name).unlink()
    if not blocks:
      storage.write_json("imported-embeddings/" + embed_lib.INFO_FILE,
                         {"format": "realm-jax-embeddings", "num_blocks": rows, "shards": [r for _, r in names],
                          "dtype": "float32", "identity": {"converted_from": checkpoint, "var": var}}, exclusive=True)
      log(f"wrote {len(names)} embedding shards to {storage.uri('imported-embeddings')}")
      return {"rows": rows, "dim": dim, "shards": len(names), "seconds": time.perf_counter() - t0}
    files = {f"{index_lib.EMB_DIR}/{n}": emb_dir / n for n, _ in names}
    scann_seconds = 0.0
    if build_scann:
      from realm_jax.retrieval import scann_index
      t1 = time.perf_counter()
      emb = np.empty((rows, dim), np.float32)  # the one in-memory copy ScaNN needs
      for (name, _r), (s, e) in zip(names, bounds):
        emb[s:e] = np.load(emb_dir / name, mmap_mode="r")
      searcher = scann_index.build_searcher(emb, scann_index.ScannConfig())
      del emb
      files.update(publish.files_from_dir(scann_index.save_searcher(searcher, pathlib.Path(tmp) / "scann"),
                                          index_lib.SCANN_DIR))
      scann_seconds = time.perf_counter() - t1
    cfg = config or get_preset("base")
    version = publish.new_version(step)
    info = index_lib.IndexInfo(
        version, step, index_lib.corpus_fingerprint(corpus), cfg.fingerprint(), rows, dim, "float32",
        tuple((f"{index_lib.EMB_DIR}/{n}", r) for n, r in names), build_scann,
        {"embed_seconds": 0.0, "scann_seconds": round(scann_seconds, 3)},
        datetime.datetime.now(datetime.timezone.utc).isoformat())
    publish.publish(storage, index_lib.PREFIX, version, files,
                    {**info.to_metadata(), "converted_from": {"checkpoint": checkpoint, "var": var,
                                                              "blocks": blocks, "titles": titles}})
  log(f"published index {storage.uri(index_lib.PREFIX + '/' + version)} ({len(names)} shards"
      f"{', ScaNN' if build_scann else ''}) in {time.perf_counter() - t0:.1f} s")
  return {"rows": rows, "dim": dim, "shards": len(names), "version": version, "seconds": time.perf_counter() - t0}
