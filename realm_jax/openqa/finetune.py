"""Open-QA fine-tuning (ORQA reader on a frozen REALM index), data-parallel over a `jax` mesh.

Read top to bottom: setup -> corpus, questions -> model and optimizer (query tower and reader
trained; the document index frozen) -> sharding -> checkpoint restore -> the frozen index on the
mesh -> the step (`step.train_step`) -> the loop (metrics, non-finite check, checkpoints).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
from flax import nnx

from realm_jax.data.qa import QAExample, load_questions
from realm_jax.errors import ConfigError, RealmError
from realm_jax.openqa import features, loading
from realm_jax.openqa.config import FinetuneConfig
from realm_jax.openqa.step import train_step, trained_params
from realm_jax.storage import Storage
from realm_jax.train import preflight
from realm_jax.train.loop import TrainLoop
from realm_jax.train.metrics import MetricsWriter
from realm_jax.train.optimizer import bert_adamw, warmup_linear_decay


class QuestionStream:
  """Questions in a new seeded order each epoch; its state (epoch, position) is checkpointed."""

  def __init__(self, examples: list[QAExample], batch_size: int, seed: int):
    if not examples:
      raise ConfigError("no training questions")
    self.examples, self.batch_size, self.seed = examples, batch_size, seed
    self.epoch, self.position = 0, 0

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

  def next(self) -> list[QAExample]:
    out = []
    while len(out) < self.batch_size:
      order = self._order(self.epoch)
      take = min(self.batch_size - len(out), len(order) - self.position)
      out += [self.examples[i] for i in order[self.position:self.position + take]]
      self.position += take
      if self.position == len(order):
        self.epoch, self.position = self.epoch + 1, 0
    return out

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "position": self.position, "num_questions": len(self.examples)}

  def set_state(self, state: dict) -> None:
    if state.get("num_questions") != len(self.examples):
      raise RealmError(f"the checkpoint was trained on {state.get('num_questions')} questions, this run has "
                       f"{len(self.examples)}: resume with the same train_questions")
    self.epoch, self.position = int(state["epoch"]), int(state["position"])


@dataclasses.dataclass
class FinetuneResult:
  """What `Finetuner.run()` did: the step it stopped at, the logged rows, the (frozen) index used."""

  step: int
  history: list[dict]
  index_version: str


class Finetuner(TrainLoop):
  """Owns one fine-tuning run on a storage root (corpus at `corpus` or `<root>/<corpus_prefix>`, index in
  `<root>/index`, checkpoints and metrics next to them). `run()` trains; `stop_after` ends early.
  `log_fn` also receives every log line (the lines always go to the `realm_jax.finetune` logger)."""

  kind = "openqa"

  def __init__(self, cfg: FinetuneConfig, storage: Storage | str, *, resume: bool = False,
               log_fn: Callable[[str], None] | None = None, stop_after: int | None = None,
               questions: list[QAExample] | None = None, index_version: str | None = None,
               on_step: Callable[[int, int], None] | None = None):
    preflight.check_init(cfg, ("init",))  # before anything takes time
    super().__init__(cfg, storage, role="finetune", stop_after=stop_after, log_fn=log_fn, on_step=on_step)
    data = self.mesh.shape["data"]
    if cfg.batch_size % data or cfg.batch_size % jax.process_count():
      raise ConfigError(f"batch_size ({cfg.batch_size}) must be divisible by the data-parallel size {data} "
                        f"and the process count {jax.process_count()}")

    # -- corpus and questions ---------------------------------------------------------------------
    self.tables = loading.load_corpus(self.storage, cfg.corpus_prefix, cfg.model, uri=cfg.corpus)
    self.tok = self.tables.tok
    if questions is None:
      if not cfg.train_questions:
        raise ConfigError("train_questions is empty: name a question set or file (--set train_questions=...)")
      questions = load_questions(cfg.train_questions)
    self.stream = QuestionStream(list(questions), cfg.batch_size, cfg.seed)

    # -- model and optimizer (the document tower frozen), placed by the sharding rules -------------
    model = loading.init_openqa_model(cfg.model, cfg.init, cfg.seed, self.log)
    self.schedule = warmup_linear_decay(cfg.learning_rate, cfg.num_train_steps, cfg.warmup_steps)
    tx = bert_adamw(self.schedule, cfg.weight_decay, cfg.clip_norm, lr_mults=cfg.lr_mults)
    self._place(model, nnx.Optimizer(model, tx, wrt=trained_params(cfg.model.share_embedders, cfg.train_query_tower)))

    # -- checkpoints -------------------------------------------------------------------------------
    data_state = self._resume(resume, check_meta=self._check_meta)
    if data_state is not None:
      self.stream.set_state(data_state)
      index_version = index_version or self.resumed_meta.get("index_version")

    # -- the frozen index on the mesh ----------------------------------------------------------------
    loaded = loading.ensure_index(self.storage, self.model, self.tables, cfg.model, self.mesh, index_version,
                                  self.log)
    self.index_version = loaded.version
    self.beam = min(cfg.retriever_beam_size, self.tables.num_blocks)
    if self.beam < cfg.model.reader_beam_size:
      raise ConfigError(f"the corpus has {self.tables.num_blocks} blocks, fewer than reader_beam_size "
                        f"{cfg.model.reader_beam_size}")
    self.corpus = loading.reader_corpus(self.tables, loaded, cfg.model, self.mesh)
    self.log(f"index {loaded.version}: {loaded.info.num_blocks} blocks frozen; retriever beam {self.beam}, "
             f"reader beam {cfg.model.reader_beam_size}")
    self.model.train()
    self._compile(train_step, cfg=cfg, beam=self.beam)

  def _check_meta(self, step: int, meta: dict) -> None:
    if meta.get("kind") != "openqa":
      raise RealmError(f"{self.ckpt.directory}/{step} is not an Open-QA checkpoint")

  def _global_batch(self, examples: list[QAExample]) -> dict[str, jax.Array]:
    cfg = self.cfg
    n, p = len(examples), jax.process_count()
    mine = examples[jax.process_index() * n // p:(jax.process_index() + 1) * n // p]
    local = features.encode_questions(mine, self.tok, cfg.model.query_len, max_answers=cfg.max_answers,
                                      max_answer_tokens=cfg.max_answer_tokens)
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()}

  def _run(self) -> FinetuneResult:
    """Fine-tunes to `num_train_steps` (or `stop_after` more steps), then leaves the model in eval mode."""
    cfg = self.cfg
    writer = MetricsWriter(self.storage, "finetune", enabled=self.is_chief)
    end = self._begin(cfg.num_train_steps)
    history: list[dict] = []
    shown = ("loss", "retriever_loss", "reader_loss", "span_accuracy", "reader_recall")
    try:
      while self.step < end:
        metrics = self._step(self._global_batch(self.stream.next()), self.corpus, end=end)
        self._report(metrics, writer, history, end=end, total=cfg.num_train_steps, per_step=cfg.batch_size,
                     rate_name="questions_per_second",
                     extra=lambda: {"learning_rate": float(self.schedule(self.step))}, shown=shown)
        self._checkpoint(writer, end, self.stream.get_state, {"kind": "openqa", "index_version": self.index_version})
    finally:
      self.ckpt.wait()
      writer.close()
    self.ckpt.close()
    self.model.eval()
    return FinetuneResult(self.step, history, self.index_version)
