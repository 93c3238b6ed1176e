"""The retrieval corpus on the mesh: block tokens sharded by rows next to their embeddings.

The train step retrieves block ids on device, then needs those blocks' tokens to re-embed them
(`[CLS] title [SEP] body [SEP]`) and to build the encoder input (`[CLS] query [SEP] body [SEP]`).
One table holds each block's document-tower row as stored in the corpus (uint16 for BERT's
vocabulary), placed like the index (rows over all devices; each process reads only its devices'
rows from storage); the encoder's `body [SEP]` row is a slice of it, cut on device
(`body_from_doc`). `gather_rows` fetches rows by global id inside `jax.jit` with one `psum`, so
no host round trip sits inside the step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from realm_jax.data import features
from realm_jax.retrieval.mips import RowShardedEmbeddings, _axes_size, _batch_axes, place_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceCorpus:
  """The document-tower token row of every block, row-sharded on the mesh."""

  tokens: RowShardedEmbeddings  # uint16|int32 [N, block_len]: [CLS] title [SEP] body [SEP] pad...
  pad_id: int = dataclasses.field(metadata=dict(static=True))
  cls_id: int = dataclasses.field(metadata=dict(static=True))
  sep_id: int = dataclasses.field(metadata=dict(static=True))

  @property
  def num_blocks(self) -> int:
    return self.tokens.num_rows

  @property
  def block_len(self) -> int:
    return self.tokens.embeddings.shape[1]


def host_token_rows(blocks, block_len: int, specials) -> np.ndarray:
  """`[n, block_len]` int32 document-tower rows of Blocks held in memory (tests, tools)."""
  return features.blocks_doc_inputs(blocks, block_len, specials)["input_ids"].astype(np.int32)


def place_token_rows(num_rows: int, load_rows, mesh: Mesh, specials, block_len: int,
                     dtype=np.uint16) -> DeviceCorpus:
  """Places token rows on the mesh, rows over every axis (as the index embeddings): each process
  calls `load_rows(lo, hi)` for its own devices' rows only; rows shorter than `block_len` are padded."""
  pad = int(specials.pad_id)

  def rows(a: int, b: int) -> np.ndarray:
    r = np.asarray(load_rows(a, b))
    if r.shape[1] < block_len:
      r = np.pad(r, ((0, 0), (0, block_len - r.shape[1])), constant_values=pad)
    return r

  table = place_rows(num_rows, block_len, rows, mesh, dtype=dtype)
  return DeviceCorpus(table, pad, int(specials.cls_id), int(specials.sep_id))


def place_corpus(corpus, mesh: Mesh, specials, block_len: int) -> DeviceCorpus:
  """A `CorpusReader`'s token rows on the mesh, each process reading only its devices' rows."""
  return place_token_rows(corpus.num_blocks, corpus.token_rows, mesh, specials, block_len, corpus.token_dtype)


def place_host_rows(rows: np.ndarray, mesh: Mesh, specials) -> DeviceCorpus:
  """Token rows held in host memory (tests, benchmarks) on the mesh."""
  return place_token_rows(rows.shape[0], lambda a, b: rows[a:b], mesh, specials, rows.shape[1], rows.dtype)


def body_from_doc(doc: jax.Array, sep_id: int, pad_id: int) -> jax.Array:
  """`body [SEP] pad...` from `[CLS] title [SEP] body [SEP] pad...` rows: everything after the
  first [SEP], shifted to position 0 (the encoder's view of a block)."""
  length = doc.shape[-1]
  first_sep = jnp.argmax(doc == sep_id, axis=-1)[..., None]  # [..., 1]
  src = jnp.arange(length) + first_sep + 1
  body = jnp.take_along_axis(doc, jnp.clip(src, 0, length - 1), axis=-1)
  return jnp.where(src < length, body, jnp.asarray(pad_id, doc.dtype))


def gather_rows(table: RowShardedEmbeddings, ids: jax.Array) -> jax.Array:
  """Rows of a row-sharded table at global `ids` `[B, K]` (any id < 0 gives a row of zeros);
  integer tables come back as int32.

  Each device looks up the ids that fall in its own rows, the others contribute zeros, and a psum
  over the row axes assembles the result; the output is sharded like `ids` on the batch dim.
  """
  mesh, row_axes = table.mesh, table.row_axes
  rows_per_shard = table.embeddings.shape[0] // table.num_shards
  batch_axes = _batch_axes(ids, mesh)
  gather_axes = tuple(a for a in batch_axes if a in row_axes)

  def body(t: jax.Array, i: jax.Array) -> jax.Array:
    if gather_axes:
      i = lax.all_gather(i, gather_axes, axis=0, tiled=True, to="invarying")
    local = i - lax.axis_index(row_axes).astype(i.dtype) * rows_per_shard
    mine = (local >= 0) & (local < rows_per_shard) & (i >= 0)
    vals = jnp.take(t, jnp.clip(local, 0, rows_per_shard - 1), axis=0)
    if jnp.issubdtype(vals.dtype, jnp.integer):
      vals = vals.astype(jnp.int32)  # uint16 token rows: psum in int32 (every backend reduces it)
    vals = lax.psum(jnp.where(mine[..., None], vals, 0), row_axes)
    if gather_axes:
      own = vals.shape[0] // _axes_size(mesh, gather_axes)
      vals = lax.dynamic_slice_in_dim(vals, lax.axis_index(gather_axes) * own, own, axis=0)
    return vals

  spec = P(batch_axes or None, None)
  fn = jax.shard_map(body, mesh=mesh, in_specs=(P(row_axes, None), spec), out_specs=P(batch_axes or None, None, None))
  return fn(table.embeddings, ids.astype(jnp.int32))


def doc_inputs_from_tokens(tokens: jax.Array, pad_id: int, sep_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(ids, mask, segment ids) of `[CLS] title [SEP] body [SEP]` rows: segment 1 after the first [SEP]."""
  mask = (tokens != pad_id).astype(jnp.int32)
  is_sep = (tokens == sep_id).astype(jnp.int32)
  after_first_sep = (jnp.cumsum(is_sep, axis=-1) - is_sep) >= 1
  return tokens, mask, (after_first_sep & (mask > 0)).astype(jnp.int32)


def joint_inputs(query_ids: jax.Array, query_mask: jax.Array, body: jax.Array, pad_id: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`[CLS] query [SEP] body [SEP]` per candidate, packed without a gap.

  query `[B, Lq]` (with its own [CLS]/[SEP], padded), body `[B, C, Lb]` -> `[B, C, Lq + Lb]`;
  query tokens keep their positions, so MLM positions index the joint input unchanged.
  """
  b, c, lb = body.shape
  lq = query_ids.shape[-1]
  n_q = query_mask.sum(-1).astype(jnp.int32)  # [B]
  pos = jnp.arange(lq + lb, dtype=jnp.int32)[None, :]  # [1, L]
  in_query = pos < n_q[:, None]  # [B, L]
  q_part = jnp.take_along_axis(query_ids, jnp.clip(pos, 0, lq - 1).repeat(b, 0), axis=-1)  # [B, L]
  idx = pos - n_q[:, None]  # [B, L]
  body_part = jnp.take_along_axis(body, jnp.clip(idx, 0, lb - 1)[:, None, :].repeat(c, 1), axis=-1)  # [B, C, L]
  body_valid = (idx[:, None, :] >= 0) & (idx[:, None, :] < lb) & (body_part != pad_id) & ~in_query[:, None, :]
  ids = jnp.where(in_query[:, None, :], q_part[:, None, :], jnp.where(body_valid, body_part, pad_id))
  mask = (in_query[:, None, :] | body_valid).astype(jnp.int32)
  return ids.astype(jnp.int32), mask, body_valid.astype(jnp.int32)
