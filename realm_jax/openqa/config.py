"""Fine-tuning configs: a small validated dataclass; experiment files `experiments/openqa_*.py`
return one from `get_config()`. Only the fields the shared trainer helpers read (`mesh_model`,
`param_sharding`) mirror `TrainConfig`, so `make_mesh` / `param_sharding` are reused as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from realm_jax.config import RealmConfig, get_preset
from realm_jax.errors import ConfigError
from realm_jax.train import config as train_config


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Everything an Open-QA fine-tuning run needs besides the storage root."""

  model: RealmConfig = dataclasses.field(default_factory=lambda: get_preset("tiny", query_len=64))
  train_questions: str = ""  # question set: short name (nq-test, ...) or a JSONL/TSV path
  eval_questions: str = ""  # optional held-out set evaluated at the end
  corpus_prefix: str = "corpus"
  init: str | None = None  # weights dir, pre-training storage root, or "minilm"; None = random
  retriever_beam_size: int = 5000  # blocks retrieved for the retriever loss (ORQA: 5000)
  train_query_tower: bool = True  # False: reader-only fine-tuning (retrieval stays as initialised)
  max_answers: int = 8  # reference answers kept per question (token matching)
  max_answer_tokens: int = 16  # longer answers never match (never truncated: no false matches)
  batch_size: int = 32  # questions per step, global
  learning_rate: float = 1e-5
  num_train_steps: int = 1000
  warmup_steps: int | None = None  # None: BERT's min(10000, max(100, steps // 10))
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  async_checkpointing: bool = True
  log_every: int = 10
  mesh_model: int = 1
  param_sharding: tuple[tuple[str, str], ...] = ((".*", "replicated"),)
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "param_sharding", train_config.rule_tuples(self.param_sharding))

    def check(cond, msg):
      if not cond:
        raise ConfigError(msg)
    for name in ("retriever_beam_size", "max_answers", "max_answer_tokens", "batch_size", "num_train_steps",
                 "checkpoint_every", "keep_checkpoints", "log_every", "mesh_model"):
      v = getattr(self, name)
      check(isinstance(v, int) and v > 0, f"{name} must be a positive int, got {v!r}")
    check(self.retriever_beam_size >= self.model.reader_beam_size,
          f"retriever_beam_size ({self.retriever_beam_size}) must be >= model.reader_beam_size "
          f"({self.model.reader_beam_size}): the reader reads the top of the retrieved beam")
    check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
    for rule in self.param_sharding:
      check(len(rule) == 2 and rule[1] in ("replicated", "fsdp"),
            f"param_sharding rules are (regex, 'replicated'|'fsdp'), got {rule!r}")

  def replace(self, **kwargs) -> "FinetuneConfig":
    return dataclasses.replace(self, **kwargs)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
    d = dict(d)
    if isinstance(d.get("model"), dict):
      d["model"] = RealmConfig.from_dict(d["model"])
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ConfigError(f"unknown FinetuneConfig fields: {unknown}")
    return cls(**d)


def apply_overrides(cfg: FinetuneConfig, overrides: list[str]) -> FinetuneConfig:
  """`key=value` (JSON values or bare strings); `model.<f>` / `model.bert.<f>` reach the model."""
  return train_config.apply_overrides(cfg, overrides)


def load_finetune_config(spec: str, overrides: list[str] | None = None) -> FinetuneConfig:
  """`spec`: a .py experiment path, or a name under `experiments/` (e.g. `openqa_smoke`)."""
  return train_config.load_experiment(spec, FinetuneConfig, overrides)
