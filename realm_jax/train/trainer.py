"""The REALM / ICT trainer: one process per host, one jitted step over the mesh (`parallel.py`).

Read top to bottom: setup -> data -> model and optimizer -> sharding -> checkpoint restore ->
index (bootstrap or latest) -> the step (`realm_step.train_step`) -> the loop (index hot-swap
between steps, metrics, non-finite check, checkpoints) -> TRAINING_DONE.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import optax
from etils import epath
from flax import nnx

from realm_jax import layout, parallel, weights
from realm_jax.convert import hf as hfconv
from realm_jax.data.corpus import open_corpus
from realm_jax.errors import ConfigError
from realm_jax.models import RealmModel
from realm_jax.retrieval import index as index_lib, mips
from realm_jax.storage import Storage
from realm_jax.train import device_corpus, inputs, preflight, realm_step
from realm_jax.train.checkpoints import Checkpoints
from realm_jax.train.config import TrainConfig
from realm_jax.train.index_watcher import ActiveIndex, IndexWatcher
from realm_jax.train.loop import TrainLoop
from realm_jax.train.metrics import MetricsWriter
from realm_jax.train.optimizer import bert_adamw, warmup_linear_decay


def load_parts(uri: str, model: nnx.Module, parts: list[str] | None, field: str = "init") -> str:
  """Restores `parts` (default: all the model's) from a weights directory, or from the newest
  checkpoint of a training run's storage root; returns what was loaded, for the log."""
  root = epath.Path(uri)
  if (root / layout.CHECKPOINTS).exists():
    ckpt = Checkpoints(str(root / layout.CHECKPOINTS), read_only=True)
    step = ckpt.latest_step()
    if step is None:
      raise ConfigError(f"{field}={uri}: its {layout.CHECKPOINTS}/ holds no finished checkpoint")
    parts = parts or weights.parts_of(model)
    for part in parts:
      ckpt.restore_part(step, model, part)
    return f"{', '.join(parts)} from checkpoint step {step} of {uri}"
  return f"{', '.join(weights.load_weights(uri, model, parts))} from {uri}"


def init_model(cfg: TrainConfig, log: Callable[[str], None] = lambda message: None) -> RealmModel:
  """A RealmModel from the config's seed, initialised from `cfg.init` ("minilm", "random", a weights
  directory or a run's storage root), then its retriever from `cfg.init_retriever` when set."""
  model = RealmModel(cfg.model, rngs=nnx.Rngs(cfg.seed))
  if cfg.init == "minilm":
    log(hfconv.init_from_minilm(model, cfg.model.bert.num_layers))
  elif cfg.init in (None, "random"):
    log(f"initialised the model randomly (seed {cfg.seed})")
  else:
    log(f"initialised {load_parts(cfg.init, model, None)}")
  if cfg.init_retriever == "minilm":
    log(hfconv.init_from_minilm(model, cfg.model.bert.num_layers, parts=("retriever",)))
  elif cfg.init_retriever not in (None, "random"):
    log(f"initialised {load_parts(cfg.init_retriever, model, ['retriever'], 'init_retriever')}")
  return model


@dataclasses.dataclass
class TrainResult:
  """What `Trainer.run()` did: the step it stopped at, the logged rows, the index versions used."""

  step: int
  history: list[dict]
  index_versions: list[str]


class Trainer(TrainLoop):
  """Owns the run: call `run()`; `stop_after` ends early (tests, demos) without TRAINING_DONE.
  `log_fn` also receives every log line (the lines always go to the `realm_jax.train` logger)."""

  def __init__(self, cfg: TrainConfig, storage: Storage | str, *, resume: bool = False,
               log_fn: Callable[[str], None] | None = None, stop_after: int | None = None,
               write_done: bool = True, on_step: Callable[[int, int], None] | None = None):
    preflight.check_init(cfg)  # before anything takes time: named weights given, no base model from random
    super().__init__(cfg, storage, role="train", stop_after=stop_after, log_fn=log_fn, on_step=on_step)
    self.write_done = write_done

    # -- data ------------------------------------------------------------------------------------
    self.corpus = open_corpus(self.storage, cfg.corpus, cfg.corpus_prefix)
    self.tok = self.corpus.tokenizer()
    self.corpus.check_model(cfg.model.bert.vocab_size, cfg.model.block_len, self.tok)
    # The declared slice and the memory estimate, before the model, the device corpus or an index.
    preflight.check_fits(cfg, jax.device_count(), self.corpus.num_blocks, log=self.log)
    self.same_corpus = cfg.query_corpus is None and (
        cfg.query_corpus_prefix is None or (cfg.corpus is None and cfg.query_corpus_prefix == cfg.corpus_prefix))
    query_corpus = (self.corpus if self.same_corpus
                    else open_corpus(self.storage, cfg.query_corpus, cfg.query_corpus_prefix))
    self.micro_batch = cfg.batch_size // cfg.grad_accum_steps
    if self.micro_batch % self.mesh.shape["data"]:
      raise ConfigError(f"the micro-batch ({self.micro_batch} = batch_size / grad_accum_steps) must be divisible "
                        f"by the data-parallel size {self.mesh.shape['data']}")
    data_shards = cfg.data_shards or jax.process_count()
    inputs.check_data_shards(data_shards, self.micro_batch)
    queries = inputs.CorpusRecords(query_corpus, *inputs.process_record_range(query_corpus.num_blocks, data_shards))
    self.loader = inputs.ShardedLoader(queries, inputs.example_transform(cfg, self.tok), self.micro_batch, cfg.seed,
                                       data_shards)

    # -- model and optimizer, placed by the sharding rules -----------------------------------------
    model = init_model(cfg, self.log)
    model.train()
    self.schedule = warmup_linear_decay(cfg.learning_rate, cfg.num_train_steps, cfg.warmup_steps)
    # The ICT loss never reads the encoder: BERT's optimizer updates only variables with a gradient,
    # so neither does ours (without the rule, weight decay would shrink the encoder on every step).
    lr_mults = ((r"^encoder/", 0.0),) + tuple(cfg.lr_mults) if cfg.task == "ict" else cfg.lr_mults
    tx = bert_adamw(self.schedule, cfg.weight_decay, cfg.clip_norm, lr_mults=lr_mults)
    if cfg.grad_accum_steps > 1:
      tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
    self._place(model, nnx.Optimizer(model, tx, wrt=nnx.Param))

    # -- checkpoints -------------------------------------------------------------------------------
    data_state = self._resume(resume)
    if data_state is not None:
      per_process = data_state["processes"]
      if len(per_process) != jax.process_count():
        raise ConfigError(f"checkpoint step {self.step} was written by {len(per_process)} processes; resume it "
                          f"with the same number (this run has {jax.process_count()})")
      state = per_process[jax.process_index()]
      saved = {s.get("config", {}).get("num_records") for s in state.get("shards", [])}
      if saved and saved != {len(queries)}:
        where = query_corpus.storage.uri(query_corpus.prefix)
        raise ConfigError(f"{where}: the corpus holds {len(queries)} blocks now, checkpoint step "
                          f"{self.step} was trained on one of {', '.join(map(str, sorted(saved)))} blocks (it was "
                          "rebuilt since): resume with the corpus it was trained on, or start a new run on a fresh "
                          "storage root")
      self.loader.set_state(state)
    if self.write_done and self.is_chief and self.storage.exists(layout.TRAINING_DONE):
      self.storage.delete(layout.TRAINING_DONE)

    # -- corpus tokens on the mesh, for re-embedding candidates ----------------------------------
    self.dev_corpus = None
    if cfg.task == "realm":
      self.dev_corpus = device_corpus.place_corpus(self.corpus, self.mesh, self.tok, cfg.model.block_len)
    self.active: ActiveIndex | None = None
    self.watcher: IndexWatcher | None = None
    self.index_versions: list[str] = []

    # -- the jitted step, and a query embedder for host-side (ScaNN) retrieval ---------------------
    self._compile(realm_step.train_step, cfg=cfg)
    self.model.eval()  # the same parameters, dropout off
    eval_graphdef, _ = nnx.split(self.model)
    self.model.train()
    self._embed_queries = jax.jit(
        lambda state, *features: nnx.merge(eval_graphdef, state).retriever.embed_queries(*features))

  @property
  def kind(self) -> str:
    """The task of this run (`realm` or `ict`): a checkpoint of the other task is refused."""
    return self.cfg.task

  # -- index ---------------------------------------------------------------------------------------
  def _publish_index(self) -> None:
    """Embeds the corpus with the current document tower and publishes it (bootstrap / sync).

    Every process embeds its own run of corpus shards on its own devices (a jitted computation
    over the global mesh would tie the processes step by step) and process 0 publishes.
    """
    embedder = parallel.local_copy(self.model.retriever.doc_embedder)
    info = index_lib.build_and_publish_index(
        self.storage, embedder, self.corpus, self.cfg.model, step=self.step, mesh=parallel.local_mesh(),
        keep=self.cfg.keep_index_versions, with_scann=self.cfg.retrieval == "scann")
    self.log(f"published index {info.version} from the document tower at step {self.step} "
             f"({info.num_blocks} blocks, embed {info.timings.get('embed_seconds', 0):.1f}s)")

  def _load(self, version: str | None = None) -> tuple[index_lib.IndexRows, object]:
    """This process's devices' rows of an index version (LATEST by default), each chunk verified;
    with `retrieval='scann'` the version's ScaNN searcher instead (it keeps what it searches, and
    the step re-embeds its candidates: no embedding row is read or placed on the mesh)."""
    scann = self.cfg.retrieval == "scann"
    ranges = [] if scann else mips.local_row_ranges(self.corpus.num_blocks, self.mesh)
    loaded = index_lib.load_index_rows(self.storage, ranges, version, corpus=self.corpus)
    return loaded, loaded.load_searcher() if scann else None

  def _activate(self, loaded: index_lib.IndexRows, searcher=None) -> None:
    self.active = ActiveIndex(loaded.info, None if searcher is not None else loaded.to_mesh(self.mesh), searcher)
    self.index_versions.append(loaded.info.version)

  def _setup_index(self) -> None:
    if self.cfg.task != "realm":
      return
    if index_lib.latest_index_info(self.storage) is None:
      self.log("no index published yet: embedding the corpus with the initial document tower")
      self._publish_index()
    self._activate(*self._load())
    info = self.active.info
    self.log(f"using index {info.version} (checkpoint step {info.step}, {info.num_blocks} blocks)")
    if self.cfg.index_refresh == "async":
      self.watcher = IndexWatcher(self.storage, self._load, info.version, self.cfg.index_poll_seconds,
                                  log=self.log)
      self.watcher.start()

  def _maybe_swap_index(self) -> None:
    cfg = self.cfg
    if cfg.task != "realm":
      return
    if cfg.index_refresh == "sync" and self.step > 0 and self.step % cfg.sync_refresh_every == 0 \
        and self.active.info.step < self.step:
      self._publish_index()
      self._activate(*self._load())
      self.log(f"synchronous refresh: now using {self.active.info.version}")
    if self.watcher is None:
      return
    while True:
      # Every process must swap at the same step: process 0's watcher decides. A version this
      # process loaded but process 0 has not yet stays with the watcher for a later step.
      chosen = parallel.agree(self.watcher.ready_version())
      if chosen is not None and chosen != self.active.info.version:
        ready = self.watcher.load_now(chosen)  # this process's read of it, done, under way or now
        old = self.active.info.version
        self._activate(*ready)
        self.log(f"swapped index {old} -> {self.active.info.version} at step {self.step} "
                 f"(staleness {self.step - self.active.info.step})")
      staleness = self.step - self.active.info.step
      if cfg.max_index_staleness is None or staleness <= cfg.max_index_staleness:
        return
      self.log(f"index is {staleness} steps stale (> {cfg.max_index_staleness}): waiting for a fresher one")
      time.sleep(cfg.index_poll_seconds)

  def _scann_candidates(self, batch: dict[str, jax.Array]) -> None:
    """Host-side retrieval for `retrieval='scann'`: query embeddings with the current weights,
    ScaNN search on the host, candidates fed to the step as `candidate_ids`."""
    q = self._embed_queries(nnx.state(self.model), batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    # This process's queries only (its rows of the global batch): each process searches its own.
    local_q, local_ids = parallel.process_local_rows(q), parallel.process_local_rows(batch["block_id"])
    res = self.active.searcher.search(local_q, self.cfg.model.num_candidates - 1, exclude_ids=local_ids[:, None])
    batch["candidate_ids"] = jax.make_array_from_process_local_data(self.batch_sharding, res.ids)

  # -- the loop --------------------------------------------------------------------------------------
  def _extra_scalars(self) -> dict[str, float]:
    """Logged next to the step's metrics: the learning rate, and the staleness of the index."""
    out = {"learning_rate": float(self.schedule(self.step // self.cfg.grad_accum_steps))}
    if self.active is not None:
      out["index_staleness"] = float(self.step - self.active.info.step)
    return out

  def _run(self) -> TrainResult:
    """Trains to `num_train_steps` (or `stop_after` more steps); see the module docstring."""
    cfg = self.cfg
    writer = MetricsWriter(self.storage, cfg.task, enabled=self.is_chief)
    self._setup_index()
    total = cfg.num_train_steps * cfg.grad_accum_steps  # micro-steps
    end = self._begin(total)
    history: list[dict] = []
    batches = iter(self.loader)
    shown = ("loss", "mlm_accuracy", "retrieval_utility", "ict_accuracy", "index_staleness")
    try:
      while self.step < end:
        self._maybe_swap_index()
        batch = inputs.global_batch(next(batches), self.batch_sharding, self.same_corpus)
        if cfg.task == "realm" and cfg.retrieval == "scann":
          self._scann_candidates(batch)
        metrics = self._step(batch, self.dev_corpus, self.active.on_mesh if self.active else None, end=end)
        self._report(metrics, writer, history, end=end, total=total, per_step=self.micro_batch,
                     rate_name="examples_per_second", extra=self._extra_scalars, shown=shown)
        # orbax writes JSON items from process 0 only: every process's input position is gathered.
        self._checkpoint(writer, end, lambda: {"processes": parallel.gather_json(self.loader.get_state())},
                         {"kind": cfg.task, "index_version": self.active.info.version if self.active else None})
    finally:
      if self.watcher is not None:
        self.watcher.stop()
      self.ckpt.wait()
      writer.close()
    if self.step >= total and self.write_done and self.is_chief:
      self.storage.write_bytes(layout.TRAINING_DONE, f"{self.step}\n".encode())
      self.log(f"training done at step {self.step}; wrote {layout.TRAINING_DONE}")
    self.ckpt.close()
    self.loader.close()
    parallel.barrier("realm-jax-run-finished")  # leave together: process 0 has more to flush than the rest
    return TrainResult(self.step, history, list(self.index_versions))
