"""Index versions: the corpus embeddings (+ optionally a ScaNN searcher) published atomically.

The refresher calls `build_and_publish_index` (embed into a staging prefix that survives a
restart at the same checkpoint step, then publish `index/<version>/` through
`realm_jax.publish`, then prune); the trainer polls `latest_index_info` (LATEST + manifest only)
and calls `load_index` off its critical path. Any failure to load raises a `RealmError` naming the
file (`publish.CorruptVersion`, `IndexLoadError`), so the trainer can log it and keep its index.

A version holds:
  embeddings/emb-00000.npy ...   one per corpus shard, rows in block-id order
  scann/...                      optional serialized searcher (`scann_index.save_searcher`)
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
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from realm_jax import layout, publish
from realm_jax.config import RealmConfig
from realm_jax.errors import RealmError
from realm_jax.retrieval import embed as embed_lib
from realm_jax.storage import StorageError

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

  def to_metadata(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.pop("version")
    d["shards"] = [{"path": p, "rows": r} for p, r in self.shards]
    return {"format": FORMAT, **d}

  @classmethod
  def from_manifest(cls, manifest: publish.Manifest, where: str) -> "IndexInfo":
    """Parses a version's metadata; anything malformed raises IndexLoadError naming `where`."""
    m = manifest.metadata
    try:
      if m.get("format") != FORMAT:
        raise ValueError(f"format {m.get('format')!r}, expected {FORMAT!r}")
      shards = tuple((str(s["path"]), int(s["rows"])) for s in m["shards"])
      info = cls(manifest.version, int(m["step"]), str(m["corpus_sha256"]),
                 str(m["config_fingerprint"]), int(m["num_blocks"]), int(m["dim"]), str(m["dtype"]),
                 shards, bool(m["has_scann"]), {k: float(v) for k, v in m["timings"].items()},
                 str(m["created"]))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      raise IndexLoadError(f"{where}: not realm-jax index metadata ({e})") from None
    if info.dtype not in embed_lib.DTYPES or sum(r for _, r in shards) != info.num_blocks:
      raise IndexLoadError(f"{where}: dtype {info.dtype!r} / shard rows {sum(r for _, r in shards)}"
                           f" inconsistent with num_blocks {info.num_blocks}")
    missing = [p for p, _ in shards if p not in manifest.files]
    if missing:
      raise IndexLoadError(f"{where}: metadata names shards the manifest does not list: {missing}")
    return info


# ---------------------------------------------------------------------------------------------
# Building and publishing
# ---------------------------------------------------------------------------------------------


class _StagedFiles(Mapping[str, bytes]):
  """publish() input read lazily from storage, so one shard at a time is in memory."""

  def __init__(self, storage, sources: dict[str, str], local: dict[str, pathlib.Path]):
    self.storage, self.sources, self.local = storage, sources, local

  def __getitem__(self, name: str):
    if name in self.local:
      return self.local[name]
    return self.storage.read_bytes(self.sources[name])

  def __iter__(self) -> Iterator[str]:
    return iter([*self.sources, *self.local])

  def __len__(self) -> int:
    return len(self.sources) + len(self.local)


def staging_prefix(work_prefix: str, step: int, config: RealmConfig, corpus_sha256: str,
                   dtype: str) -> str:
  """Where the embeddings for (step, model, corpus, dtype) are staged: stable across restarts."""
  return f"{work_prefix.strip('/')}/{step:012d}-{config.fingerprint()}-{corpus_sha256[:12]}-{dtype}"


def build_and_publish_index(storage, embedder: nnx.Module, corpus, config: RealmConfig, *,
                            step: int, mesh: Mesh | None = None, with_scann: bool = False,
                            keep: int = 3, work_prefix: str = WORK_PREFIX, prefix: str = PREFIX,
                            dtype: str = "float32", batch_size: int = 256, scann_config=None,
                            embed_fn=None, progress: Callable[[int, int], None] | None = None) -> IndexInfo:
  """Embeds the corpus with `embedder` (the document tower of checkpoint `step`), optionally
  builds a ScaNN searcher, publishes `<prefix>/<version>/` and prunes to the newest `keep`.

  Embeddings are staged under `work_prefix/` first; a crash and restart at the same step resumes
  there shard by shard. The staging files are deleted once the version is published. Raises
  `publish.PublishConflict` if LATEST already names a version at least as new.
  """
  version = publish.new_version(step)
  try:
    corpus_sha = corpus_fingerprint(corpus)
    staging = staging_prefix(work_prefix, step, config, corpus_sha, dtype)
    embed_fn = embed_fn or embed_lib.make_embed_fn(embedder, mesh, batch_size)
    log.info("index for step %d: embedding %d blocks (%d shards) into %s", step, corpus.num_blocks,
             corpus.num_shards, storage.uri(staging))
    emb = embed_lib.embed_corpus(
        corpus, embed_fn, storage, staging, block_len=corpus.block_len, dtype=dtype,
        identity={"step": step, "config_fingerprint": config.fingerprint(), "corpus_sha256": corpus_sha},
        progress=progress)
    log.info("index for step %d: embedded %d blocks in %.1f s (%d shards were already staged)",
             step, emb.embedded_blocks, emb.seconds, len(emb.paths) - emb.embedded_shards)
    sources = {f"{EMB_DIR}/{embed_lib.shard_name(i)}": p for i, p in enumerate(emb.paths)}
    with tempfile.TemporaryDirectory(prefix="realm-index-") as tmp:
      local, scann_seconds = {}, 0.0
      if with_scann:
        from realm_jax.retrieval import scann_index
        t0 = time.perf_counter()
        searcher = scann_index.build_searcher(emb.load(storage), scann_config or scann_index.ScannConfig())
        local = publish.files_from_dir(scann_index.save_searcher(searcher, pathlib.Path(tmp) / "s"),
                                       SCANN_DIR)
        scann_seconds = time.perf_counter() - t0
        log.info("index for step %d: ScaNN searcher built in %.1f s", step, scann_seconds)
      info = IndexInfo(
          version, step, corpus_sha, config.fingerprint(), emb.num_blocks, emb.dim, dtype,
          tuple((name, rows) for name, rows in zip(sources, emb.rows)), with_scann,
          {"embed_seconds": round(emb.seconds, 3), "scann_seconds": round(scann_seconds, 3)},
          datetime.datetime.now(datetime.timezone.utc).isoformat())
      t0 = time.perf_counter()
      publish.publish(storage, prefix, version, _StagedFiles(storage, sources, local),
                      info.to_metadata(), one_per_step=True)
  except FileNotFoundError:  # staged embeddings vanished while this publisher embedded or uploaded
    latest = latest_index_info(storage, prefix)
    if latest is None or latest.step < step:
      raise
    # Another publisher of this step (a second refresher) won and cleaned the staged embeddings
    # both were using: what this one uploaded is its own version that nothing names; removed.
    storage.delete(f"{prefix}/{version}")
    raise publish.PublishConflict(f"{storage.uri(prefix)}/LATEST already names {latest.version} (step "
                                  f"{latest.step}), published while this publisher built {version}; the staged "
                                  "embeddings are gone and its partial upload is removed") from None
  info = dataclasses.replace(info, timings={**info.timings,
                                            "publish_seconds": round(time.perf_counter() - t0, 3)})
  log.info("index for step %d: published %s", step, storage.uri(f"{prefix}/{version}"))
  _clean_staging(storage, work_prefix, step)
  deleted = publish.prune(storage, prefix, keep)
  if deleted:
    log.info("index: pruned old versions %s", deleted)
  return info


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


@dataclasses.dataclass
class LoadedIndex:
  """A verified index version in host memory: float32 `[num_blocks, dim]` embeddings."""

  info: IndexInfo
  embeddings: np.ndarray
  published: publish.PublishedVersion

  @property
  def version(self) -> str:
    return self.info.version

  @property
  def metadata(self) -> dict[str, Any]:
    return self.published.metadata

  def stage_searcher(self, local_dir: str | pathlib.Path) -> pathlib.Path:
    """Copies the ScaNN searcher files (each checked against the manifest) into `local_dir`;
    returns the directory to pass to `scann_index.load_searcher`."""
    if not self.info.has_scann:
      raise IndexLoadError(f"{self.published.uri()}: this index version has no ScaNN searcher")
    return self.published.download(local_dir, under=SCANN_DIR)

  def load_searcher(self):
    """The ScaNN searcher of this version, staged through a temp dir removed after loading."""
    from realm_jax.retrieval import scann_index
    with tempfile.TemporaryDirectory(prefix="realm-scann-") as tmp:
      return scann_index.load_searcher(self.stage_searcher(tmp))

  def to_mesh(self, mesh: Mesh, row_axes=None, dtype=None):
    """The embeddings placed on `mesh`, sharded by rows (`mips.RowShardedEmbeddings`)."""
    from realm_jax.retrieval import mips
    return mips.shard_rows(self.embeddings, mesh, row_axes, dtype)


def load_index(storage, version: str | None = None, *, prefix: str = PREFIX, corpus=None,
               config: RealmConfig | None = None, attempts: int = 3) -> LoadedIndex:
  """Loads LATEST (or `version`): every file verified against the manifest, the embeddings
  concatenated as float32. With `corpus` / `config`, refuses an index built for another corpus
  (num_blocks, manifest hash) or model (config fingerprint) with IndexMismatch.

  Following LATEST, a version that vanishes mid-read because a newer one was published and the
  old one pruned is retried on the new LATEST (up to `attempts` times); a bad version that LATEST
  still names raises."""
  if version is not None:
    return _load_version(storage, prefix, publish.open_version(storage, prefix, version), corpus,
                         config)
  for attempt in range(attempts):
    pv = publish.open_latest(storage, prefix, verify=True)
    if pv is None:
      raise IndexLoadError(f"{storage.uri(f'{prefix}/{publish.LATEST}')}: no index published")
    try:
      return _load_version(storage, prefix, pv, corpus, config)
    except publish.CorruptVersion:
      now = publish.read_latest(storage, prefix)
      if attempt == attempts - 1 or now is None or now.version == pv.version:
        raise
  raise AssertionError("unreachable")


def _load_version(storage, prefix: str, pv: publish.PublishedVersion, corpus,
                  config: RealmConfig | None) -> LoadedIndex:
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


__all__ = ["IndexInfo", "IndexLoadError", "IndexMismatch", "LoadedIndex", "build_and_publish_index",
           "corpus_fingerprint", "latest_index_info", "load_index", "staging_prefix"]
