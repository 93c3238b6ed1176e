"""Training configs: typed, validated dataclasses; experiment files build them (big_vision style).

An experiment is a Python file with `get_config()` returning a `TrainConfig` (pre-training, ICT)
or an `openqa.config.FinetuneConfig`. The project's named experiments are the package
`realm_jax.experiments` (`smoke` -> realm_jax/experiments/smoke.py), installed with realm-jax;
any other file is named by its path. `--set key=value` overrides any field, `model.<field>` /
`model.bert.<field>` reach into the model config.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import importlib.util
import json
import pathlib
from typing import Any

from realm_jax import layout, rules, slices
from realm_jax.config import BertConfig, RealmConfig, check, check_choice, check_positive_ints, check_types, get_preset
from realm_jax.errors import ConfigError

_TASKS = ("realm", "ict")
_MASKING = ("salient", "random_token", "random_span")
_RETRIEVAL = ("device", "scann")
_REFRESH = ("async", "sync", "none")
EXPERIMENTS = "realm_jax.experiments"


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """What the run configs (`TrainConfig`, `FinetuneConfig`) share: the fields of every training
  run (optimisation, checkpoints, mesh and sharding rules), their validation, the JSON round trip
  and `replace`. Each run config sets its own batch, rate and length defaults."""

  # Optimisation (BERT's AdamW).
  batch_size: int = 32  # global, across all hosts and devices
  learning_rate: float = 1e-5
  num_train_steps: int = 1000
  warmup_steps: int | None = None  # None: BERT's min(10000, max(100, steps // 10))
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  lr_mults: tuple[tuple[str, float], ...] = ()  # (path regex, multiplier): first match scales the
  # update of a parameter (e.g. ("^encoder/", 0.1)); unmatched parameters keep the full rate
  # Checkpoints and logs.
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  async_checkpointing: bool = True
  log_every: int = 10
  # Mesh (`parallel.py`): (data, model) axes; `model` splits the index rows and what an
  # `fsdp(axis=model)` rule names, for memory (no layer is split over it).
  mesh_model: int = 1
  # (regex, "replicated" | "fsdp" | "fsdp(axis=data|model, min_size_mb=N)"), first match (`rules.py`).
  param_sharding: tuple[tuple[str, str], ...] = ((".*", "replicated"),)
  seed: int = 0

  def _check_run_fields(self, positive: tuple[str, ...]) -> None:
    check_types(self)
    if not isinstance(self.model, RealmConfig):
      raise ConfigError(f"{type(self).__name__}.model must be a model config, got {self.model!r}")
    object.__setattr__(self, "param_sharding", rules.rule_tuples(self.param_sharding))
    object.__setattr__(self, "lr_mults", rules.rule_tuples(self.lr_mults))
    check_positive_ints(self, positive + ("batch_size", "num_train_steps", "checkpoint_every", "keep_checkpoints",
                                          "log_every", "mesh_model"))
    check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
    rules.check_sharding_rules(self.param_sharding)
    rules.check_lr_mults(self.lr_mults)

  def replace(self, **kwargs: Any) -> Any:
    return dataclasses.replace(self, **kwargs)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Any:
    """The config of `to_dict()` (e.g. read back from JSON); unknown fields raise ConfigError."""
    d = dict(d)
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ConfigError(f"unknown {cls.__name__} fields: {unknown}")
    if isinstance(d.get("model"), dict):
      d["model"] = RealmConfig.from_dict(d["model"])
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class TrainConfig(RunConfig):
  """Everything a training run needs besides the storage root."""

  model: RealmConfig = dataclasses.field(default_factory=lambda: get_preset("tiny"))
  task: str = "realm"  # "realm" pre-training or "ict" warm start
  # Data. A corpus lives at its own URI, shared by the ICT, REALM and fine-tuning runs
  # (`corpus=gs://bucket/corpora/wiki`), or under the run's storage root (`corpus_prefix`).
  corpus: str | None = None  # the knowledge corpus's URI; None: <storage root>/<corpus_prefix>
  corpus_prefix: str = layout.CORPUS  # the corpus under the storage root when `corpus` is None
  query_corpus: str | None = None  # URI of the corpus masked queries come from (REALM with X = CC-News)
  query_corpus_prefix: str | None = None  # ... or its prefix under the root (None and None: the corpus)
  masking: str = "salient"  # salient | random_token | random_span (REALM's ablations)
  max_masks: int = 10
  data_shards: int | None = None  # input shards; None = one per process. Fixing it makes the
  # global batch independent of the process count (each process reads data_shards / processes).
  ict_remove_prob: float = 0.9
  # Optimisation (BERT's AdamW; the rest in RunConfig).
  batch_size: int = 512
  grad_accum_steps: int = 1  # micro-batches per optimizer step (batch_size must divide)
  learning_rate: float = 3e-5
  num_train_steps: int = 200_000
  # Retrieval.
  retrieval: str = "device"  # exact/approx top-k on the mesh, or ScaNN on the host
  approx_top_k: bool = False  # lax.approx_max_k (TPU) instead of exact lax.top_k
  # Skip (weigh 0) an example whose candidates hold one block text twice or a copy of its own
  # block, as the original example generator does (`realm_step.duplicate_candidates`).
  skip_duplicate_candidates: bool = True
  # Index freshness.
  index_refresh: str = "async"  # async: a refresher process publishes; sync: stop and re-embed
  sync_refresh_every: int = 500
  index_poll_seconds: float = 5.0
  max_index_staleness: int | None = None  # steps; wait for a fresher index beyond this
  keep_index_versions: int = 3
  # Starting weights (`train/preflight.py`): a weights directory (`realm-jax convert`), a training
  # run's storage root (its newest checkpoint), "minilm" (the packaged MiniLM BERT), "random", or
  # "required:<what>" (an experiment naming weights the user supplies; the run refuses to start
  # until they are given). A base-size model with init=None refuses to start from random weights.
  init: str | None = None
  init_retriever: str | None = None  # the retriever's own starting weights (same forms): REALM from ICT
  # Where the run is meant to run (`slices.py`): at start the trainer checks that it has the slice's
  # devices and that the memory estimate (`train/memory.py`) fits the device memory.
  target_slice: str | None = None
  memory_check: bool = True  # False skips the memory-estimate check (it is an estimate)

  def __post_init__(self):
    if self.target_slice is not None:
      object.__setattr__(self, "target_slice", slices.canonical(slices.get_slice(self.target_slice).name))
    check_corpus_fields(self)
    check(self.query_corpus is None or self.query_corpus_prefix is None,
          f"set query_corpus ({self.query_corpus!r}) or query_corpus_prefix ({self.query_corpus_prefix!r}), not both")
    self._check_run_fields(("grad_accum_steps", "max_masks", "sync_refresh_every", "keep_index_versions"))
    check_choice(self, "task", _TASKS)
    check_choice(self, "masking", _MASKING)
    check_choice(self, "retrieval", _RETRIEVAL)
    check_choice(self, "index_refresh", _REFRESH)
    check(self.batch_size % self.grad_accum_steps == 0,
          f"batch_size ({self.batch_size}) must be divisible by grad_accum_steps ({self.grad_accum_steps})")
    check(0.0 <= self.ict_remove_prob <= 1.0, f"ict_remove_prob must be in [0, 1], got {self.ict_remove_prob}")


REQUIRED = "required:"  # `init="required:BERT-base weights ..."`: the experiment names what the user must give


def check_corpus_fields(cfg: Any) -> None:
  """`corpus` (a URI) and a non-default `corpus_prefix` name the same thing: one of them only."""
  check(cfg.corpus is None or cfg.corpus_prefix == layout.CORPUS,
        f"set corpus ({cfg.corpus!r}) or corpus_prefix ({cfg.corpus_prefix!r}), not both")
  if cfg.corpus is not None:
    check(bool(cfg.corpus.strip().rstrip("/")) and not cfg.corpus.rstrip("/").endswith(":/"),
          f"corpus must be a URI of the corpus directory (gs://bucket/corpora/wiki or a path), got {cfg.corpus!r}")


def flat_fields(cfg: Any) -> dict[str, Any]:
  """A config as `{dotted field: value}` (`batch_size`, `model.bert.hidden_size`): what `--set` names."""
  out: dict[str, Any] = {}

  def walk(prefix: str, d: dict[str, Any]) -> None:
    for key, value in d.items():
      if isinstance(value, dict):
        walk(f"{prefix}{key}.", value)
      else:
        out[prefix + key] = value

  walk("", dataclasses.asdict(cfg))
  return out


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
    model_fields = {f.name for f in dataclasses.fields(RealmConfig)} - {"bert"}
    bert_fields = {f.name for f in dataclasses.fields(BertConfig)}
    for key in model:
      known = bert_fields if key.startswith("bert.") else model_fields
      if key.removeprefix("bert.") not in known:
        where = "model.bert" if key.startswith("bert.") else "model"
        raise ConfigError(f"unknown config key 'model.{key}'; known {where} keys: {', '.join(sorted(known))}")
    try:
      top["model"] = cfg.model.replace(**model)
    except TypeError as e:
      raise ConfigError(f"bad model override: {e}") from e
  return cfg.replace(**top) if top else cfg


def experiment_names() -> list[str]:
  """The named experiments installed with realm-jax (`realm_jax/experiments/*.py`)."""
  files = importlib.resources.files(EXPERIMENTS).iterdir()
  return sorted(f.name[:-3] for f in files if f.name.endswith(".py") and not f.name.startswith("_"))


def load_experiment(spec: str, config_type: type, overrides: list[str] | None = None):
  """`spec` is a named experiment (`smoke`: realm_jax/experiments/smoke.py), a path to a .py file,
  whose `get_config()` must return a `config_type`, or a .json file of `config_type.to_dict()`;
  `overrides` are applied to it."""
  path = pathlib.Path(spec)
  if path.suffix == ".json":  # a config written by `save_config`
    if not path.exists():
      raise ConfigError(f"config file {spec!r} not found")
    try:
      data = json.loads(path.read_text())
      if not isinstance(data, dict) or "model" not in data:
        raise ConfigError('no "model" field (a config JSON, as `save_config` writes it, holds every field, the '
                          "model's included)")
      cfg = config_type.from_dict(data)
    except OSError as e:
      raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, TypeError, ConfigError) as e:
      raise ConfigError(f"{path}: not a {config_type.__name__} JSON file: {e}") from None
    return apply_overrides(cfg, overrides or [])
  if not path.suffix:
    if spec not in experiment_names():
      raise ConfigError(f"no experiment named {spec!r}; the named ones are {', '.join(experiment_names())} "
                        "(or give a path to a .py file)")
    module = importlib.import_module(f"{EXPERIMENTS}.{spec}")
    path = pathlib.Path(module.__file__)
  else:
    if not path.exists():
      raise ConfigError(f"experiment config {spec!r} not found (looked for {path.absolute()})")
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
