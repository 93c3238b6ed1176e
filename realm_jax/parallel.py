"""Distributed setup, the mesh, parameter sharding, and the few multi-host collectives of the roles.

The trainer and the fine-tuner are one `jax.jit` program over a `jax.make_mesh` mesh with
`NamedSharding`s (no `pmap`): every process runs the same step on its own devices and XLA inserts
the collectives. The mesh has two axes:
  data   the batch is split over it; each device along it computes its own examples, and XLA
         averages the gradients over it (data parallelism);
  model  devices along it see the same examples. It splits the rows of the index embeddings and
         of the block-token tables (`retrieval/mips.py`, `train/device_corpus.py`), and the
         parameters an `fsdp(axis=model)` rule names: it saves memory, not compute. No layer is
         split over it (there is no tensor parallelism).
Parameters follow the config's `param_sharding` rules (`rules.py`): replicated, or FSDP.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from realm_jax import rules as rules_lib
from realm_jax.errors import ConfigError

# ------------------------------------------------------------------------------------------------
# Processes and meshes
# ------------------------------------------------------------------------------------------------


def initialize_distributed() -> None:
  """Joins a multi-process JAX job when the environment describes one (TPU pod or explicit)."""
  if jax.distributed.is_initialized():
    return
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
    jax.distributed.initialize()


def is_chief() -> bool:
  """True on process 0, the one that writes metrics, markers and bootstrap indices."""
  return jax.process_index() == 0


def make_mesh(mesh_model: int = 1) -> Mesh:
  """Axes (`data`, `model`) over every device of every process; `model` has `mesh_model` devices.

  Axis types are `Auto`: the models are written for sharding by propagation (an `Explicit` mesh,
  jax.make_mesh's default, rejects their embedding gathers)."""
  n = jax.device_count()
  if mesh_model < 1 or n % mesh_model:
    raise ConfigError(f"mesh_model={mesh_model} does not divide the {n} devices")
  return jax.make_mesh((n // mesh_model, mesh_model), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def local_mesh() -> Mesh:
  """A 1-D `data` mesh over this process's devices only (work one process does alone)."""
  return jax.make_mesh((jax.local_device_count(),), ("data",), devices=jax.local_devices(),
                       axis_types=(AxisType.Auto,))


# ------------------------------------------------------------------------------------------------
# Parameter sharding
# ------------------------------------------------------------------------------------------------


def leaf_sharding(mesh: Mesh, shape: tuple[int, ...], itemsize: int, rule: rules_lib.Sharding) -> NamedSharding:
  """Where one array of `shape` lives under `rule`: replicated, or its largest dimension that the
  axis divides split over the axis (replicated when none does, or below `min_size_mb`)."""
  size_mb = math.prod(shape) * itemsize / 2**20
  if rule.fsdp and shape and size_mb >= rule.min_size_mb:
    n = mesh.shape[rule.axis]
    for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[d] % n == 0:
        parts = [None] * len(shape)
        parts[d] = rule.axis
        return NamedSharding(mesh, P(*parts))
  return NamedSharding(mesh, P())


def param_sharding(mesh: Mesh, rules: tuple[tuple[str, str], ...], state: Any) -> Any:
  """NamedShardings for a state pytree from `(regex, value)` rules (first match; see rules.py)."""
  parsed = [(regex, rules_lib.parse_sharding(value)) for regex, value in rules]

  def spec(path, leaf):
    rule = rules_lib.first_match(parsed, rules_lib.param_path(path), rules_lib.Sharding())
    dtype = getattr(leaf, "dtype", np.float32)
    itemsize = 4 if jnp.issubdtype(dtype, jax.dtypes.prng_key) else np.dtype(dtype).itemsize
    return leaf_sharding(mesh, tuple(getattr(leaf, "shape", ())), itemsize, rule)

  return jax.tree_util.tree_map_with_path(spec, state)


def place_state(state: Any, shardings: Any) -> Any:
  """Puts host-identical values onto (possibly multi-process) shardings; typed PRNG keys too."""
  if jax.process_count() == 1:
    return jax.device_put(state, shardings)

  def put(x, sharding):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = np.asarray(jax.random.key_data(x))
      arr = jax.make_array_from_callback(data.shape, NamedSharding(sharding.mesh, P()), lambda i: data[i])
      return jax.random.wrap_key_data(arr, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

  return jax.tree.map(put, state, shardings)


def process_local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in global order (replicas counted once):
  the inverse of `jax.make_array_from_process_local_data` for host-side work on the local batch."""
  if x.is_fully_addressable:
    return np.asarray(x)
  rows: dict[int, np.ndarray] = {}
  for shard in x.addressable_shards:
    rows.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
  return np.concatenate([rows[k] for k in sorted(rows)])


def local_copy(module: nnx.Module) -> nnx.Module:
  """A copy of `module` whose arrays live on this process only (replicated arrays: the local
  replica; sharded ones: all-gathered, which every process must call together)."""
  graphdef, state = nnx.split(module)
  if jax.process_count() == 1:
    return nnx.merge(graphdef, state)
  from jax.experimental import multihost_utils

  def local(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return x
    if x.is_fully_replicated:
      return x.addressable_data(0)
    return multihost_utils.process_allgather(x, tiled=True)

  return nnx.merge(graphdef, jax.tree.map(local, state))


# ------------------------------------------------------------------------------------------------
# Collectives between processes (each a no-op with one process)
# ------------------------------------------------------------------------------------------------


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Waits until every process arrives, through the coordination service (no device collective:
  gloo's 30 s context deadline is too short for a process that is still compiling or embedding)."""
  if jax.process_count() == 1:
    return
  # jax 0.10 has no public accessor for the coordination client (multihost_utils.sync_global_devices
  # is a device collective); this is the one place that reaches into jax._src.
  from jax._src import distributed
  distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


def agree(value: str | None) -> str | None:
  """Every process adopts process 0's `value` (a short string, at most 128 bytes, or None)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  buf = np.zeros(128, np.uint8)
  raw = (value or "").encode()[:128]
  buf[:len(raw)] = np.frombuffer(raw, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return bytes(out).rstrip(b"\0").decode() or None


def gather_json(value: Any) -> list[Any]:
  """Every process's JSON-serialisable `value`, in process order."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
  longest = int(np.max(multihost_utils.process_allgather(np.array([raw.size], np.int32))))
  buf = np.zeros(longest, np.uint8)
  buf[:raw.size] = raw
  rows = np.asarray(multihost_utils.process_allgather(buf))
  return [json.loads(bytes(r).rstrip(b"\0").decode()) for r in rows]
