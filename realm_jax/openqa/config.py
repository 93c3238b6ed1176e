"""Fine-tuning configs: a small validated dataclass; the experiments `openqa_*`
(realm_jax/experiments/openqa_*.py) return one from `get_config()`. The fields every run has
(optimisation, checkpoints, mesh, sharding rules) are validated by `train.config.RunConfig`.
"""

from __future__ import annotations

import dataclasses
import math

from realm_jax import layout
from realm_jax.config import RealmConfig, check, get_preset
from realm_jax.train import config as train_config
from realm_jax.train.optimizer import bert_warmup_steps


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(train_config.RunConfig):
  """Everything an Open-QA fine-tuning run needs besides the storage root."""

  model: RealmConfig = dataclasses.field(default_factory=lambda: get_preset("tiny", query_len=64))
  train_questions: str = ""  # question set: short name (nq-test, ...) or a JSONL/TSV path
  eval_questions: str = ""  # optional held-out set evaluated at the end
  corpus: str | None = None  # the corpus's own URI (gs://bucket/corpora/wiki); None: <root>/<corpus_prefix>
  corpus_prefix: str = layout.CORPUS
  # Starting weights: a pre-training run's storage root (its newest checkpoint), a weights directory,
  # "minilm", "random", or "required:<what>" (train/preflight.py; a base model never starts randomly).
  init: str | None = None
  retriever_beam_size: int = 5000  # blocks retrieved for the retriever loss (ORQA: 5000)
  train_query_tower: bool = True  # False: reader-only fine-tuning (retrieval stays as initialised)
  max_answers: int = 8  # reference answers kept per question (token matching)
  max_answer_tokens: int = 16  # longer answers never match (never truncated: no false matches)
  # The rest (optimisation, checkpoints, mesh) in RunConfig.
  batch_size: int = 32  # questions per step, global
  learning_rate: float = 1e-5
  num_train_steps: int = 1000

  def __post_init__(self):
    self._check_run_fields(("retriever_beam_size", "max_answers", "max_answer_tokens"))
    train_config.check_corpus_fields(self)
    check(self.retriever_beam_size >= self.model.reader_beam_size,
          f"retriever_beam_size ({self.retriever_beam_size}) must be >= model.reader_beam_size "
          f"({self.model.reader_beam_size}): the reader reads the top of the retrieved beam")


# ORQA's fine-tuning schedule (`language/orqa`: `orqa_model.py`, `orqa_experiment.py`, README): one
# question per step (the input pipeline does not batch), lr 1e-5, 20 epochs of the training set
# (the README's WebQuestions run: `num_train_steps = 3417 * 20`), BERT's AdamW with warmup
# min(10000, max(100, steps / 10)) and linear decay.
ORQA_LEARNING_RATE = 1e-5
ORQA_EPOCHS = 20
# Training-set sizes of ORQA's resplit (its README): NaturalQuestions-Open, WebQuestions, CuratedTrec.
ORQA_TRAIN_QUESTIONS = {"nq": 79_168, "wq": 3_417, "ct": 1_353}
LR_SCALINGS = ("none", "sqrt", "linear")


def orqa_schedule(num_train_questions: int, *, epochs: int = ORQA_EPOCHS, learning_rate: float = ORQA_LEARNING_RATE,
                  batch_size: int = 1, lr_scaling: str = "none") -> dict:
  """`batch_size`, `learning_rate`, `num_train_steps` and `warmup_steps` for `epochs` epochs over
  `num_train_questions`. Batch 1 is ORQA's schedule exactly; a larger batch takes 1/batch_size of
  its steps and of its warmup, and the rate x1 (`none`), x sqrt(batch_size) (`sqrt`) or
  x batch_size (`linear`); `benchmarks/openqa_schedule.py` compares them on a small task."""
  check(num_train_questions > 0 and epochs > 0 and batch_size > 0,
        f"orqa_schedule needs positive num_train_questions ({num_train_questions}), epochs ({epochs}) and "
        f"batch_size ({batch_size})")
  check(lr_scaling in LR_SCALINGS, f"lr_scaling must be one of {LR_SCALINGS}, got {lr_scaling!r}")
  steps_one = num_train_questions * epochs
  factor = {"none": 1.0, "sqrt": math.sqrt(batch_size), "linear": float(batch_size)}[lr_scaling]
  return {"batch_size": batch_size, "learning_rate": learning_rate * factor,
          "num_train_steps": math.ceil(steps_one / batch_size),
          "warmup_steps": max(1, math.ceil(bert_warmup_steps(steps_one) / batch_size))}


POD_BATCH = 64


def orqa_pod_config(paper_config: str, dataset: str) -> FinetuneConfig:
  """The pod variant of a paper config (`openqa_nq`, ...): `POD_BATCH` questions per step (split
  over the mesh's data axis), the same 20 epochs of `dataset`'s training set in 1/64 of the steps
  and of the warmup, at ORQA's rate 1e-5 (not scaled up: on the small task of
  benchmarks/openqa_schedule.py the unscaled rate matched one question per step, and larger rates
  lost held-out retrieval; docs/OPENQA.md)."""
  return load_finetune_config(paper_config).replace(
      **orqa_schedule(ORQA_TRAIN_QUESTIONS[dataset], batch_size=POD_BATCH, lr_scaling="none"), log_every=10,
      checkpoint_every=250)


def apply_overrides(cfg: FinetuneConfig, overrides: list[str]) -> FinetuneConfig:
  """`key=value` (JSON values or bare strings); `model.<f>` / `model.bert.<f>` reach the model."""
  return train_config.apply_overrides(cfg, overrides)


def load_finetune_config(spec: str, overrides: list[str] | None = None) -> FinetuneConfig:
  """`spec`: a named experiment (`openqa_smoke`), a .py experiment path or a .json config."""
  return train_config.load_experiment(spec, FinetuneConfig, overrides)
