"""Exact (or approximate) top-k maximum inner product search over row-sharded embeddings.

The document embeddings live on the mesh sharded by rows; a search all-gathers the queries, scores
each device's rows in tiles (never the full [queries x rows] matrix), keeps a small per-shard
candidate list, all-gathers the candidates and takes the global top-k. It runs inside `jax.jit`
(e.g. a train step whose query batch is sharded over `data`) and returns global row ids.

Exact tiles use a group-max filter: the rows of a tile are split into groups of `group_size`; only
the per-group maxima are kept, and at the end the rows of the best k groups are rescored exactly.
This is exact (the k best rows always lie in the k groups with the largest maxima) and keeps the
top-k selection off the matmul's critical path, which makes the search matmul-bound.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from realm_jax.errors import RealmError

AxisNames = tuple[str, ...]


class SearchError(RealmError, ValueError):
  """A search was asked with inconsistent shapes or arguments."""


class SearchResult(NamedTuple):
  """Top-k neighbours per query, best first. Missing results have id -1 and score -inf."""

  ids: jax.Array | np.ndarray  # int32 [B, k] global row ids
  scores: jax.Array | np.ndarray  # float32 [B, k] inner products


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowShardedEmbeddings:
  """An embedding matrix placed on a mesh, rows sharded over `row_axes`, padded to a multiple of
  the shard count; rows at or past `num_rows` are padding and never returned by a search."""

  embeddings: jax.Array  # [padded_rows, dim]
  num_rows: int = dataclasses.field(metadata=dict(static=True))
  mesh: Mesh = dataclasses.field(metadata=dict(static=True))
  row_axes: AxisNames = dataclasses.field(metadata=dict(static=True))

  @property
  def dim(self) -> int:
    return self.embeddings.shape[1]

  @property
  def num_shards(self) -> int:
    return _axes_size(self.mesh, self.row_axes)


def _axes_size(mesh: Mesh, axes: AxisNames) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _as_axes(axes: str | Sequence[str] | None) -> AxisNames:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def _check_axes(mesh: Mesh, axes: AxisNames, what: str) -> None:
  unknown = [a for a in axes if a not in mesh.axis_names]
  if unknown:
    raise SearchError(f"{what} {unknown} are not axes of the mesh {tuple(mesh.axis_names)}")


def place_rows(num_rows: int, dim: int, load_rows: Callable[[int, int], np.ndarray], mesh: Mesh,
               row_axes: str | Sequence[str] | None = None,
               dtype: jnp.dtype = np.float32) -> RowShardedEmbeddings:
  """Builds the row-sharded matrix shard by shard: `load_rows(start, stop)` returns those rows.

  Each process loads only the rows of its own devices (works on multi-host meshes), padding past
  `num_rows` with zeros. `row_axes` defaults to every mesh axis (rows spread over all devices).
  """
  axes = tuple(mesh.axis_names) if row_axes is None else _as_axes(row_axes)
  _check_axes(mesh, axes, "row_axes")
  if num_rows < 1:
    raise SearchError(f"cannot place an embedding matrix with {num_rows} rows")
  shards = _axes_size(mesh, axes)
  padded = -(-num_rows // shards) * shards
  sharding = NamedSharding(mesh, P(axes, None))

  def shard(index: tuple[slice, ...]) -> np.ndarray:
    start, stop, _ = index[0].indices(padded)
    lo, hi = min(start, num_rows), min(stop, num_rows)
    rows = np.asarray(load_rows(lo, hi)) if hi > lo else np.zeros((0, dim), dtype)
    if rows.shape != (hi - lo, dim):
      raise SearchError(f"load_rows({lo}, {hi}) returned shape {rows.shape}, "
                        f"expected ({hi - lo}, {dim})")
    rows = rows.astype(dtype, copy=False)
    if stop - start > hi - lo:
      rows = np.concatenate([rows, np.zeros((stop - start - (hi - lo), dim), dtype)])
    return rows

  array = jax.make_array_from_callback((padded, dim), sharding, shard)
  return RowShardedEmbeddings(array, num_rows, mesh, axes)


def local_row_ranges(num_rows: int, mesh: Mesh, row_axes: str | Sequence[str] | None = None) -> list[tuple[int, int]]:
  """The (lo, hi) row ranges `place_rows` asks this process for: its own devices' rows (clipped
  to `num_rows`, without repeats), so it can read just those before placing them."""
  axes = tuple(mesh.axis_names) if row_axes is None else _as_axes(row_axes)
  _check_axes(mesh, axes, "row_axes")
  shards = _axes_size(mesh, axes)
  padded = -(-num_rows // shards) * shards
  ranges = set()
  for index in NamedSharding(mesh, P(axes, None)).addressable_devices_indices_map((padded, 1)).values():
    start, stop, _ = index[0].indices(padded)
    lo, hi = min(start, num_rows), min(stop, num_rows)
    if hi > lo:
      ranges.add((lo, hi))
  return sorted(ranges)


def shard_rows(matrix: np.ndarray, mesh: Mesh, row_axes: str | Sequence[str] | None = None,
               dtype: jnp.dtype | None = None) -> RowShardedEmbeddings:
  """Places a host [rows, dim] matrix (numpy or memory-mapped) on the mesh, sharded by rows."""
  if matrix.ndim != 2:
    raise SearchError(f"embedding matrix must be [rows, dim], got shape {matrix.shape}")
  return place_rows(matrix.shape[0], matrix.shape[1], lambda a, b: matrix[a:b], mesh, row_axes,
                    matrix.dtype if dtype is None else dtype)


def _batch_axes(x: jax.Array, mesh: Mesh) -> AxisNames:
  """Mesh axes the leading (batch) dim of `x` is sharded over, as far as JAX knows here."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  if not spec or spec[0] is None:
    return ()
  axes = _as_axes(spec[0])
  return axes if all(a in mesh.axis_names for a in axes) else ()


def _topk_padded(scores: jax.Array, ids: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Top-k along the last axis; pads with (-inf, -1) where fewer than k candidates exist."""
  n = scores.shape[-1]
  if n < k:
    pad = [(0, 0)] * (scores.ndim - 1) + [(0, k - n)]
    scores = jnp.pad(scores, pad, constant_values=-jnp.inf)
    ids = jnp.pad(ids, pad, constant_values=-1)
  top, pos = lax.top_k(scores, k)
  return top, jnp.take_along_axis(ids, pos, axis=-1)


def _mask(scores: jax.Array, ids: jax.Array, num_rows: int | None,
          exclude: jax.Array | None) -> jax.Array:
  """Sets padding rows (id >= num_rows, None = no padding) and excluded ids to -inf."""
  bad = jnp.zeros(scores.shape, bool)
  if num_rows is not None:
    bad |= ids >= num_rows
  if exclude is not None:
    ids_b = ids if ids.ndim == scores.ndim else ids[None]
    for e in range(exclude.shape[1]):
      ex = exclude[:, e].reshape((-1,) + (1,) * (scores.ndim - 1))
      bad |= ids_b == ex
  return jnp.where(bad, -jnp.inf, scores)


def _dot(q: jax.Array, x: jax.Array, precision: str | None) -> jax.Array:
  return lax.dot_general(q, x, (((1,), (1,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _local_topk(q: jax.Array, x: jax.Array, base: jax.Array, num_rows: int | None,
                exclude: jax.Array | None, k: int, chunk_rows: int, group_size: int,
                approx: bool, recall_target: float,
                precision: str | None) -> tuple[jax.Array, jax.Array]:
  """Top-k of one shard's rows for every query, tiled over rows; returns (scores, global ids)."""
  rows = x.shape[0]
  q = q.astype(x.dtype)
  g = group_size
  chunk = min(max(g, chunk_rows // g * g), rows)  # tiles hold whole groups
  if not approx and k * g >= rows:
    chunk = rows  # the whole shard is as small as the rescoring set: score it directly
  if chunk == rows and (not approx or k >= rows):
    ids = base + jnp.arange(rows, dtype=jnp.int32)
    scores = _mask(_dot(q, x, precision), ids, num_rows, exclude)
    return _topk_padded(scores, jnp.broadcast_to(ids, scores.shape), k)

  def tile(start: jax.Array | int, size: int) -> tuple[jax.Array, jax.Array]:
    xs = lax.dynamic_slice_in_dim(x, start, size, axis=0)
    ids = base + start + jnp.arange(size, dtype=jnp.int32)
    return _mask(_dot(q, xs, precision), ids, num_rows, exclude), ids

  def summarize(start: jax.Array | int, size: int) -> tuple[jax.Array, ...]:
    scores, ids = tile(start, size)
    if approx:
      kk = min(k, size)
      top, pos = lax.approx_max_k(scores, kk, recall_target=recall_target)
      return top, jnp.take_along_axis(jnp.broadcast_to(ids, scores.shape), pos, axis=-1)
    pad = -size % g
    if pad:
      scores = jnp.pad(scores, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    return (scores.reshape(scores.shape[0], -1, g).max(axis=-1),)

  full, rest = divmod(rows, chunk)
  parts = []
  if full:
    stacked = lax.map(lambda i: summarize(i * chunk, chunk), jnp.arange(full, dtype=jnp.int32))
    parts.append([jnp.moveaxis(s, 0, 1).reshape(q.shape[0], -1) for s in stacked])
  if rest:
    parts.append(list(summarize(full * chunk, rest)))
  merged = [jnp.concatenate(p, axis=1) for p in zip(*parts)]
  if approx:
    return _topk_padded(merged[0], merged[1], k)

  group_max = merged[0]  # [B, groups]; group j holds local rows [j*g, (j+1)*g)
  kk = min(k, group_max.shape[1])
  _, best = lax.top_k(group_max, kk)
  local = (best[:, :, None] * g + jnp.arange(g, dtype=jnp.int32)).reshape(q.shape[0], -1)
  inside = local < rows
  local = jnp.minimum(local, rows - 1)
  scores = jnp.einsum("bd,bnd->bn", q, jnp.take(x, local, axis=0), precision=precision,
                      preferred_element_type=jnp.float32)
  ids = base + local
  scores = jnp.where(inside, _mask(scores, ids, num_rows, exclude), -jnp.inf)
  return _topk_padded(scores, ids, k)


def search(queries: jax.Array, index: RowShardedEmbeddings, k: int, *,
           exclude_ids: jax.Array | None = None, approx: bool = False,
           recall_target: float = 0.95, chunk_rows: int | None = None,
           group_size: int = 32, precision: str | None = None) -> SearchResult:
  """Top-k rows of `index` by inner product with each query (best first), jit-compatible.

  queries: [B, dim], replicated or sharded over mesh axes on the batch dim (the result is
  sharded the same way). exclude_ids: int [B, E] global ids never to return per query (-1 = none),
  e.g. the query's own source block. approx: use `lax.approx_max_k` per tile (fast on TPU) with
  `recall_target`; otherwise the search is exact at the matmul precision: `precision=None` is
  the backend's default (float32 on CPU, TF32 on NVIDIA GPUs, bf16 passes on TPU, where near-ties
  can swap against a float32 brute force); "highest" gives float32 scores everywhere.
  chunk_rows: rows scored per tile and device (default 4096 on CPU, 65536 on accelerators, the
  best measured: benchmarks/mips.py); group_size: rows per group of the exact filter.
  """
  if queries.ndim != 2 or queries.shape[1] != index.dim:
    raise SearchError(f"queries must be [batch, {index.dim}], got shape {queries.shape}")
  if k < 1:
    raise SearchError(f"k must be >= 1, got {k}")
  if chunk_rows is None:
    cpu = index.mesh.devices.flat[0].platform == "cpu"
    chunk_rows = 4096 if cpu else 65536
  if chunk_rows < 1 or group_size < 1:
    raise SearchError(f"chunk_rows and group_size must be >= 1, got {chunk_rows}, {group_size}")
  batch = queries.shape[0]
  if exclude_ids is not None:
    exclude_ids = jnp.asarray(exclude_ids)
    if exclude_ids.ndim == 1:
      exclude_ids = exclude_ids[:, None]
    if exclude_ids.ndim != 2 or exclude_ids.shape[0] != batch:
      raise SearchError(f"exclude_ids must be [{batch}, E], got shape {exclude_ids.shape}")
    exclude_ids = exclude_ids.astype(jnp.int32)

  if precision not in (None, "default", "high", "highest"):
    raise SearchError(f"precision must be None, 'default', 'high' or 'highest', got {precision!r}")
  return _search(queries, index, exclude_ids, k=k, approx=approx, recall_target=recall_target,
                 chunk_rows=chunk_rows, group_size=group_size, precision=precision)


@functools.partial(jax.jit, static_argnames=("k", "approx", "recall_target", "chunk_rows",
                                             "group_size", "precision"))
def _search(queries: jax.Array, index: RowShardedEmbeddings, exclude_ids: jax.Array | None, *,
            k: int, approx: bool, recall_target: float, chunk_rows: int, group_size: int,
            precision: str | None) -> SearchResult:
  """The search as one compiled program (also when called eagerly), nested in any outer jit."""
  mesh, row_axes = index.mesh, index.row_axes
  batch_axes = _batch_axes(queries, mesh)
  if exclude_ids is not None and _batch_axes(exclude_ids, mesh) != batch_axes:
    exclude_ids = jax.reshard(exclude_ids, NamedSharding(mesh, P(batch_axes or None, None)))
  gather_axes = tuple(a for a in batch_axes if a in row_axes)  # all queries meet all rows
  shards = index.num_shards
  rows_per_shard = index.embeddings.shape[0] // shards
  num_rows = index.num_rows if index.num_rows < index.embeddings.shape[0] else None

  def body(q: jax.Array, x: jax.Array, ex: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    if gather_axes:
      q = lax.all_gather(q, gather_axes, axis=0, tiled=True, to="invarying")
      if ex is not None:
        ex = lax.all_gather(ex, gather_axes, axis=0, tiled=True, to="invarying")
    base = lax.axis_index(row_axes).astype(jnp.int32) * rows_per_shard
    scores, ids = _local_topk(q, x, base, num_rows, ex, k, chunk_rows, group_size, approx,
                              recall_target, precision)
    scores = lax.all_gather(scores, row_axes, axis=1, tiled=True, to="invarying")
    ids = lax.all_gather(ids, row_axes, axis=1, tiled=True, to="invarying")
    if gather_axes:  # keep the candidates of this device's own queries only
      own = q.shape[0] // _axes_size(mesh, gather_axes)
      start = lax.axis_index(gather_axes) * own
      scores = lax.dynamic_slice_in_dim(scores, start, own, axis=0)
      ids = lax.dynamic_slice_in_dim(ids, start, own, axis=0)
    scores, ids = _topk_padded(scores, ids, k)
    return jnp.where(jnp.isneginf(scores), -1, ids), scores

  qspec = P(batch_axes or None, None)
  out = P(batch_axes or None, None)
  if exclude_ids is None:
    fn = jax.shard_map(lambda q, x: body(q, x, None), mesh=mesh,
                       in_specs=(qspec, P(row_axes, None)), out_specs=(out, out))
    ids, scores = fn(queries, index.embeddings)
  else:
    fn = jax.shard_map(body, mesh=mesh, in_specs=(qspec, P(row_axes, None), qspec),
                       out_specs=(out, out))
    ids, scores = fn(queries, index.embeddings, exclude_ids)
  return SearchResult(ids, scores)
