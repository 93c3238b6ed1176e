"""Training configs: a typed, validated dataclass; experiment files in `experiments/` build them.

An experiment is a Python file with `get_config() -> TrainConfig` (big_vision style), chosen by
path or by name (`smoke` -> experiments/smoke.py). `--set key=value` overrides any field,
`model.<field>` / `model.bert.<field>` reach into the model config.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import re
from typing import Any

from realm_jax.config import RealmConfig, get_preset
from realm_jax.errors import ConfigError

_TASKS = ("realm", "ict")
_MASKING = ("salient", "random_token", "random_span")
_RETRIEVAL = ("device", "scann")
_REFRESH = ("async", "sync", "none")


def rule_tuples(rules) -> tuple:
  """(regex, value) rules as tuples: JSON and `--set` give lists, and a config must stay hashable."""
  return tuple(tuple(r) if isinstance(r, (list, tuple)) else r for r in rules)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run needs besides the storage root."""

  model: RealmConfig = dataclasses.field(default_factory=lambda: get_preset("tiny"))
  task: str = "realm"  # "realm" pre-training or "ict" warm start
  # Data.
  corpus_prefix: str = "corpus"  # the knowledge corpus retrieved from, under the storage root
  query_corpus_prefix: str | None = None  # where masked queries come from (None: the same corpus)
  masking: str = "salient"  # salient | random_token | random_span (REALM's ablations)
  max_masks: int = 10
  data_shards: int | None = None  # input shards; None = one per process. Fixing it makes the
  # global batch independent of the process count (each process reads data_shards / processes).
  ict_remove_prob: float = 0.9
  # Optimisation (BERT's AdamW).
  batch_size: int = 512  # global, across all hosts and devices
  grad_accum_steps: int = 1  # micro-batches per optimizer step (batch_size must divide)
  learning_rate: float = 3e-5
  num_train_steps: int = 200_000
  warmup_steps: int | None = None  # None: min(10000, max(100, steps // 10))
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  lr_mults: tuple[tuple[str, float], ...] = ()  # (path regex, multiplier): first match scales the
  # update of a parameter (e.g. ("^encoder/", 0.1)); unmatched parameters keep the full rate
  # Retrieval.
  retrieval: str = "device"  # exact/approx top-k on the mesh, or ScaNN on the host
  approx_top_k: bool = False  # lax.approx_max_k (TPU) instead of exact lax.top_k
  # Index freshness.
  index_refresh: str = "async"  # async: a refresher process publishes; sync: stop and re-embed
  sync_refresh_every: int = 500
  index_poll_seconds: float = 5.0
  max_index_staleness: int | None = None  # steps; wait for a fresher index beyond this
  keep_index_versions: int = 3
  # Checkpoints and logs.
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  async_checkpointing: bool = True
  log_every: int = 10
  # Mesh: data axis over all devices by default; model axis for tensor parallelism.
  mesh_model: int = 1
  param_sharding: tuple[tuple[str, str], ...] = ((".*", "replicated"),)  # (regex, replicated|fsdp)
  seed: int = 0
  init: str | None = None  # weights URI, or "minilm" for the packaged MiniLM BERT

  def __post_init__(self):
    for key in ("param_sharding", "lr_mults"):
      object.__setattr__(self, key, rule_tuples(getattr(self, key)))

    def check(cond, msg):
      if not cond:
        raise ConfigError(msg)
    check(self.task in _TASKS, f"task must be one of {_TASKS}, got {self.task!r}")
    check(self.masking in _MASKING, f"masking must be one of {_MASKING}, got {self.masking!r}")
    check(self.retrieval in _RETRIEVAL, f"retrieval must be one of {_RETRIEVAL}, got {self.retrieval!r}")
    check(self.index_refresh in _REFRESH, f"index_refresh must be one of {_REFRESH}, got {self.index_refresh!r}")
    for name in ("batch_size", "grad_accum_steps", "num_train_steps", "checkpoint_every", "log_every",
                 "keep_checkpoints", "max_masks", "mesh_model", "sync_refresh_every", "keep_index_versions"):
      v = getattr(self, name)
      check(isinstance(v, int) and v > 0, f"{name} must be a positive int, got {v!r}")
    check(self.batch_size % self.grad_accum_steps == 0,
          f"batch_size ({self.batch_size}) must be divisible by grad_accum_steps ({self.grad_accum_steps})")
    check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
    check(0.0 <= self.ict_remove_prob <= 1.0, f"ict_remove_prob must be in [0, 1], got {self.ict_remove_prob}")
    for rule in self.lr_mults:
      check(len(rule) == 2 and isinstance(rule[0], str) and isinstance(rule[1], (int, float)) and rule[1] >= 0,
            f"lr_mults rules are (regex, multiplier >= 0), got {rule!r}")
      try:
        re.compile(rule[0])
      except re.error as e:
        raise ConfigError(f"lr_mults: bad regex {rule[0]!r}: {e}") from e
    for rule in self.param_sharding:
      check(len(rule) == 2 and rule[1] in ("replicated", "fsdp"),
            f"param_sharding rules are (regex, 'replicated'|'fsdp'), got {rule!r}")

  def replace(self, **kwargs) -> "TrainConfig":
    return dataclasses.replace(self, **kwargs)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
    d = dict(d)
    d["model"] = RealmConfig.from_dict(d["model"]) if isinstance(d.get("model"), dict) else d.get("model")
    return cls(**d)


def _parse_value(text: str) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text  # bare strings


def apply_overrides(cfg, overrides: list[str]):
  """Applies `key=value` strings to any config dataclass with a `model: RealmConfig` field;
  values are JSON (numbers, true/false, null) or bare strings; `model.<f>` / `model.bert.<f>`
  reach the model config."""
  top, model = {}, {}
  fields = {f.name for f in dataclasses.fields(type(cfg))}
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"--set expects key=value, got {item!r}")
    key, value = item.split("=", 1)
    if key.startswith("model."):
      model[key[len("model."):]] = _parse_value(value)
    elif key in fields:
      top[key] = _parse_value(value)
    else:
      raise ConfigError(f"unknown config key {key!r}; known: {sorted(fields)} and model.*")
  if model:
    try:
      top["model"] = cfg.model.replace(**model)
    except TypeError as e:
      raise ConfigError(f"bad model override: {e}") from e
  return cfg.replace(**top) if top else cfg


def load_experiment(spec: str, config_type: type, overrides: list[str] | None = None):
  """`spec` is a path to a .py experiment or a name under `experiments/` (e.g. 'smoke'), whose
  `get_config()` must return a `config_type`, or a .json file of `config_type.to_dict()`;
  `overrides` are applied to it."""
  path = pathlib.Path(spec)
  if path.suffix == ".json":  # a config written by `save_config` (e.g. the demo's)
    if not path.exists():
      raise ConfigError(f"config file {spec!r} not found")
    try:
      cfg = config_type.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
      raise ConfigError(f"{path}: not a {config_type.__name__} JSON file: {e}") from e
    return apply_overrides(cfg, overrides or [])
  if not path.suffix:
    path = pathlib.Path(__file__).resolve().parents[2] / "experiments" / f"{spec}.py"
  if not path.exists():
    raise ConfigError(f"experiment config {spec!r} not found (looked for {path})")
  module_spec = importlib.util.spec_from_file_location(f"realm_experiment_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path}: an experiment file must define get_config()")
  cfg = module.get_config()
  if not isinstance(cfg, config_type):
    raise ConfigError(f"{path}: get_config() must return a {config_type.__name__}, got {type(cfg).__name__}")
  return apply_overrides(cfg, overrides or [])


def save_config(cfg, path: str | pathlib.Path) -> None:
  """Writes a config as JSON, loadable by `load_experiment` (so a second process, e.g. the
  refresher, runs with exactly the same config)."""
  pathlib.Path(path).write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")


def load_config(spec: str, overrides: list[str] | None = None) -> TrainConfig:
  """A pre-training / ICT experiment (see `load_experiment`)."""
  return load_experiment(spec, TrainConfig, overrides)
