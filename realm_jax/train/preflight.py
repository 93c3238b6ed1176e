"""What a training run checks before it spends any time (before the model is built, the corpus put on
the devices or the first index embedded), each failure one line naming the field and the value:

* starting weights: an experiment's `init="required:<what>"` must be given (`--init URI`), and a
  base-size model never starts from random weights by accident (`--set init=random` says so);
* the slice: a config that declares `target_slice` runs on exactly that many devices;
* memory: `train/memory.py`'s per-device estimate fits the device memory (the declared slice's
  HBM, or what the accelerator reports), with the headroom the shipped configs are sized to.
"""

from __future__ import annotations

from typing import Any, Callable

from realm_jax import slices
from realm_jax.errors import ConfigError
from realm_jax.train import memory
from realm_jax.train.config import REQUIRED

GIB = 1024 ** 3
HEADROOM = 0.9  # the estimate must stay under 90% of the device memory (XLA's own buffers, padding)
BASE_HIDDEN = 768  # BERT-base and larger: never trained from random weights by accident


def check_init(cfg: Any, fields: tuple[str, ...] = ("init", "init_retriever")) -> None:
  """Refuses `required:` weights that were not given, and a base-size model from random weights."""
  for field in fields:
    value = getattr(cfg, field, None)
    if isinstance(value, str) and value.startswith(REQUIRED):
      raise ConfigError(f"{field} is required: {value[len(REQUIRED):].strip()}; pass --set {field}=URI"
                        + (" (or --init URI)" if field == "init" else ""))
  if cfg.init is None and cfg.model.bert.hidden_size >= BASE_HIDDEN:
    raise ConfigError(f"init is not set: this {cfg.model.bert.num_layers}-layer, {cfg.model.bert.hidden_size}-wide "
                      "model would start from random weights; pass --init URI (e.g. BERT-base weights from "
                      "`realm-jax convert hf --kind bert`), or --set init=random to mean it")


def device_memory() -> int | None:
  """Bytes one local accelerator device can hold (its `bytes_limit`); None where JAX does not say (CPU)."""
  import jax

  stats = jax.local_devices()[0].memory_stats()
  limit = (stats or {}).get("bytes_limit")
  return int(limit) if limit else None


def describe(est: memory.MemoryEstimate) -> str:
  """`25.3 GiB (params 0.8, optimizer 2.4, ..., activations 15.5 for 2 examples)`."""
  parts = ", ".join(f"{name} {value / GIB:.1f}" for name, value in est.rows()[:-1] if value >= 0.05 * GIB)
  return f"{est.total / GIB:.1f} GiB per device ({parts}; {est.per_device_batch} example(s) per device)"


def check_fits(cfg: Any, num_devices: int, num_blocks: int, *, device_bytes: int | None = None,
               log: Callable[[str], None] = lambda message: None) -> memory.MemoryEstimate | None:
  """Checks `target_slice` against `num_devices` and the memory estimate against the device memory
  (the slice's HBM, else `device_bytes`, else what the device reports); returns the estimate, or
  None when there is nothing to compare it with (CPU) or `memory_check` is off."""
  where = f"{device_bytes / GIB:.1f} GiB per device" if device_bytes else None
  if cfg.target_slice is not None:
    s = slices.get_slice(cfg.target_slice)
    if num_devices != s.devices:
      raise ConfigError(f"target_slice={s.name} has {s.devices} devices but this run has {num_devices}: run it on a "
                        f"{s.name}, or set target_slice to the slice it runs on")
    device_bytes, where = s.hbm_bytes, f"{s.name}'s {s.hbm_bytes / GIB:.0f} GiB of HBM per device"
  if not cfg.memory_check:
    return None
  if device_bytes is None:
    device_bytes = device_memory()
    where = f"the {device_bytes / GIB:.1f} GiB this device reports" if device_bytes else None
  if device_bytes is None:
    return None
  est = memory.estimate(cfg, num_devices, num_blocks)
  if est.total > HEADROOM * device_bytes:
    raise ConfigError(
        f"the memory estimate does not fit: {describe(est)} > {HEADROOM:.0%} of {where} "
        f"(batch_size={cfg.batch_size}, grad_accum_steps={cfg.grad_accum_steps}, {num_devices} devices, "
        f"{num_blocks} blocks); raise grad_accum_steps, or --set memory_check=false to run anyway")
  log(f"memory estimate {describe(est)}: fits {where}")
  return est
