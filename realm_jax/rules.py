"""Regex rules over parameter paths, big_vision style: `lr_mults` and `param_sharding` (pure Python).

A parameter's path is its pytree key path joined by `/` (`encoder/bert/layers/0/attention/query/kernel`;
optimizer moments carry their parameter's path after an optimizer prefix). A rule is `(regex, value)`;
the first rule whose regex is *found* in the path (`re.search`) gives the value.

Sharding values (`param_sharding`):
  `replicated`                          every device holds the whole parameter;
  `fsdp(axis=data, min_size_mb=4)`      the largest dimension divisible by the size of mesh axis
                                        `axis` (`data` or `model`) is split over it, for parameters
                                        of at least `min_size_mb` MiB (smaller ones stay replicated),
                                        as big_vision's `fsdp(axis, min_size_to_shard_mb)`;
  `fsdp`                                short for `fsdp(axis=data, min_size_mb=0)`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Sequence

from realm_jax.errors import ConfigError

SHARDING_AXES = ("data", "model")
_FSDP = re.compile(r"fsdp(?:\((?P<args>[^()]*)\))?")


def rule_tuples(rules: Iterable[Any]) -> tuple:
  """(regex, value) rules as tuples: JSON and `--set` give lists, and a config must stay hashable."""
  return tuple(tuple(r) if isinstance(r, (list, tuple)) else r for r in rules)


def key_names(path: tuple) -> list[str]:
  """The names of a pytree key path, without nnx.Variable's own `value` attribute."""
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  return [n for n in names if n not in ("value", "raw_value")]


def param_path(path: tuple) -> str:
  """A pytree key path as the `a/b/c` string that `lr_mults` and `param_sharding` rules search."""
  return "/".join(key_names(path))


def first_match(rules: Sequence[tuple[str, Any]], name: str, default: Any) -> Any:
  """The value of the first rule whose regex is found in `name`; `default` when none is."""
  return next((value for regex, value in rules if re.search(regex, name)), default)


@dataclasses.dataclass(frozen=True)
class Sharding:
  """One parsed `param_sharding` value: replicated, or FSDP over `axis` from `min_size_mb` MiB."""

  fsdp: bool = False
  axis: str = "data"
  min_size_mb: float = 0.0


def parse_sharding(value: str) -> Sharding:
  """`replicated` | `fsdp` | `fsdp(axis=data|model, min_size_mb=N)`; anything else raises ConfigError."""
  text = value.replace(" ", "").replace('"', "").replace("'", "") if isinstance(value, str) else ""
  if text == "replicated":
    return Sharding()
  m = _FSDP.fullmatch(text)
  if not m:
    raise ConfigError(f"param_sharding value {value!r}: expected 'replicated', 'fsdp' or "
                      "'fsdp(axis=data|model, min_size_mb=N)'")
  args = dict(axis="data", min_size_mb="0")
  for item in filter(None, (m.group("args") or "").split(",")):
    key, _, arg = item.partition("=")
    if key not in args or not arg:
      raise ConfigError(f"param_sharding value {value!r}: unknown argument {item!r} (axis=, min_size_mb=)")
    args[key] = arg
  if args["axis"] not in SHARDING_AXES:
    raise ConfigError(f"param_sharding value {value!r}: axis must be one of {SHARDING_AXES}")
  try:
    size = float(args["min_size_mb"])
  except ValueError:
    size = -1.0
  if not size >= 0:
    raise ConfigError(f"param_sharding value {value!r}: min_size_mb must be a number >= 0")
  return Sharding(True, args["axis"], size)


def check_sharding_rules(rules: Sequence[Any]) -> None:
  """Raises ConfigError naming the first malformed `param_sharding` rule."""
  for rule in rules:
    if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ConfigError(f"param_sharding rules are (regex, value), got {rule!r}")
    check_regex("param_sharding", rule[0])
    parse_sharding(rule[1])


def check_lr_mults(rules: Sequence[Any]) -> None:
  """Raises ConfigError naming the first malformed `lr_mults` rule."""
  for rule in rules:
    if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str)
            and isinstance(rule[1], (int, float)) and rule[1] >= 0):
      raise ConfigError(f"lr_mults rules are (regex, multiplier >= 0), got {rule!r}")
    check_regex("lr_mults", rule[0])


def check_regex(field: str, regex: str) -> None:
  try:
    re.compile(regex)
  except re.error as e:
    raise ConfigError(f"{field}: bad regex {regex!r}: {e}") from e
