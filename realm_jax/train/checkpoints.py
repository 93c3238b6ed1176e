"""Trainer checkpoints: an orbax CheckpointManager on `<root>/checkpoints`, one item per part.

Items: the model parts (`retriever`, `encoder` — the same names as `realm_jax.weights`, so the
refresher restores `retriever` alone), `opt_state`, `rng` (dropout stream keys as raw key data, so
a resumed run draws the same dropout masks), `data` (the input iterator's JSON state) and `meta`
(step, config, index version). Saving is asynchronous; a step is visible to readers only once
orbax has finalised it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from realm_jax import weights
from realm_jax.errors import RealmError


class CheckpointError(RealmError):
  """Checkpoints are missing, or do not fit the run being resumed."""


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def rng_arrays(model: nnx.Module) -> dict[str, jax.Array]:
  """Dropout RNG state as plain arrays (typed keys -> key data), keyed by path."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.RngState)):
    value = var.get_value()
    if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
      value = jax.random.key_data(value)
    out["/".join(map(str, path))] = value
  return out


def set_rng_arrays(model: nnx.Module, arrays: dict[str, Any]) -> None:
  state = nnx.state(model, nnx.RngState)
  flat = nnx.to_flat_state(state)
  leaves = []
  for path, var in flat:
    value = jnp.asarray(arrays["/".join(map(str, path))])
    if jnp.issubdtype(var.get_value().dtype, jax.dtypes.prng_key):
      value = jax.random.wrap_key_data(value)
    leaves.append(var.replace(value))
  nnx.update(model, nnx.from_flat_state([(p, v) for (p, _), v in zip(flat, leaves)]))


class Checkpoints:
  """Save / restore the full training state on any storage root (gs:// included)."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=not read_only, read_only=read_only)
    self.directory = directory
    self.manager = ocp.CheckpointManager(directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_to_resume(self, resume: bool) -> int | None:
    """The newest finalized step to resume from (None: start fresh); refuses to start a new run
    over a root that already holds checkpoints unless `resume`."""
    latest = self.latest_step()
    if latest is not None and not resume:
      raise CheckpointError(f"{self.directory} already holds step {latest}: pass --resume to continue "
                            "that run, or use a fresh storage root")
    return latest

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def reload(self) -> None:
    self.manager.reload()

  def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, data_state: dict,
           meta: dict, force: bool = False) -> bool:
    items = {p: ocp.args.StandardSave(weights.part_state(model, p)) for p in weights.parts_of(model)}
    items["opt_state"] = ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer)))
    items["rng"] = ocp.args.StandardSave(rng_arrays(model))
    items["data"] = ocp.args.JsonSave(data_state)
    items["meta"] = ocp.args.JsonSave({"step": step, **meta})
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer) -> tuple[dict, dict]:
    """Restores everything in place onto the current shardings; returns (data state, meta)."""
    parts = weights.parts_of(model)
    opt_pure = nnx.to_pure_dict(nnx.state(optimizer))
    items = {p: ocp.args.StandardRestore(_abstract(weights.part_state(model, p))) for p in parts}
    items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_pure))
    items["rng"] = ocp.args.StandardRestore(_abstract(rng_arrays(model)))
    items["data"] = ocp.args.JsonRestore()
    items["meta"] = ocp.args.JsonRestore()
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError) as e:
      raise CheckpointError(f"{self.directory}/{step}: does not fit this model/optimizer ({e})") from e
    for p in parts:
      weights.set_part(model, p, out[p])
    opt_state = nnx.state(optimizer)
    nnx.replace_by_pure_dict(opt_state, out["opt_state"])
    nnx.update(optimizer, opt_state)
    set_rng_arrays(model, out["rng"])
    return out["data"], out["meta"]

  def restore_part(self, step: int, model: nnx.Module, part: str,
                   sharding: jax.sharding.Sharding | None = None) -> dict:
    """Restores one model part (e.g. the refresher's `retriever`); returns the step's meta."""
    target = weights.abstract_part(model, part, sharding)
    out = self.manager.restore(step, args=ocp.args.Composite(
        **{part: ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}))
    weights.set_part(model, part, out[part])
    return out["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


