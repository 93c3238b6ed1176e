"""Index versions: the corpus embeddings and a ScaNN searcher, published atomically.

The refresher (one or many processes) calls `build_and_publish_index`: each process embeds its
run of corpus shards into a staging prefix that survives a restart at the same checkpoint step,
uploads them and a searcher partition over its rows into `index/<version>/` (create-only), and
process 0 writes the manifest and swaps LATEST (`realm_jax.publish`), then prunes. The trainer
polls `latest_index_info` (LATEST + manifest only) and, off its critical path, reads only its
devices' rows with `load_index_rows` (byte ranges, each chunk checked); `load_index` reads a
whole version (one-host tools). Any failure to load raises a `RealmError` naming the file
(`publish.CorruptVersion`, `IndexLoadError`), so the trainer can log it and keep its index.

A version holds:
  embeddings/emb-00000.npy ...   one per corpus shard, rows in block-id order; the metadata has
                                 each file's `RowFile` (row 0's offset, a CRC32C per row chunk)
  scann/part-00000-0000/...      searchers over consecutive rows: each refresher process splits
                                 its rows into partitions of <= `ScannConfig.partition_rows`
                                 (`scann_index.save_searcher`; `PartitionedSearcher` merges them)
  manifest.json                  publish's manifest; its metadata is `IndexInfo.to_metadata()`
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import pathlib
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from realm_jax import layout, parallel, publish
from realm_jax.config import RealmConfig
from realm_jax.errors import RealmError
from realm_jax.retrieval import embed as embed_lib
from realm_jax.storage import StorageError
from realm_jax.storage.row_files import RowFile, RowFileError

PREFIX = layout.INDEX
WORK_PREFIX = layout.INDEX_WORK
FORMAT = "realm-jax-index"
EMB_DIR = "embeddings"
SCANN_DIR = "scann"

log = logging.getLogger(__name__)


class IndexLoadError(RealmError):
  """A published index cannot be used: malformed, or built for another corpus or model."""


class IndexMismatch(IndexLoadError):
  """The index was built for a different corpus or model configuration than the caller's."""


def corpus_fingerprint(corpus) -> str:
  """sha256 of the corpus manifest (canonical JSON): names the exact corpus an index embeds."""
  text = json.dumps(corpus.manifest, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class IndexInfo:
  """What an index version was built from; stored as the version manifest's metadata."""

  version: str
  step: int  # checkpoint step the document tower came from
  corpus_sha256: str
  config_fingerprint: str
  num_blocks: int
  dim: int
  dtype: str
  shards: tuple[tuple[str, int], ...]  # (file name in the version, rows)
  has_scann: bool
  timings: dict[str, float]  # embed_seconds, scann_seconds, publish_seconds
  created: str  # ISO-8601 UTC
  row_files: tuple[dict, ...] = ()  # per shard: `RowFile.to_json()` (empty in versions before range reads)
  scann_parts: tuple[dict, ...] = ()  # per searcher partition: {"dir", "first_row", "rows"}

  def to_metadata(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.pop("version")
    d.pop("row_files")
    d["shards"] = [{"path": p, "rows": r, **(self.row_files[i] if self.row_files else {})}
                   for i, (p, r) in enumerate(self.shards)]
    d["scann_parts"] = list(self.scann_parts)
    return {"format": FORMAT, **d}

  @classmethod
  def from_manifest(cls, manifest: publish.Manifest, where: str) -> "IndexInfo":
    """Parses a version's metadata; anything malformed raises IndexLoadError naming `where`."""
    m = manifest.metadata
    try:
      if m.get("format") != FORMAT:
        raise ValueError(f"format {m.get('format')!r}, expected {FORMAT!r}")
      shards = tuple((str(s["path"]), int(s["rows"])) for s in m["shards"])
      row_files = tuple({k: s[k] for k in ("offset", "row_bytes", "chunk_rows", "crc32c")}
                        for s in m["shards"] if "crc32c" in s)
      parts = tuple({"dir": str(p["dir"]), "first_row": int(p["first_row"]), "rows": int(p["rows"])}
                    for p in m.get("scann_parts", []))
      info = cls(manifest.version, int(m["step"]), str(m["corpus_sha256"]),
                 str(m["config_fingerprint"]), int(m["num_blocks"]), int(m["dim"]), str(m["dtype"]),
                 shards, bool(m["has_scann"]), {k: float(v) for k, v in m["timings"].items()},
                 str(m["created"]), row_files if len(row_files) == len(shards) else (), parts)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      raise IndexLoadError(f"{where}: not realm-jax index metadata ({e})") from None
    if info.dtype not in embed_lib.DTYPES:
      raise IndexLoadError(f"{where}: unknown embedding dtype {info.dtype!r}")
    if sum(r for _, r in shards) != info.num_blocks:
      raise IndexLoadError(f"{where}: the shards' rows add up to {sum(r for _, r in shards)}, not num_blocks "
                           f"{info.num_blocks} (the row ranges do not cover the corpus)")
    missing = [p for p, _ in shards if p not in manifest.files]
    if missing:
      raise IndexLoadError(f"{where}: metadata names shards the manifest does not list: {missing}")
    covered = sorted((p["first_row"], p["first_row"] + p["rows"]) for p in parts)
    if covered and (covered[0][0] != 0 or covered[-1][1] != info.num_blocks
                    or any(a[1] != b[0] for a, b in zip(covered, covered[1:]))):
      raise IndexLoadError(f"{where}: ScaNN partitions cover rows {covered}, not [0, {info.num_blocks})")
    return info

  @property
  def first_rows(self) -> list[int]:
    """Global row of each shard's first row."""
    return [0] + list(np.cumsum([r for _, r in self.shards])[:-1].tolist())


# ---------------------------------------------------------------------------------------------
# Building and publishing (every process of a job takes part)
# ---------------------------------------------------------------------------------------------


def staging_prefix(work_prefix: str, step: int, config: RealmConfig, corpus_sha256: str,
                   dtype: str) -> str:
  """Where the embeddings for (step, model, corpus, dtype) are staged: stable across restarts."""
  return f"{work_prefix.strip('/')}/{step:012d}-{config.fingerprint()}-{corpus_sha256[:12]}-{dtype}"


def process_shards(num_shards: int, process: int, processes: int) -> range:
  """The contiguous run of corpus shards one of `processes` embeds (sizes differ by at most one)."""
  return range(num_shards * process // processes, num_shards * (process + 1) // processes)


def build_and_publish_index(storage, embedder: nnx.Module, corpus, config: RealmConfig, *,
                            step: int, mesh: Mesh | None = None, with_scann: bool = True,
                            keep: int = 3, work_prefix: str = WORK_PREFIX, prefix: str = PREFIX,
                            dtype: str = "float32", batch_size: int = 256, scann_config=None,
                            embed_fn=None, progress: Callable[[int, int], None] | None = None) -> IndexInfo:
  """Embeds the corpus with `embedder` (the document tower of checkpoint `step`), builds a ScaNN
  searcher (unless `with_scann=False`), publishes `<prefix>/<version>/` and prunes to the newest
  `keep`. Every process of a multi-process job calls it together (`mesh` then holds this
  process's devices): each embeds its own contiguous run of corpus shards (`process_shards`),
  uploads those embedding files create-only and builds a searcher partition over its rows;
  after a barrier process 0 writes the manifest and swaps LATEST.

  Embeddings are staged under `work_prefix/` first; a crash and restart at the same step resumes
  there shard by shard. The staging files are deleted once the version is published. Raises
  `publish.PublishConflict` (on every process) if LATEST already names a version at least as new.
  """
  pid, procs = jax.process_index(), jax.process_count()
  corpus_sha = corpus_fingerprint(corpus)
  staging = staging_prefix(work_prefix, step, config, corpus_sha, dtype)
  mine = process_shards(corpus.num_shards, pid, procs)
  embed_fn = embed_fn or embed_lib.make_embed_fn(embedder, mesh, batch_size)
  log.info("index for step %d: embedding corpus shards %d..%d of %d into %s", step, mine.start, mine.stop - 1,
           corpus.num_shards, storage.uri(staging))
  missing = None  # staged embeddings that vanished under this process (see `_settle_missing`)
  try:
    emb = embed_lib.embed_corpus(
        corpus, embed_fn, storage, staging, block_len=corpus.block_len, dtype=dtype,
        identity={"step": step, "config_fingerprint": config.fingerprint(), "corpus_sha256": corpus_sha},
        progress=progress, shards=mine)
    log.info("index for step %d: embedded %d blocks in %.1f s (%d shards were already staged)",
             step, emb.embedded_blocks, emb.seconds, len(mine) - emb.embedded_shards)
  except FileNotFoundError as e:
    missing = f"{type(e).__name__}: {e}"
  parallel.barrier(f"realm-jax-index-{step}-embedded")
  _settle_missing(storage, prefix, step, None, missing)

  # Process 0 names the version (and finds out whether it may be published at all: not when
  # LATEST already names this step, so that two refreshers leave one version per step).
  version, expected, refused = None, 0, ""
  if pid == 0:
    version = publish.new_version(step)
    try:
      expected = publish.begin(storage, prefix, version, one_per_step=True)
    except publish.PublishConflict as e:
      version, refused = None, str(e)
  version = parallel.agree(version)
  if version is None:
    raise publish.PublishConflict(refused or f"{storage.uri(prefix)}: another publisher got there first "
                                             f"(process 0 refused to publish step {step})")

  # Each process uploads its own embedding files and its searcher partitions.
  t0 = time.perf_counter()
  first_rows = [0] + np.cumsum([int(s["num_blocks"]) for s in corpus.shards]).tolist()
  entries, row_files, parts, scann_seconds = {}, {}, [], 0.0
  try:
    # The searcher partitions are built as the shards stream by: a process holds at most one
    # partition's rows (plus one shard) in memory, not its whole share.
    from realm_jax.retrieval import scann_index
    scann_config = scann_config or scann_index.ScannConfig()
    mine_rows = sum(emb.rows[i] for i in mine)
    bounds = scann_index.partition_bounds(mine_rows, scann_config.partition_rows) if with_scann and mine_rows else []
    pending, held, done = [], 0, 0  # parsed rows not yet in a partition; how many; rows before them
    for i in mine:
      name = f"{EMB_DIR}/{embed_lib.shard_name(i)}"
      data = storage.read_bytes(emb.paths[i])
      row_files[name] = RowFile.describe(name, data, emb.rows[i]).to_json()
      entries.update(publish.upload(storage, prefix, version, {name: data}))
      if not bounds:
        continue
      pending.append(embed_lib.parse_embedding_shard(data, storage.uri(emb.paths[i]), emb.rows[i], emb.dim, dtype))
      held += emb.rows[i]
      del data
      while len(parts) < len(bounds) and bounds[len(parts)][1] <= done + held:  # the next partition's rows are in
        lo, hi = bounds[len(parts)]
        t1 = time.perf_counter()
        rows = np.concatenate(pending) if len(pending) > 1 else pending[0]
        searcher = scann_index.build_searcher(rows[:hi - lo], scann_config)
        part = {"dir": f"{SCANN_DIR}/part-{pid:05d}-{len(parts):04d}", "first_row": first_rows[mine.start] + lo,
                "rows": hi - lo}
        with tempfile.TemporaryDirectory(prefix="realm-index-") as tmp:
          local = publish.files_from_dir(scann_index.save_searcher(searcher, pathlib.Path(tmp) / "s"), part["dir"])
          entries.update(publish.upload(storage, prefix, version, local))
        parts.append(part)
        pending, held, done = ([rows[hi - lo:]] if held > hi - lo else []), held - (hi - lo), hi
        scann_seconds += time.perf_counter() - t1
        log.info("index for step %d: ScaNN partition %d/%d (%d rows) built in %.1f s", step, len(parts),
                 len(bounds), part["rows"], time.perf_counter() - t1)
  except FileNotFoundError as e:  # staged embeddings vanished while this process uploaded
    missing = f"{type(e).__name__}: {e}"
  mine_json = {"entries": {n: dataclasses.asdict(e) for n, e in entries.items()}, "row_files": row_files,
               "parts": parts, "embed_seconds": emb.seconds, "scann_seconds": scann_seconds,
               "upload_seconds": time.perf_counter() - t0, "dim": emb.dim}
  parallel.barrier(f"realm-jax-index-{version}-uploaded")
  _settle_missing(storage, prefix, step, version, missing)  # after every process stopped uploading
  everyone = parallel.gather_json(mine_json)

  dim = max(p["dim"] or 0 for p in everyone)
  names = [f"{EMB_DIR}/{embed_lib.shard_name(i)}" for i in range(corpus.num_shards)]
  all_rows = {n: rf for p in everyone for n, rf in p["row_files"].items()}
  info = IndexInfo(
      version, step, corpus_sha, config.fingerprint(), emb.num_blocks, dim, dtype,
      tuple((name, rows) for name, rows in zip(names, emb.rows)), with_scann,
      {"embed_seconds": round(max(p["embed_seconds"] for p in everyone), 3),
       "scann_seconds": round(max(p["scann_seconds"] for p in everyone), 3)},
      datetime.datetime.now(datetime.timezone.utc).isoformat(),
      tuple(all_rows[n] for n in names), tuple(part for p in everyone for part in p["parts"]))
  lost = None  # process 0's PublishConflict, told to every process
  if pid == 0:
    files = {n: publish.FileEntry(**e) for p in everyone for n, e in p["entries"].items()}
    t1 = time.perf_counter()
    try:  # LATEST moved since `begin` (another publisher of this step won): commit removes ours
      publish.commit(storage, prefix, version, files, info.to_metadata(), expected=expected)
    except publish.PublishConflict as e:
      lost = str(e)
    else:
      info = dataclasses.replace(info, timings={
          **info.timings, "publish_seconds": round(max(p["upload_seconds"] for p in everyone)
                                                   + time.perf_counter() - t1, 3)})
      log.info("index for step %d: published %s", step, storage.uri(f"{prefix}/{version}"))
      _clean_staging(storage, work_prefix, step)
      deleted = publish.prune(storage, prefix, keep)
      if deleted:
        log.info("index: pruned old versions %s", deleted)
  parallel.barrier(f"realm-jax-index-{version}-published")
  lost = parallel.gather_json(lost)[0]
  if lost:
    raise publish.PublishConflict(lost)
  return info


def _settle_missing(storage, prefix: str, step: int, version: str | None, missing: str | None) -> None:
  """Every process together: if staged embeddings vanished under any process (a FileNotFoundError
  there, `missing`), process 0 decides. When LATEST already names this step, another publisher of
  it (a second refresher) won and cleaned the staged embeddings both were using: `version`, what
  this job uploaded and nothing names, is removed and every process raises PublishConflict.
  Otherwise every process raises FileNotFoundError. Nothing when no process missed a file."""
  problems = [p for p in parallel.gather_json(missing) if p]
  if not problems:
    return
  verdict = None
  if jax.process_index() == 0:
    try:
      latest = latest_index_info(storage, prefix)
    except RealmError:
      latest = None
    if latest is not None and latest.step >= step:
      if version is not None:
        storage.delete(f"{prefix}/{version}")
      built = version or f"step {step}"
      verdict = (f"{storage.uri(prefix)}/LATEST already names {latest.version} (step {latest.step}), published "
                 f"while this publisher built {built}; the staged embeddings are gone and its partial upload "
                 "is removed")
  verdict = parallel.gather_json(verdict)[0]
  if verdict:
    raise publish.PublishConflict(verdict)
  raise FileNotFoundError(problems[0])


def _clean_staging(storage, work_prefix: str, step: int) -> None:
  """Deletes staged embeddings of this step and older ones (left by crashed runs). Housekeeping
  after a publish: a directory another publisher of the same step is still writing into cannot be
  removed now; it is left (with a log line) for the next publish to clean."""
  for name in storage.listdir(work_prefix.strip("/")):
    head = name.split("-", 1)[0]
    if head.isdigit() and int(head) <= step:
      try:
        storage.delete(f"{work_prefix.strip('/')}/{name}")
      except StorageError as e:
        log.warning("index: staged embeddings not cleaned yet (%s)", e)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def latest_index_info(storage, prefix: str = PREFIX) -> IndexInfo | None:
  """What LATEST names (reads LATEST and one manifest, no data), or None if nothing is
  published. Raises CorruptVersion / IndexLoadError if those are malformed."""
  manifest = publish.read_latest(storage, prefix)
  if manifest is None:
    return None
  return IndexInfo.from_manifest(manifest, storage.uri(f"{prefix}/{manifest.version}/{publish.MANIFEST}"))


class _Searchable:
  """What loaded index versions share: their info, and the ScaNN searcher of the version."""

  info: IndexInfo
  published: publish.PublishedVersion

  @property
  def version(self) -> str:
    return self.info.version

  @property
  def metadata(self) -> dict[str, Any]:
    return self.published.metadata

  def _parts(self) -> list[dict]:
    if self.info.scann_parts:
      return list(self.info.scann_parts)
    if self.info.has_scann:  # a version from before partitions: one searcher under scann/
      return [{"dir": SCANN_DIR, "first_row": 0, "rows": self.info.num_blocks}]
    raise IndexLoadError(f"{self.published.uri()}: this index version has no ScaNN searcher")

  def stage_searcher(self, local_dir: str | pathlib.Path) -> pathlib.Path:
    """Copies the ScaNN searcher files (each checked against the manifest) into `local_dir`;
    returns the directory that holds them (one subdirectory per partition)."""
    for part in self._parts():
      self.published.download(local_dir, under=part["dir"])
    return pathlib.Path(local_dir)

  def load_searcher(self):
    """The version's ScaNN searcher (its partitions searched as one), staged through a temp dir."""
    from realm_jax.retrieval import scann_index
    with tempfile.TemporaryDirectory(prefix="realm-scann-") as tmp:
      parts = [(scann_index.load_searcher(self.published.download(tmp, under=p["dir"])), p["first_row"])
               for p in self._parts()]
    return scann_index.PartitionedSearcher(parts)


@dataclasses.dataclass
class LoadedIndex(_Searchable):
  """A verified index version in host memory: float32 `[num_blocks, dim]` embeddings."""

  info: IndexInfo
  embeddings: np.ndarray
  published: publish.PublishedVersion

  def to_mesh(self, mesh: Mesh, row_axes=None, dtype=None):
    """The embeddings placed on `mesh`, sharded by rows (`mips.RowShardedEmbeddings`)."""
    from realm_jax.retrieval import mips
    return mips.shard_rows(self.embeddings, mesh, row_axes, dtype)


@dataclasses.dataclass
class IndexRows(_Searchable):
  """Some row ranges of an index version, each verified chunk by chunk: what one process of a
  multi-process job reads to place its devices' rows (`mips.local_row_ranges`)."""

  info: IndexInfo
  pieces: dict[tuple[int, int], np.ndarray]  # (lo, hi) -> float32 [hi - lo, dim]
  published: publish.PublishedVersion
  bytes_read: int

  def rows(self, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of one of the ranges that were read."""
    if (lo, hi) in self.pieces:
      return self.pieces[(lo, hi)]
    for (a, b), piece in self.pieces.items():
      if a <= lo and hi <= b:
        return piece[lo - a:hi - a]
    raise IndexLoadError(f"{self.published.uri()}: rows [{lo}, {hi}) were not read by this process")

  def to_mesh(self, mesh: Mesh, row_axes=None, dtype=None):
    """The rows placed on `mesh` (every range `mips.local_row_ranges` names must have been read)."""
    from realm_jax.retrieval import mips
    return mips.place_rows(self.info.num_blocks, self.info.dim, self.rows, mesh, row_axes,
                           np.float32 if dtype is None else dtype)


def _open(storage, prefix: str, version: str | None, attempts: int, load: Callable):
  """Runs `load(published_version)` on `version`, or on LATEST: a version that vanishes mid-read
  because a newer one was published and the old one pruned is retried on the new LATEST."""
  if version is not None:
    return load(publish.open_version(storage, prefix, version, verify=False))
  for attempt in range(attempts):
    pv = publish.open_latest(storage, prefix, verify=False)
    if pv is None:
      raise IndexLoadError(f"{storage.uri(f'{prefix}/{publish.LATEST}')}: no index published")
    try:
      return load(pv)
    except publish.CorruptVersion:
      now = publish.read_latest(storage, prefix)
      if attempt == attempts - 1 or now is None or now.version == pv.version:
        raise
  raise AssertionError("unreachable")


def _check(pv: publish.PublishedVersion, corpus, config: RealmConfig | None) -> IndexInfo:
  info = IndexInfo.from_manifest(pv.manifest, pv.uri(publish.MANIFEST))
  if corpus is not None:
    if info.num_blocks != corpus.num_blocks:
      raise IndexMismatch(f"{pv.uri(publish.MANIFEST)}: index has {info.num_blocks} blocks, the "
                          f"corpus has {corpus.num_blocks}")
    if info.corpus_sha256 != corpus_fingerprint(corpus):
      raise IndexMismatch(f"{pv.uri(publish.MANIFEST)}: index was built from another corpus "
                          f"(manifest sha256 {info.corpus_sha256[:12]}..., this corpus "
                          f"{corpus_fingerprint(corpus)[:12]}...)")
  if config is not None and info.config_fingerprint != config.fingerprint():
    raise IndexMismatch(f"{pv.uri(publish.MANIFEST)}: index was built for model config "
                        f"{info.config_fingerprint}, this model is {config.fingerprint()}")
  return info


def _check_files_exist(pv: publish.PublishedVersion, names: Sequence[str]) -> None:
  """Every process sees a missing or resized file of the version, not only the one reading it
  (a stat per file, no bytes read): so all processes refuse a broken version alike."""
  for name in names:
    st = pv.storage.stat(pv.path(name))
    if st is None:
      raise publish.CorruptVersion(f"{pv.uri(name)}: missing")
    entry = pv.manifest.files[name]
    if st.size != entry.size:
      raise publish.CorruptVersion(f"{pv.uri(name)}: has {st.size} bytes; manifest says {entry.size} bytes "
                                   "(truncated or replaced)")
    if entry.generation is not None and st.generation is not None and st.generation != entry.generation:
      raise publish.CorruptVersion(f"{pv.uri(name)}: generation {st.generation}, manifest pinned "
                                   f"{entry.generation} (the object was replaced)")


def load_index(storage, version: str | None = None, *, prefix: str = PREFIX, corpus=None,
               config: RealmConfig | None = None, attempts: int = 3) -> LoadedIndex:
  """Loads LATEST (or `version`) whole: every file verified against the manifest, the embeddings
  concatenated as float32. With `corpus` / `config`, refuses an index built for another corpus
  (num_blocks, manifest hash) or model (config fingerprint) with IndexMismatch."""

  def load(pv: publish.PublishedVersion) -> LoadedIndex:
    info = _check(pv, corpus, config)
    embeddings = np.empty((info.num_blocks, info.dim), np.float32)
    row = 0
    for name, rows in info.shards:
      try:
        embeddings[row:row + rows] = embed_lib.parse_embedding_shard(
            pv.read_bytes(name), pv.uri(name), rows, info.dim, info.dtype)
      except embed_lib.EmbedError as e:
        raise IndexLoadError(str(e)) from None
      row += rows
    return LoadedIndex(info, embeddings, pv)

  return _open(storage, prefix, version, attempts, load)


def load_index_rows(storage, ranges: Sequence[tuple[int, int]], version: str | None = None, *,
                    prefix: str = PREFIX, corpus=None, config: RealmConfig | None = None,
                    attempts: int = 3) -> IndexRows:
  """Reads only rows `ranges` of LATEST (or `version`), by byte range, every chunk read checked
  against the CRC32C the publisher recorded (checks as `load_index`). Versions published before
  range reads are read file by file (only the files the ranges touch)."""

  def load(pv: publish.PublishedVersion) -> IndexRows:
    info = _check(pv, corpus, config)
    _check_files_exist(pv, sorted(pv.manifest.files))
    starts = info.first_rows
    pieces, read, checked = {}, 0, set()
    for lo, hi in ranges:
      parts = []
      for i, (name, rows) in enumerate(info.shards):
        a, b = max(lo, starts[i]) - starts[i], min(hi, starts[i] + rows) - starts[i]
        if a >= b:
          continue
        if info.row_files:
          entry = pv.manifest.files[name]
          try:
            rf = RowFile.from_json(pv.path(name), rows, info.row_files[i], entry.generation)
            if name not in checked:  # the chunk checksums make up the file the manifest describes
              read += rf.check_whole(pv.storage, entry.size, entry.crc32c, pv.uri(name))
              checked.add(name)
            data = rf.read(pv.storage, a, b, pv.uri(name))
          except RowFileError as e:
            raise publish.CorruptVersion(str(e)) from None
          read += len(data)
          part = np.frombuffer(data, embed_lib.DTYPES[info.dtype]).reshape(b - a, info.dim)
        else:
          data = pv.read_bytes(name)
          read += len(data)
          part = embed_lib.parse_embedding_shard(data, pv.uri(name), rows, info.dim, info.dtype)[a:b]
        parts.append(part.astype(np.float32))
      pieces[(lo, hi)] = (np.concatenate(parts) if parts else np.zeros((0, info.dim), np.float32))
    return IndexRows(info, pieces, pv, read)

  return _open(storage, prefix, version, attempts, load)


__all__ = ["IndexInfo", "IndexLoadError", "IndexMismatch", "IndexRows", "LoadedIndex", "build_and_publish_index",
           "corpus_fingerprint", "latest_index_info", "load_index", "load_index_rows", "process_shards",
           "staging_prefix"]
