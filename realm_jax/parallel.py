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

import dataclasses
import json
import logging
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


@dataclasses.dataclass(frozen=True)
class Environment:
  """The multi-process job this process belongs to, as JAX's cluster detection sees it."""

  name: str  # "explicit" (JAX_COORDINATOR_ADDRESS) or JAX's cluster name: gcetpu, gketpu, slurm, ...
  processes: int | None  # None: JAX fills it in (explicit address without JAX_NUM_PROCESSES)


_ONE_PROCESS = {"refresh": "the refresher", "evaluate": "evaluation", "ask": "answering", "demo": "the demo"}
_CLUSTER_NAMES = {"gcetpu": "Cloud TPU VM metadata", "gketpu": "GKE TPU (TPU_WORKER_HOSTNAMES)",
                  "slurm": "SLURM", "ompi": "Open MPI", "K8sCluster": "Kubernetes"}


def distributed_environment() -> Environment | None:
  """The multi-process job described by this process's environment, or None on a plain single host.

  `JAX_COORDINATOR_ADDRESS` (with `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`) names one explicitly;
  otherwise JAX's own cluster detection decides (the order `jax.distributed.initialize()` tries:
  Open MPI, SLURM, GKE TPU, Cloud TPU VM metadata, Kubernetes; docs/DESIGN.md §7). A detected
  cluster of one process (a single-host TPU VM, a one-task SLURM job) is a single host."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    count = os.environ.get("JAX_NUM_PROCESSES")
    return Environment("explicit", int(count) if count else None)
  # jax 0.10 exposes no public "which cluster am I in"; these are the classes initialize() uses.
  from jax._src import clusters
  for env in clusters.ClusterEnv._cluster_types:
    if env.opt_in_only_method or not env.is_env_present():
      continue
    processes = env.get_process_count()
    return Environment(getattr(env, "name", "") or env.__name__, processes) if processes > 1 else None
  return None


def describe(env: Environment) -> str:
  """`a 4-process job (Cloud TPU VM metadata)`: for log lines and errors."""
  size = f"{env.processes}-process" if env.processes else "multi-process"
  how = _CLUSTER_NAMES.get(env.name, "JAX_COORDINATOR_ADDRESS" if env.name == "explicit" else env.name)
  return f"a {size} job ({how})"


def initialize_distributed(role: str = "train", multi_process: bool = True) -> Environment | None:
  """Joins the multi-process JAX job this process belongs to, once, before JAX touches a device.

  Every role calls it first. On a Cloud TPU pod slice, GKE, SLURM or an explicit
  `JAX_COORDINATOR_ADDRESS` it calls `jax.distributed.initialize()` (orbax's async checkpointer
  and our barriers need its client); on a plain single host it does nothing. A role that runs as
  one process (`multi_process=False`: the refresher, evaluation) refuses a multi-process job."""
  env = distributed_environment()
  if env is None or jax.distributed.is_initialized():
    return env
  if not multi_process:
    raise ConfigError(f"{_ONE_PROCESS.get(role, role)} runs as one process, but this machine is one of "
                      f"{describe(env)}: run it on a single-host VM or slice (e.g. v4-8, v5litepod-8)")
  if env.name == "explicit":
    missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not os.environ.get(v)]
    args = {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"],
            "num_processes": None if missing else int(os.environ["JAX_NUM_PROCESSES"]),
            "process_id": None if missing else int(os.environ["JAX_PROCESS_ID"])}
  else:
    missing, args = [], {}  # JAX's detection fills in everything, as for a bare initialize()
  try:
    jax.distributed.initialize(**args)
  except (ValueError, RuntimeError) as e:
    hint = f" (set {' and '.join(missing)} next to JAX_COORDINATOR_ADDRESS)" if missing else ""
    raise ConfigError(f"joining {describe(env)} failed{hint}: {str(e).splitlines()[0] if str(e) else e!r}") from e
  logging.getLogger("realm_jax.parallel").info(
      "joined %s as process %d of %d (%d local devices)", describe(env), jax.process_index(), jax.process_count(),
      jax.local_device_count())
  return env


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
