"""Model weights on a storage root: one Orbax item per top-level sub-module, plus the config.

A weights directory (written by `realm-jax convert`, read by `--init`) and every trainer
checkpoint use the same item names (`retriever`, `encoder`, `reader`), so any role can restore
just the parts it needs: the refresher restores only `retriever`, fine-tuning takes `retriever`
from a pre-training checkpoint and leaves the reader fresh.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from realm_jax.config import RealmConfig
from realm_jax.errors import RealmError

CONFIG_FILE = "realm_config.json"


class WeightsError(RealmError):
  """Weights are missing, incomplete or do not fit the model."""


def parts_of(model: nnx.Module) -> list[str]:
  """Top-level sub-modules holding parameters (e.g. ['encoder', 'retriever'])."""
  return sorted(nnx.to_pure_dict(nnx.state(model, nnx.Param)).keys())


def part_state(model: nnx.Module, part: str) -> dict[str, Any]:
  """The pure-dict parameters of one sub-module."""
  return nnx.to_pure_dict(nnx.state(getattr(model, part), nnx.Param))


def abstract_part(model: nnx.Module, part: str, sharding: jax.sharding.Sharding | None = None) -> dict[str, Any]:
  """ShapeDtypeStructs for one part (restore target); `sharding` places every leaf."""
  def spec(x):
    where = sharding if sharding is not None else getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where)
  return jax.tree.map(spec, part_state(model, part))


def set_part(model: nnx.Module, part: str, values: dict[str, Any]) -> None:
  """Writes a restored pure dict into `model.<part>` in place."""
  module = getattr(model, part)
  state = nnx.state(module, nnx.Param)
  try:
    nnx.replace_by_pure_dict(state, values)
  except (KeyError, ValueError) as e:
    raise WeightsError(f"weights for `{part}` do not fit the model: {e}") from e
  nnx.update(module, state)


def save_weights(uri: str, model: nnx.Module, config: RealmConfig, parts: Iterable[str] | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
  """Writes `parts` (default all) of `model` and its config under `uri` (any orbax path, gs:// too)."""
  parts = list(parts or parts_of(model))
  path = epath.Path(uri)
  if (path / CONFIG_FILE).exists():
    raise WeightsError(f"{uri}: weights already exist there; choose a new directory")
  items = {p: ocp.args.StandardSave(part_state(model, p)) for p in parts}
  items["meta"] = ocp.args.JsonSave({"config": config.to_dict(), "parts": parts, **(metadata or {})})
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    ckpt.save(path / "weights", ocp.args.Composite(**items))
  (path / CONFIG_FILE).write_text(config.to_json())  # written last: marks the directory complete


def read_config(uri: str) -> RealmConfig:
  path = epath.Path(uri) / CONFIG_FILE
  if not path.exists():
    raise WeightsError(f"{uri}: no {CONFIG_FILE} (not a realm-jax weights directory, or incomplete)")
  return RealmConfig.from_dict(json.loads(path.read_text()))


def load_weights(uri: str, model: nnx.Module, parts: Iterable[str] | None = None,
                 sharding: jax.sharding.Sharding | None = None) -> list[str]:
  """Restores `parts` (default: every part both have) from `uri` into `model`; returns them."""
  path = epath.Path(uri)
  read_config(uri)  # fails clearly when incomplete
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    meta = ckpt.restore(path / "weights", ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    available = set(meta["parts"])
    wanted = list(parts) if parts is not None else sorted(available & set(parts_of(model)))
    missing = [p for p in wanted if p not in available]
    if missing:
      raise WeightsError(f"{uri}: has parts {sorted(available)}, not {missing}")
    restore = {p: ocp.args.StandardRestore(abstract_part(model, p, sharding)) for p in wanted}
    try:
      restored = ckpt.restore(path / "weights", ocp.args.Composite(**restore))
    except ValueError as e:
      raise WeightsError(f"{uri}: weights do not fit the model ({e})") from e
  for p in wanted:
    set_part(model, p, restored[p])
  return wanted
