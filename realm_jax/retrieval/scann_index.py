"""ScaNN searcher over the block embeddings: build, batched search with exclusions, serialize.

The host-side retrieval backend (docs/DESIGN.md §1): the refresher builds a searcher (k-means tree +
anisotropic hashing + exact float32 reorder, dot product; brute force for small corpora) and
stages it through a local directory to storage; the trainer's input pipeline loads it back.
ScaNN needs local files, so every storage transfer goes through a temporary directory, and the
directory is serialized with relative paths so it can be moved. No pickle is read or written.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Any

import numpy as np

from realm_jax.errors import RealmError
from realm_jax.retrieval.mips import SearchResult

INFO_FILE = "realm_searcher.json"  # what was built; written next to ScaNN's own files
_ASSETS = "scann_assets.pbtxt"
_PICKLE = "scann_docids.pkl"  # written by ScaNN only for docids, which we never use
FORMAT = 1


class ScannIndexError(RealmError):
  """A searcher could not be built, saved or loaded; the message names the input or file."""


@dataclasses.dataclass(frozen=True)
class ScannConfig:
  """How to build a searcher. None fields are derived from the corpus size."""

  num_leaves: int | None = None  # k-means tree leaves; default ~sqrt(n)
  leaves_to_search: int | None = None  # default 20% of the leaves: recall@10 >= 0.99 on clustered
  # 100k x 128 (10% gave 0.95-0.96, and k-means' random start moved it either side of 0.95)
  reorder: int = 500  # candidates rescored exactly (float32) before the final top-k; 250 gave
  # recall@10 0.98 on 500k and 1M clustered rows, 500 gave 1.000 and 0.992
  partition_rows: int = 500_000  # a searcher per at most this many rows, merged at query time:
  # one searcher over 4M clustered rows reached recall@10 0.85 (0.94 with reorder 2000), because
  # its quantized scores cannot order the denser neighbourhoods; partitions keep each one's density
  dims_per_block: int = 2  # asymmetric hashing: dimensions per 4-bit code
  anisotropic_threshold: float = 0.2  # score-aware quantization (ScaNN's recommended value)
  training_sample_size: int = 100_000
  brute_force_below: int = 10_000  # corpora smaller than this skip the tree
  training_threads: int = 0  # 0 = all cores


@dataclasses.dataclass(frozen=True)
class SearcherInfo:
  """What was built; saved as JSON next to the searcher and checked on load."""

  num_rows: int
  dim: int
  kind: str  # "tree_ah" or "brute_force"
  num_leaves: int
  leaves_to_search: int
  reorder: int
  dims_per_block: int
  scann_version: str
  format: int = FORMAT

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, obj: Any, where: str) -> "SearcherInfo":
    names = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(obj, dict) or set(obj) != names:
      raise ScannIndexError(f"{where}: expected a JSON object with keys {sorted(names)}")
    if obj["format"] != FORMAT or obj["kind"] not in ("tree_ah", "brute_force"):
      raise ScannIndexError(f"{where}: unsupported format {obj['format']} / kind {obj['kind']}")
    return cls(**obj)


def _scann_ops() -> Any:
  """`scann.scann_ops_pybind` without running `scann/__init__.py`, which loads ScaNN's TensorFlow
  ops whenever TensorFlow is importable and fails (undefined absl symbol) against TF releases
  other than the one ScaNN was built with. The pybind searcher needs no TensorFlow."""
  name = "scann.scann_ops.py.scann_ops_pybind"
  if name in sys.modules:
    return sys.modules[name]
  if "scann" not in sys.modules:
    spec = importlib.util.find_spec("scann")
    if spec is None:
      raise ScannIndexError("ScaNN is not installed: pip install scann")
    package = importlib.util.module_from_spec(spec)  # the package, its __init__ not executed
    sys.modules["scann"] = package
    try:
      ops = importlib.import_module(name)
    except BaseException:
      del sys.modules["scann"]
      raise
    package.scann_ops_pybind = ops  # what `import scann` offers, minus the TF ops
    package.ScannBuilder = ops.scann_builder.ScannBuilder
    package.ReorderType = ops.scann_builder.ReorderType
    return ops
  return importlib.import_module(name)


def _scann_version() -> str:
  from importlib import metadata
  try:
    return metadata.version("scann")
  except metadata.PackageNotFoundError:
    return "unknown"


def default_leaves(num_rows: int) -> int:
  """~sqrt(n) leaves (ScaNN's rule of thumb), keeping >= 50 rows per leaf on average."""
  return max(1, min(round(math.sqrt(num_rows)), num_rows // 50))


def partition_bounds(num_rows: int, partition_rows: int) -> list[tuple[int, int]]:
  """[start, stop) row ranges of equal size (within one row), none longer than `partition_rows`."""
  if partition_rows < 1:
    raise ScannIndexError(f"partition_rows must be >= 1, got {partition_rows}")
  count = max(1, math.ceil(num_rows / partition_rows))
  return [(num_rows * i // count, num_rows * (i + 1) // count) for i in range(count)]


def _as_exclude(exclude_ids: np.ndarray | None, batch: int) -> np.ndarray:
  if exclude_ids is None:
    return np.full((batch, 0), -1, np.int64)
  ex = np.asarray(exclude_ids)
  if ex.ndim == 1:
    ex = ex[:, None]
  if ex.ndim != 2 or ex.shape[0] != batch or not np.issubdtype(ex.dtype, np.integer):
    raise ScannIndexError(f"exclude_ids must be integer [{batch}, E], got {ex.dtype} {ex.shape}")
  return ex.astype(np.int64)


class ScannIndex:
  """A built or loaded ScaNN searcher plus what it was built from."""

  def __init__(self, searcher: Any, info: SearcherInfo):
    self.searcher = searcher
    self.info = info

  def search(self, queries: np.ndarray, k: int, *, exclude_ids: np.ndarray | None = None,
             leaves_to_search: int | None = None, reorder: int | None = None,
             parallel: bool = False) -> SearchResult:
    """Top-k rows by inner product per query (best first), never returning `exclude_ids`
    (int [B, E], -1 = none). Missing results (corpus too small) are id -1, score -inf."""
    q = np.asarray(queries, np.float32)
    if q.ndim != 2 or q.shape[1] != self.info.dim:
      raise ScannIndexError(f"queries must be [batch, {self.info.dim}], got shape {q.shape}")
    if k < 1:
      raise ScannIndexError(f"k must be >= 1, got {k}")
    ex = _as_exclude(exclude_ids, q.shape[0])
    batch = q.shape[0]
    if batch == 0:
      return SearchResult(np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))
    want = min(k + ex.shape[1], self.info.num_rows)
    pre = max(reorder or self.info.reorder, want)
    kwargs = dict(final_num_neighbors=want, pre_reorder_num_neighbors=pre)
    if self.info.kind == "tree_ah":
      kwargs["leaves_to_search"] = leaves_to_search or self.info.leaves_to_search
    if parallel:
      ids, scores = self.searcher.search_batched_parallel(q, **kwargs)
    else:
      ids, scores = self.searcher.search_batched(q, **kwargs)
    ids, scores = np.asarray(ids, np.int64), np.asarray(scores, np.float32)
    # ScaNN may return fewer than asked (tiny leaves); pad, then drop excluded ids.
    if ids.shape[1] < k + ex.shape[1]:
      pad = k + ex.shape[1] - ids.shape[1]
      ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
      scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    bad = (ids < 0) | (ids >= self.info.num_rows) | ~np.isfinite(scores)
    if ex.shape[1]:
      bad |= (ids[:, :, None] == np.where(ex < 0, -2, ex)[:, None, :]).any(-1)
    order = np.argsort(bad, axis=1, kind="stable")[:, :k]  # keeps ScaNN's order among the good
    ids = np.take_along_axis(np.where(bad, -1, ids), order, axis=1)
    scores = np.take_along_axis(np.where(bad, -np.inf, scores), order, axis=1)
    return SearchResult(ids.astype(np.int32), scores.astype(np.float32))


def build_searcher(embeddings: np.ndarray, config: ScannConfig = ScannConfig()) -> ScannIndex:
  """Build a dot-product searcher over float32 [n, dim] embeddings (bf16 is widened)."""
  scann_ops_pybind = _scann_ops()
  db = np.asarray(embeddings)
  if db.ndim != 2 or db.shape[0] < 1 or db.shape[1] < 1:
    raise ScannIndexError(f"embeddings must be a non-empty [rows, dim] matrix, got {db.shape}")
  db = np.ascontiguousarray(db, dtype=np.float32)
  finite = np.isfinite(db).all(axis=1)
  if not finite.all():
    raise ScannIndexError(f"embedding row {int(np.argmin(finite))} is not finite (NaN or inf)")
  n, dim = db.shape
  builder = scann_ops_pybind.builder(db, min(10, n), "dot_product")
  if config.training_threads:
    builder = builder.set_n_training_threads(config.training_threads)
  if n < config.brute_force_below:
    searcher = builder.score_brute_force().build()
    info = SearcherInfo(n, dim, "brute_force", 0, 0, config.reorder, 0, _scann_version())
    return ScannIndex(searcher, info)
  leaves = config.num_leaves or default_leaves(n)
  if not 1 <= leaves <= n:
    raise ScannIndexError(f"num_leaves={leaves} must be in [1, {n}] for {n} rows")
  to_search = config.leaves_to_search or max(1, math.ceil(leaves / 5))
  to_search = min(to_search, leaves)
  if dim % config.dims_per_block:
    raise ScannIndexError(f"dims_per_block={config.dims_per_block} must divide dim={dim}")
  sample = min(n, config.training_sample_size)
  searcher = (builder.tree(num_leaves=leaves, num_leaves_to_search=to_search,
                           training_sample_size=sample)
              .score_ah(config.dims_per_block,
                        anisotropic_quantization_threshold=config.anisotropic_threshold,
                        training_sample_size=sample)
              .reorder(config.reorder).build())
  info = SearcherInfo(n, dim, "tree_ah", leaves, to_search, config.reorder,
                      config.dims_per_block, _scann_version())
  return ScannIndex(searcher, info)


def save_searcher(index: ScannIndex, local_dir: str | os.PathLike) -> pathlib.Path:
  """Serialize into a new local directory (relative paths, so it can be moved or uploaded).

  Written to a temporary sibling and renamed, so `local_dir` is either complete or absent.
  """
  final = pathlib.Path(local_dir)
  if final.exists() and (not final.is_dir() or any(final.iterdir())):
    raise ScannIndexError(f"{final}: already exists and is not an empty directory")
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
  try:
    index.searcher.serialize(str(tmp), relative_path=True)
    (tmp / INFO_FILE).write_text(json.dumps(index.info.to_json(), indent=2, sort_keys=True))
    if final.exists():
      final.rmdir()
    os.replace(tmp, final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


def load_searcher(local_dir: str | os.PathLike) -> ScannIndex:
  """Load a directory written by `save_searcher` (without ScaNN's pickle-based docids path)."""
  ops = _scann_ops()
  d = pathlib.Path(local_dir)
  info_path, assets = d / INFO_FILE, d / _ASSETS
  for p in (info_path, assets):
    if not p.is_file():
      raise ScannIndexError(f"{p}: missing; {d} is not a searcher saved by save_searcher")
  if (d / _PICKLE).exists():
    raise ScannIndexError(f"{d / _PICKLE}: refusing to load a searcher that carries a pickle")
  try:
    info = SearcherInfo.from_json(json.loads(info_path.read_text()), str(info_path))
  except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
    raise ScannIndexError(f"{info_path}: not valid searcher info JSON: {e}") from None
  try:
    searcher = ops.ScannSearcher(ops.scann_pybind.ScannNumpy(str(d), assets.read_text()))
  except (RuntimeError, ValueError, OSError) as e:
    raise ScannIndexError(f"{d}: ScaNN could not load this searcher: {e}") from None
  return ScannIndex(searcher, info)


def save_to_storage(index: ScannIndex, storage: Any, prefix: str) -> list[str]:
  """Serialize and upload under `prefix/` of a `realm_jax.storage.Storage`, create-only (a
  published searcher is never overwritten). Returns the uploaded paths relative to `prefix`.

  For a versioned index, publish `realm_jax.publish.files_from_dir(local_dir, under)` instead.
  """
  with tempfile.TemporaryDirectory(prefix="realm-scann-") as tmp:
    local = save_searcher(index, pathlib.Path(tmp) / "searcher")
    return sorted(storage.upload_dir(local, prefix, exclusive=True))


def load_from_storage(storage: Any, prefix: str, *,
                      local_dir: str | os.PathLike | None = None) -> ScannIndex:
  """Stage `prefix/` of a Storage into `local_dir` (default: a temp dir removed after loading)
  and load it. ScaNN reads everything into memory at load, so the staging copy can go."""
  if local_dir is not None:
    return load_searcher(storage.download_dir(prefix, local_dir))
  with tempfile.TemporaryDirectory(prefix="realm-scann-") as tmp:
    return load_searcher(storage.download_dir(prefix, pathlib.Path(tmp) / "searcher"))


def load_published(version: Any, under: str = "scann") -> ScannIndex:
  """Load the searcher stored under `under/` of a `realm_jax.publish.PublishedVersion`, each
  file checked against the version's manifest while staging."""
  with tempfile.TemporaryDirectory(prefix="realm-scann-") as tmp:
    return load_searcher(version.download(tmp, under=under))


class PartitionedSearcher:
  """Several searchers over consecutive row ranges of one corpus (one per refresher process),
  searched as one: each partition returns its top k (+ exclusions), ids are shifted by the
  partition's first row, and the best k of all are kept. `info` describes the whole."""

  def __init__(self, parts: list[tuple[ScannIndex, int]]):
    if not parts:
      raise ScannIndexError("a partitioned searcher needs at least one partition")
    self.parts = sorted(parts, key=lambda p: p[1])
    dims = {index.info.dim for index, _ in self.parts}
    if len(dims) != 1:
      raise ScannIndexError(f"partitions disagree on the embedding width: {sorted(dims)}")
    first = self.parts[0][0].info
    rows = sum(index.info.num_rows for index, _ in self.parts)
    self.info = dataclasses.replace(first, num_rows=rows)

  def search(self, queries: np.ndarray, k: int, *, exclude_ids: np.ndarray | None = None,
             parallel: bool = False) -> SearchResult:
    """Top-k global row ids per query over every partition (see `ScannIndex.search`)."""
    if len(self.parts) == 1 and self.parts[0][1] == 0:
      return self.parts[0][0].search(queries, k, exclude_ids=exclude_ids, parallel=parallel)
    q = np.asarray(queries, np.float32)
    ex = _as_exclude(exclude_ids, q.shape[0]) if q.ndim == 2 else None
    ids, scores = [], []
    for index, offset in self.parts:
      local_ex = None if ex is None or not ex.shape[1] else np.where(ex >= 0, ex - offset, -1)
      if local_ex is not None:
        local_ex = np.where((local_ex >= 0) & (local_ex < index.info.num_rows), local_ex, -1)
      res = index.search(q, k, exclude_ids=local_ex, parallel=parallel)
      ids.append(np.where(res.ids >= 0, res.ids.astype(np.int64) + offset, -1))
      scores.append(res.scores)
    ids, scores = np.concatenate(ids, axis=1), np.concatenate(scores, axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return SearchResult(np.take_along_axis(ids, order, axis=1).astype(np.int32),
                        np.take_along_axis(scores, order, axis=1).astype(np.float32))
