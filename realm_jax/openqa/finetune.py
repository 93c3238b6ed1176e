"""Open-QA fine-tuning (ORQA reader on a frozen REALM index), data-parallel over a `jax` mesh.

Read top to bottom: setup -> corpus, questions -> model and optimizer (query tower and reader
trained; the document index frozen) -> sharding -> checkpoint restore -> the frozen index on the
mesh -> the jitted step (`step.finetune_loss`) -> the loop (metrics, checkpoints with resume).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Callable

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from realm_jax.data.qa import QAExample, load_questions
from realm_jax.errors import ConfigError, RealmError
from realm_jax.openqa import features, loading
from realm_jax.openqa.config import FinetuneConfig
from realm_jax.openqa.step import finetune_loss
from realm_jax.storage import Storage
from realm_jax.train.checkpoints import Checkpoints
from realm_jax.train.metrics import MetricsWriter, progress_line
from realm_jax.train.optimizer import bert_adamw, warmup_linear_decay
from realm_jax.train.trainer import make_mesh, maybe_initialize_distributed, param_sharding, place_state

log = logging.getLogger("realm_jax.openqa")



def trained_params(share_embedders: bool, train_query_tower: bool = True):
  """What fine-tuning trains: everything but a separate document tower (its index is frozen).
  A shared tower is the query tower too (NNX files it under `doc_embedder`), so it is trained.
  Without `train_query_tower`, only the reader."""
  if not train_query_tower:
    return nnx.All(nnx.Param, nnx.PathContains("reader"))
  if share_embedders:
    return nnx.Param
  return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("doc_embedder")))


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


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4,))
def train_step(graphdef, beam: int, share_embedders: bool, train_query_tower: bool, state, batch, corpus):
  """One optimizer step on a batch of questions (module level: runs with the same graph share
  one compilation)."""
  model, optimizer = nnx.merge(graphdef, state)
  grad_fn = nnx.value_and_grad(finetune_loss, argnums=nnx.DiffState(0, trained_params(share_embedders, train_query_tower)),
                               has_aux=True)
  (_, metrics), grads = grad_fn(model, batch, corpus, beam)
  metrics["grad_norm"] = optax.tree.norm(grads)
  optimizer.update(model, grads)
  return nnx.state((model, optimizer)), metrics


@dataclasses.dataclass
class FinetuneResult:
  step: int
  history: list[dict]
  index_version: str


class Finetuner:
  """Owns one fine-tuning run on a storage root (corpus in `<root>/<corpus_prefix>`, index in
  `<root>/index`, checkpoints and metrics next to them). `run()` trains; `stop_after` ends early."""

  def __init__(self, cfg: FinetuneConfig, storage_uri: str, *, resume: bool = False,
               log_fn: Callable[[str], None] | None = None, stop_after: int | None = None,
               questions: list[QAExample] | None = None, index_version: str | None = None,
               on_step: Callable[[int, int], None] | None = None):
    maybe_initialize_distributed()
    self.cfg, self.stop_after = cfg, stop_after
    self.on_step = on_step  # (step, last step of this run) after every step: progress bars
    self.is_chief = jax.process_index() == 0
    self.log = log_fn or (lambda m: print(f"[realm-jax finetune] {m}", flush=True) if self.is_chief else None)
    self.storage = Storage.open(storage_uri)
    self.mesh = make_mesh(cfg)
    data = self.mesh.shape["data"]
    if cfg.batch_size % data or cfg.batch_size % jax.process_count():
      raise ConfigError(f"batch_size ({cfg.batch_size}) must be divisible by the data-parallel size {data} "
                        f"and the process count {jax.process_count()}")

    # -- corpus and questions ---------------------------------------------------------------------
    self.tables = loading.load_corpus(self.storage, cfg.corpus_prefix, cfg.model)
    self.tok = self.tables.tok
    if questions is None:
      if not cfg.train_questions:
        raise ConfigError("train_questions is empty: name a question set or file (--set train_questions=...)")
      questions = load_questions(cfg.train_questions)
    self.stream = QuestionStream(list(questions), cfg.batch_size, cfg.seed)
    self.batch_sharding = NamedSharding(self.mesh, P("data"))

    # -- model and optimizer ---------------------------------------------------------------------
    self.model = loading.init_openqa_model(cfg.model, cfg.init, cfg.seed, self.log)
    self.schedule = warmup_linear_decay(cfg.learning_rate, cfg.num_train_steps, cfg.warmup_steps)
    self.optimizer = nnx.Optimizer(self.model, bert_adamw(self.schedule, cfg.weight_decay, cfg.clip_norm),
                                   wrt=trained_params(cfg.model.share_embedders, cfg.train_query_tower))
    state = nnx.state((self.model, self.optimizer))
    self.state_sharding = param_sharding(self.mesh, cfg, state)
    nnx.update((self.model, self.optimizer), place_state(state, self.state_sharding))

    # -- checkpoints -------------------------------------------------------------------------------
    self.ckpt = Checkpoints(self.storage.uri("checkpoints"), keep=cfg.keep_checkpoints,
                            async_save=cfg.async_checkpointing)
    self.step = 0
    latest = self.ckpt.step_to_resume(resume)
    if latest is not None:
      meta = self.ckpt.read_meta(latest)
      if meta.get("kind") != "openqa":
        raise RealmError(f"{self.storage.uri('checkpoints')}/{latest} is not an Open-QA checkpoint")
      data_state, meta = self.ckpt.restore(latest, self.model, self.optimizer)
      self.stream.set_state(data_state)
      self.step = int(meta["step"])
      index_version = index_version or meta.get("index_version")
      self.log(f"resumed from checkpoint step {self.step}")

    # -- the frozen index on the mesh ----------------------------------------------------------------
    loaded = loading.ensure_index(self.storage, self.model, self.tables, cfg.model, self.mesh, index_version,
                                  self.log)
    self.index_version = loaded.version
    self.beam = min(cfg.retriever_beam_size, self.tables.num_blocks)
    if self.beam < cfg.model.reader_beam_size:
      raise ConfigError(f"the corpus has {self.tables.num_blocks} blocks, fewer than reader_beam_size "
                        f"{cfg.model.reader_beam_size}")
    self.corpus = loading.reader_corpus(self.tables, loaded.embeddings, cfg.model, self.mesh)
    self.log(f"index {loaded.version}: {loaded.info.num_blocks} blocks frozen; retriever beam {self.beam}, "
             f"reader beam {cfg.model.reader_beam_size}")
    self.model.train()
    self._compile()

  def _compile(self) -> None:
    self._graphdef, _ = nnx.split((self.model, self.optimizer))

  def _global_batch(self, examples: list[QAExample]) -> dict[str, jax.Array]:
    cfg = self.cfg
    n, p = len(examples), jax.process_count()
    mine = examples[jax.process_index() * n // p:(jax.process_index() + 1) * n // p]
    local = features.encode_questions(mine, self.tok, cfg.model.query_len, max_answers=cfg.max_answers,
                                      max_answer_tokens=cfg.max_answer_tokens)
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()}

  def run(self) -> FinetuneResult:
    cfg = self.cfg
    writer = MetricsWriter(self.storage, "finetune", enabled=self.is_chief)
    end = cfg.num_train_steps if self.stop_after is None else min(cfg.num_train_steps, self.step + self.stop_after)
    history: list[dict] = []
    t_last, since = time.perf_counter(), 0
    try:
      while self.step < end:
        batch = self._global_batch(self.stream.next())
        new_state, metrics = train_step(self._graphdef, self.beam, cfg.model.share_embedders, cfg.train_query_tower,
                                        nnx.state((self.model, self.optimizer)), batch, self.corpus)
        nnx.update((self.model, self.optimizer), new_state)
        self.step += 1
        since += 1
        if self.on_step is not None:
          self.on_step(self.step, end)
        if self.step % cfg.log_every == 0 or self.step == end:
          scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
          scalars["learning_rate"] = float(self.schedule(self.step))
          elapsed = time.perf_counter() - t_last
          scalars["questions_per_second"] = since * cfg.batch_size / max(elapsed, 1e-9)
          history.append({"step": self.step, **scalars})
          writer.write(self.step, scalars)
          shown = {k: scalars[k] for k in ("loss", "retriever_loss", "reader_loss", "span_accuracy", "reader_recall")}
          self.log(progress_line(self.step, cfg.num_train_steps, shown, scalars["questions_per_second"],
                                 (end - self.step) * elapsed / max(since, 1)))
          t_last, since = time.perf_counter(), 0
        if self.step % cfg.checkpoint_every == 0 or self.step == end:
          self._save(writer)
    finally:
      self.ckpt.wait()
      writer.close()
    self.ckpt.close()
    self.model.eval()
    return FinetuneResult(self.step, history, self.index_version)

  def _save(self, writer: MetricsWriter) -> None:
    meta = {"kind": "openqa", "config": self.cfg.to_dict(), "index_version": self.index_version}
    self.ckpt.save(self.step, self.model, self.optimizer, self.stream.get_state(), meta)
    writer.flush()
