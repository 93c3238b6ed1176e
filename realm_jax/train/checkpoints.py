"""Trainer checkpoints: an orbax CheckpointManager on `<root>/checkpoints`, one item per part.

Items: the model parts (`retriever`, `encoder` — the same names as `realm_jax.weights`, so the
refresher restores `retriever` alone), `opt_state`, `rng` (dropout stream keys as raw key data, so
a resumed run draws the same dropout masks), `data` (the input iterator's JSON state) and `meta`
(step, config, index version). Saving is asynchronous; a step is visible to readers only once
orbax has finalised it, and every finalised step carries a checksum manifest (`sealing.py`) that
each restore verifies first: a damaged or deleted file stops the restore with one line naming it.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from realm_jax import weights
from realm_jax.storage import Storage
from realm_jax.train import sealing
from realm_jax.train.sealing import CheckpointError, CorruptCheckpoint

__all__ = ["CheckpointError", "Checkpoints", "CorruptCheckpoint", "rng_arrays", "set_rng_arrays"]


def _short(e: BaseException) -> str:
  """The first line of an exception from orbax / tensorstore (theirs can run to 150 lines)."""
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}"


_TS_PATH = re.compile(r'(?:Failed writing|Failed reading|local file): "([^"]+)"')
_TS_OS_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]")


def _os_reason(e: BaseException) -> tuple[str | None, str]:
  """(path, reason) of a failure: an OSError's file and strerror, or the file and OS error code
  that tensorstore puts inside its message ('Failed writing: "PATH": ... [os_error_code=27]');
  else (None, the first line)."""
  if isinstance(e, OSError) and e.strerror:
    return getattr(e, "filename", None), e.strerror
  text = str(e)
  code = _TS_OS_CODE.search(text)
  if code:
    paths = _TS_PATH.findall(text)
    return (paths[-1] if paths else None), os.strerror(int(code.group(1)))
  return None, _short(e)


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
  """Save / restore the full training state on any storage root (gs:// included), every step sealed
  with a checksum manifest before orbax commits it and verified before it is restored."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
    self.directory = directory.rstrip("/")
    self._pending: int | None = None  # the step of the last save, until it is known finished
    self.storage = Storage.open(self.directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=not read_only, read_only=read_only,
                                           temporary_path_class=sealing.sealing_path_class(self.directory))
    self.manager = self._listing(lambda: ocp.CheckpointManager(self.directory, options=options))

  def _listing(self, list_steps):
    """Runs `list_steps` (orbax listing the step directories), looking again when a step is
    removed (the trainer's max_to_keep) between orbax's listing and its reading of that step: the
    directory is there, so it is a race; a missing directory is the user's error."""
    for attempt in range(5):
      try:
        return list_steps()
      except (FileNotFoundError, NotADirectoryError) as e:  # orbax says either of a vanished step
        if attempt == 4 or not self._listable():
          raise CheckpointError(f"{self.directory}: cannot open the checkpoints directory "
                                f"({e.strerror or _short(e)})") from None
        time.sleep(0.2)
      except OSError as e:
        raise CheckpointError(f"{self.directory}: cannot open the checkpoints directory "
                              f"({e.strerror or _short(e)})") from None

  def _listable(self) -> bool:
    """True if the checkpoints directory exists and lists (with at least one entry)."""
    try:
      return bool(self.storage.listdir())
    except Exception:  # noqa: BLE001 - any failure to list means "not there"
      return False

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def leftovers(self) -> dict[str, int]:
    """Step directories orbax never committed (a save killed mid-way): name -> step."""
    finalized = {str(s) for s in self.all_steps()}
    return {n: s for n, s in sealing.step_entries(self.storage).items() if n not in finalized}

  def step_to_resume(self, resume: bool) -> int | None:
    """The newest finalized step to resume from (None: start fresh); refuses to start a new run
    over a root that already holds checkpoints (or unfinished ones) unless `resume`."""
    latest = self.latest_step()
    if not resume:
      if latest is not None:
        raise CheckpointError(f"{self.directory} already holds step {latest}: pass --resume to continue "
                              "that run, or use a fresh storage root")
      left = self.leftovers()
      if left:
        raise CheckpointError(f"{self.directory} holds an unfinished checkpoint write ({', '.join(sorted(left))}): "
                              "pass --resume to clean it up and continue that run, or use a fresh storage root")
    return latest

  def remove_leftovers(self, log) -> list[str]:
    """Deletes the step directories orbax never committed (writes killed mid-way): a resumed run
    writes those steps again, and orbax would otherwise skip or refuse them. Logs each one."""
    removed = []
    for name, step in sorted(self.leftovers().items(), key=lambda kv: kv[1]):
      log(f"{self.directory}/{name}: an unfinished write of checkpoint step {step} (never committed, "
          "e.g. a save killed mid-way); removing it")
      self.storage.delete(name)
      removed.append(name)
    if removed:
      self.manager.reload()
    return removed

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def reload(self) -> None:
    """Lists the steps again (another process's saves and deletions)."""
    self._listing(self.manager.reload)

  def verify(self, step: int, items: list[str] | None = None) -> None:
    """Checks step `step` (its `items` only, when given) against its manifest; CorruptCheckpoint
    names the first missing or damaged file."""
    sealing.verify(self.storage, step, items)

  def items(self, step: int) -> set[str]:
    """The items (`retriever`, `encoder`, `reader`, `meta`, ...) step `step`'s manifest lists."""
    return {rel.split("/", 1)[0] for rel in sealing.read_manifest(self.storage, step)["files"]}

  def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, data_state: dict,
           meta: dict, force: bool = False) -> bool:
    items = {p: ocp.args.StandardSave(weights.part_state(model, p)) for p in weights.parts_of(model)}
    items["opt_state"] = ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer)))
    items["rng"] = ocp.args.StandardSave(rng_arrays(model))
    items["data"] = ocp.args.JsonSave(data_state)
    items["meta"] = ocp.args.JsonSave({"step": step, **meta})
    self.wait()  # the previous (asynchronous) save's failure is reported as that step's
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # orbax/tensorstore failures (disk full, ...) as one line
      raise self._failed(f"saving checkpoint step {step}", e) from None
    if saved:
      self._pending = step
    return saved

  def _failed(self, what: str, e: BaseException) -> CheckpointError:
    if isinstance(e, CheckpointError):
      return e
    path, reason = _os_reason(e)
    latest = self._latest_quietly()
    newest = "no checkpoint is complete yet" if latest is None else f"the newest complete checkpoint is step {latest}"
    return CheckpointError(f"{path or self.directory}: {what} failed ({reason}); {newest}")

  def _latest_quietly(self) -> int | None:
    try:
      self.manager.reload()
      return self.manager.latest_step()
    except Exception:  # only for a message
      return None

  def read_meta(self, step: int) -> dict:
    """The `meta` item of step `step` (verified first)."""
    self.verify(step, ["meta"])
    return self._restore(step, {"meta": ocp.args.JsonRestore()})["meta"]

  def _restore(self, step: int, items: dict) -> dict:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError) as e:
      raise CheckpointError(f"{self.directory}/{step}: does not fit this model/optimizer ({_short(e)})") from None
    except Exception as e:  # a verified step that still fails: one line, not a tensorstore dump
      raise CheckpointError(f"{self.directory}/{step}: cannot be restored ({_short(e)})") from None

  def restore(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer) -> tuple[dict, dict]:
    """Restores everything in place onto the current shardings (after verifying every file);
    returns (data state, meta)."""
    self.verify(step)
    parts = weights.parts_of(model)
    opt_pure = nnx.to_pure_dict(nnx.state(optimizer))
    items = {p: ocp.args.StandardRestore(_abstract(weights.part_state(model, p))) for p in parts}
    items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_pure))
    items["rng"] = ocp.args.StandardRestore(_abstract(rng_arrays(model)))
    items["data"] = ocp.args.JsonRestore()
    items["meta"] = ocp.args.JsonRestore()
    out = self._restore(step, items)
    for p in parts:
      weights.set_part(model, p, out[p])
    opt_state = nnx.state(optimizer)
    nnx.replace_by_pure_dict(opt_state, out["opt_state"])
    nnx.update(optimizer, opt_state)
    set_rng_arrays(model, out["rng"])
    return out["data"], out["meta"]

  def restore_part(self, step: int, model: nnx.Module, part: str,
                   sharding: jax.sharding.Sharding | None = None) -> dict:
    """Restores one model part (e.g. the refresher's `retriever`), verified first; returns the
    step's meta."""
    self.verify(step, [part, "meta"])
    target = weights.abstract_part(model, part, sharding)
    out = self._restore(step, {part: ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()})
    weights.set_part(model, part, out[part])
    return out["meta"]

  def wait(self) -> None:
    pending, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # an async save that failed in the background
      what = "writing a checkpoint" if pending is None else f"writing checkpoint step {pending}"
      raise self._failed(what, e) from None

  def close(self) -> None:
    self.wait()
    self.manager.close()
