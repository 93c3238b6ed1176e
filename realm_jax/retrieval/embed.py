"""Embed every corpus block with the document tower: jit-compiled, batched, sharded over a mesh.

`make_embed_fn` turns an embedder (any NNX module called as `m(input_ids, attention_mask,
token_type_ids) -> [..., D]`) into a host function over numpy batches; `embed_corpus` streams
the corpus shard by shard through it and writes one embedding shard per corpus shard,
create-only, so a rerun after a crash skips the shards already written and only embeds the rest.

Layout under `<prefix>/` of a storage root:
  embed.json          what is being embedded (identity, corpus, dim, dtype); written first, and a
                      rerun with a different identity is refused rather than mixing embeddings.
  emb-00000.npy ...   `[rows, D]` float32 or bfloat16 (`.npy` stores bfloat16 as raw `|V2`),
                      row i of shard s is block `first_block(s) + i`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import math
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from realm_jax.data.features import SpecialIds, blocks_doc_inputs
from realm_jax.errors import RealmError
from realm_jax.models.microbatch import map_rows, rows_per_step, step_tokens_for
from realm_jax.storage import ObjectExists

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
INFO_FILE = "embed.json"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _hidden_size(embedder: nnx.Module) -> int:
  """The width of the embedder's token embeddings (its first `nnx.Embed`); MiniLM's 384 if none."""
  for _, node in nnx.iter_graph(embedder):
    if isinstance(node, nnx.Embed):
      return int(node.features)
  return 384


class EmbedError(RealmError):
  """Embedding inputs, or embeddings already on storage, are not what was asked for."""


def shard_name(i: int) -> str:
  """File name of embedding shard `i` (one per corpus shard)."""
  return f"emb-{i:05d}.npy"


def default_mesh() -> Mesh:
  """A 1-D mesh `('data',)` over every device (of every process)."""
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def auto_mesh(mesh: Mesh) -> Mesh:
  """The same devices and axes with `Auto` axis types: the models are written for sharding by
  propagation, and an `Explicit` mesh (jax.make_mesh's default) rejects their gathers."""
  if all(t == AxisType.Auto for t in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def bucket_lengths(max_len: int) -> tuple[int, ...]:
  """The padded lengths rows are cut to: 16, 32, 64, 128, then steps of 64, and `max_len`."""
  ladder = [16, 32, 64, *range(128, max_len, 64)]
  return tuple(b for b in ladder if b < max_len) + (max_len,)


def used_lengths(attention_mask: np.ndarray) -> np.ndarray:
  """Per row, one past the last position the attention mask keeps. An all-padding row attends to
  every position alike, so it keeps its full length."""
  mask = np.asarray(attention_mask) != 0
  return np.where(mask.any(1), mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), mask.shape[1])


def length_batches(lengths: np.ndarray, batch_size: int, buckets: tuple[int, ...]
                   ) -> list[tuple[np.ndarray, int]]:
  """Rows sorted by length, cut into batches of `batch_size` rows; each batch with the smallest
  bucket length that holds its longest row. Returns (row indices, padded length) per batch."""
  order = np.argsort(lengths, kind="stable")
  out = []
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    longest = int(lengths[rows].max())
    out.append((rows, next(b for b in buckets if b >= longest)))
  return out


class EmbedFn:
  """Host callable: dict of int32 `[n, L]` numpy arrays -> float32 `[n, D]` numpy embeddings.

  Length bucketing: rows are sorted by how many positions their attention mask uses, cut into
  batches, and each batch is cut to the smallest of a few padded lengths (`bucket_lengths`) that
  holds its longest row; outputs come back in the input order. The positions cut off are padding
  that the attention mask hides from every kept position, so the embeddings equal those of the
  fully padded rows up to float32 rounding. `bucketing=False` keeps every row at `L`.
  Batches of a fixed number of rows (the last one padded by repeating its final row) go through one
  jit compilation per padded length, sharded over every mesh axis, with the parameters replicated.
  The embedder's current parameters are read at each call, so a trainer can keep one EmbedFn
  while its weights change; dropout is off (an eval-mode view; the module itself is untouched).
  Inside a batch the tower runs over micro-batches of at most `step_tokens` tokens a device
  (`models/microbatch.py`; "auto": 512 on CPU, the whole batch on accelerators).
  Each device's rows stay on it and the host reads them (no collective in the program: with
  replicated outputs, XLA:CPU's in-process all-gather of 4 CPU devices deadlocked in one process
  embedding 1M blocks, dispatch running ahead of a 2-core thread pool).
  """

  def __init__(self, embedder: nnx.Module, mesh: Mesh | None = None, batch_size: int = 256,
               bucketing: bool = True, step_tokens: int | None | str = "auto"):
    self.embedder = embedder
    self.mesh = auto_mesh(mesh) if mesh is not None else default_mesh()
    self.num_devices = math.prod(self.mesh.shape.values())
    if batch_size < 1:
      raise EmbedError(f"batch_size must be >= 1, got {batch_size}")
    # Every device gets the same number of rows.
    self.batch_size = -(-batch_size // self.num_devices) * self.num_devices
    self.batch_sharding = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
    self.replicated = NamedSharding(self.mesh, P())
    self.bucketing = bucketing
    self.step_tokens = step_tokens_for(self.mesh, _hidden_size(embedder)) if step_tokens == "auto" else step_tokens
    self.compilations = 0
    self.dim: int | None = None

    def forward(graphdef, state, input_ids, attention_mask, token_type_ids):
      self.compilations += 1  # runs once per trace, i.e. per compilation
      model = nnx.merge(graphdef, state)
      rows = rows_per_step(input_ids.shape[0], input_ids.shape[1], self.num_devices, self.step_tokens)
      out = map_rows(model, (input_ids, attention_mask, token_type_ids), rows)
      return out.astype(jnp.float32)

    self._forward = jax.jit(forward, static_argnums=0,
                            in_shardings=(self.replicated,) + (self.batch_sharding,) * 3,
                            out_shardings=self.batch_sharding)  # no all-gather: see below

  def _split(self):
    graphdef, state = nnx.split(nnx.view(self.embedder, deterministic=True, raise_if_not_found=False))
    return graphdef, jax.device_put(state, self.replicated)

  def _check(self, inputs: Mapping[str, np.ndarray]) -> tuple[int, int]:
    missing = [k for k in INPUT_KEYS if k not in inputs]
    if missing:
      raise EmbedError(f"embedding inputs lack {missing} (have {sorted(inputs)})")
    shapes = {k: np.shape(inputs[k]) for k in INPUT_KEYS}
    if len(set(shapes.values())) != 1 or len(shapes["input_ids"]) != 2:
      raise EmbedError(f"embedding inputs must all be [n, L], got shapes {shapes}")
    return shapes["input_ids"]

  def __call__(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    n, length = self._check(inputs)
    graphdef, state = self._split()
    arrays = [np.asarray(inputs[k], np.int32) for k in INPUT_KEYS]
    if self.bucketing:
      batches = length_batches(used_lengths(arrays[1]), self.batch_size, bucket_lengths(length))
    else:
      batches = [(np.arange(s, min(s + self.batch_size, n)), length) for s in range(0, n, self.batch_size)]
    outputs = []
    for rows, padded in batches:  # dispatch is async: the host runs ahead
      batch = [a[rows, :padded] for a in arrays]
      if len(rows) < self.batch_size:
        pad = ((0, self.batch_size - len(rows)), (0, 0))
        batch = [np.pad(b, pad, mode="edge") for b in batch]
      batch = [jax.make_array_from_callback(b.shape, self.batch_sharding, lambda idx, b=b: b[idx])
               for b in batch]
      outputs.append(self._forward(graphdef, state, *batch))
    if not outputs:
      if self.dim is None:
        spec = jax.ShapeDtypeStruct((self.batch_size, length), jnp.int32)
        self.dim = int(jax.eval_shape(lambda s, a, b, c: nnx.merge(graphdef, s)(a, b, c),
                                      state, spec, spec, spec).shape[-1])
      return np.zeros((0, self.dim), np.float32)
    out = np.empty((n, outputs[0].shape[-1]), np.float32)
    for (rows, _), o in zip(batches, outputs):  # back in the input order
      out[rows] = np.asarray(o)[:len(rows)]
    self.dim = int(out.shape[-1])
    return out


def make_embed_fn(embedder: nnx.Module, mesh: Mesh | None = None, batch_size: int = 256,
                  bucketing: bool = True, step_tokens: int | None | str = "auto") -> EmbedFn:
  """A jit-compiled, mesh-sharded host function embedding `[n, L]` token inputs (see EmbedFn)."""
  return EmbedFn(embedder, mesh, batch_size, bucketing, step_tokens)


@dataclasses.dataclass(frozen=True)
class EmbeddingSet:
  """What `embed_corpus` left on storage: one shard per corpus shard, rows in block-id order."""

  prefix: str
  paths: list[str]  # relative to the storage root
  rows: list[int]  # rows per shard
  num_blocks: int
  dim: int
  dtype: str  # "float32" | "bfloat16"
  seconds: float  # wall time of this call
  embedded_shards: int  # shards embedded by this call (the others were already complete)
  embedded_blocks: int

  def load(self, storage) -> np.ndarray:
    """All shards concatenated as float32 `[num_blocks, dim]` (host memory)."""
    out = np.empty((self.num_blocks, self.dim), np.float32)
    row = 0
    for path, rows in zip(self.paths, self.rows):
      out[row:row + rows] = read_embedding_shard(storage, path, rows, self.dim, self.dtype)
      row += rows
    return out


def npy_bytes(array: np.ndarray) -> bytes:
  """`.npy` serialisation (no pickle) of an embedding shard."""
  buf = io.BytesIO()
  np.save(buf, array, allow_pickle=False)
  return buf.getvalue()


def parse_embedding_shard(data: bytes, where: str, rows: int, dim: int, dtype: str) -> np.ndarray:
  """Parses `.npy` bytes of a shard and checks shape and dtype; returns it as float32."""
  try:
    array = np.load(io.BytesIO(data), allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise EmbedError(f"{where}: not a valid .npy embedding shard: {e}") from None
  want = DTYPES[dtype]
  if array.dtype != want:
    if array.dtype.kind == "V" and array.dtype.itemsize == want.itemsize:
      array = array.view(want)
    else:
      raise EmbedError(f"{where}: dtype {array.dtype}, expected {dtype}")
  if array.shape != (rows, dim):
    raise EmbedError(f"{where}: shape {array.shape}, expected ({rows}, {dim})")
  return array.astype(np.float32)


def read_embedding_shard(storage, path: str, rows: int, dim: int, dtype: str) -> np.ndarray:
  """One shard from storage, checked, as float32 `[rows, dim]`."""
  return parse_embedding_shard(storage.read_bytes(path), storage.uri(path), rows, dim, dtype)


def _check_info(storage, prefix: str, info: dict[str, Any]) -> None:
  """Writes `embed.json` (create-only) or checks that the one there describes the same job."""
  path = f"{prefix}/{INFO_FILE}"
  try:
    storage.write_json(path, info, exclusive=True)
    return
  except ObjectExists:
    pass
  found = storage.read_json(path)
  if found != info:
    diff = sorted(k for k in set(found) | set(info) if found.get(k) != info.get(k))
    raise EmbedError(f"{storage.uri(path)}: this prefix holds embeddings of another job "
                     f"(differs in {diff}); use a fresh prefix or delete it")


def _finished_shard_dim(storage, path: str, rows: int, dtype: str) -> int | None:
  """Width of the complete shard at `path`, or None if absent. Writes are atomic, so a present
  file is whole; it is still parsed and its rows and dtype checked, never trusted blindly."""
  if storage.stat(path) is None:
    return None
  data = storage.read_bytes(path)
  try:
    array = np.load(io.BytesIO(data), allow_pickle=False, mmap_mode=None)
  except (ValueError, OSError, EOFError) as e:
    raise EmbedError(f"{storage.uri(path)}: not a valid .npy embedding shard: {e}") from None
  if array.ndim != 2 or array.shape[0] != rows or array.dtype.itemsize != DTYPES[dtype].itemsize:
    raise EmbedError(f"{storage.uri(path)}: shape {array.shape} {array.dtype}, expected "
                     f"[{rows}, dim] {dtype}; delete it to re-embed")
  parse_embedding_shard(data, storage.uri(path), rows, array.shape[1], dtype)
  return int(array.shape[1])


def embed_corpus(corpus, embed_fn: Callable[[Mapping[str, np.ndarray]], np.ndarray], storage,
                 prefix: str, *, block_len: int | None = None,
                 tokenizer_specials: SpecialIds | None = None, dtype: str = "float32",
                 identity: Mapping[str, Any] | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 shards: Sequence[int] | None = None) -> EmbeddingSet:
  """Embeds every block of `corpus` (a CorpusReader), or of its `shards` only (one process's share
  in a multi-process refresh), into `<prefix>/emb-NNNNN.npy`, resumably.

  One corpus shard is in memory at a time (the next one is read and featurised in a background
  thread while the current one is embedded, the previous one written). Shards already complete
  under `prefix` are skipped, so a rerun after a crash embeds only what is missing. `identity`
  (e.g. checkpoint step, model fingerprint) is recorded in `embed.json`; a rerun with another
  identity is refused. `block_len` and `tokenizer_specials` default to the corpus's own.
  `progress(blocks_done, num_blocks)` is called after each shard.
  """
  if dtype not in DTYPES:
    raise EmbedError(f"embedding dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  t0 = time.perf_counter()
  prefix = prefix.strip("/")
  block_len = block_len or corpus.block_len
  specials = tokenizer_specials if tokenizer_specials is not None else corpus.tokenizer()
  rows = [int(s["num_blocks"]) for s in corpus.shards]
  paths = [f"{prefix}/{shard_name(i)}" for i in range(len(rows))]
  _check_info(storage, prefix, {"format": "realm-jax-embeddings", "num_blocks": corpus.num_blocks,
                                "shards": rows, "block_len": block_len, "dtype": dtype,
                                "identity": dict(identity or {})})
  wanted = range(len(rows)) if shards is None else list(shards)
  dims = {i: d for i in wanted if (d := _finished_shard_dim(storage, paths[i], rows[i], dtype)) is not None}
  if len(set(dims.values())) > 1:
    raise EmbedError(f"{storage.uri(prefix)}: finished shards disagree on the width: {dims}")
  dim = next(iter(dims.values()), None)
  todo = [i for i in wanted if i not in dims]

  def features(i: int) -> dict[str, np.ndarray]:
    return blocks_doc_inputs(corpus.read_shard(i, text=False), block_len, specials)  # tokens + spans only

  def write(i: int, emb: np.ndarray) -> None:
    try:
      storage.write_bytes(paths[i], npy_bytes(emb.astype(DTYPES[dtype])), exclusive=True)
    except ObjectExists:  # a concurrent run of the same job got there first: keep it if sound
      _finished_shard_dim(storage, paths[i], rows[i], dtype)

  done, total = sum(rows[i] for i in dims), sum(rows[i] for i in wanted)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    writes: list[concurrent.futures.Future] = []
    upcoming = pool.submit(features, todo[0]) if todo else None
    for k, i in enumerate(todo):
      feats = upcoming.result()
      upcoming = pool.submit(features, todo[k + 1]) if k + 1 < len(todo) else None
      emb = np.asarray(embed_fn(feats), np.float32)
      dim = dim if dim is not None else (emb.shape[-1] if emb.ndim == 2 else -1)
      if emb.shape != (rows[i], dim) or not np.isfinite(emb).all():
        raise EmbedError(f"embedding corpus shard {i} gave shape {emb.shape}, expected "
                         f"({rows[i]}, {dim}) of finite values")
      for w in [w for w in writes if w.done()]:
        w.result()  # surface a failed write now, not at the end
        writes.remove(w)
      writes.append(pool.submit(write, i, emb))
      done += rows[i]
      if progress:
        progress(done, total)
    for w in writes:
      w.result()
  return EmbeddingSet(prefix, paths, rows, corpus.num_blocks, int(dim or 0), dtype,
                      time.perf_counter() - t0, len(todo), sum(rows[i] for i in todo))
