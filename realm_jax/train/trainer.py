"""The REALM / ICT trainer: one process per host, data-parallel over a `jax` mesh.

Read top to bottom: setup -> data -> model and optimizer -> sharding -> checkpoint restore ->
index (bootstrap or latest) -> the jitted step -> the loop (index hot-swap between steps,
metrics, checkpoints) -> TRAINING_DONE.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from realm_jax import weights
from realm_jax.convert import hf as hfconv
from realm_jax.data import masking
from realm_jax.data.corpus import CorpusReader
from realm_jax.data.pipeline import make_loader
from realm_jax.errors import ConfigError, RealmError
from realm_jax.models import RealmModel
from realm_jax.retrieval import index as index_lib
from realm_jax.retrieval import mips
from realm_jax.storage import Storage
from realm_jax.train import device_corpus, realm_step
from realm_jax.train.checkpoints import Checkpoints
from realm_jax.train.config import TrainConfig
from realm_jax.train.metrics import MetricsWriter, progress_line
from realm_jax.train.optimizer import bert_adamw, param_path, warmup_linear_decay

log = logging.getLogger("realm_jax.train")
DONE_MARKER = "TRAINING_DONE"


# ------------------------------------------------------------------------------------------------
# Setup
# ------------------------------------------------------------------------------------------------

def maybe_initialize_distributed() -> None:
  """Joins a multi-process JAX job when the environment describes one (TPU pod or explicit)."""
  if jax.distributed.is_initialized():
    return
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
    jax.distributed.initialize()


def make_mesh(cfg: TrainConfig) -> jax.sharding.Mesh:
  """Axes (`data`, `model`) over every device; `model` = cfg.mesh_model (1 = pure data parallel)."""
  n = jax.device_count()
  if n % cfg.mesh_model:
    raise ConfigError(f"mesh_model={cfg.mesh_model} does not divide the {n} devices")
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((n // cfg.mesh_model, cfg.mesh_model), ("data", "model"), axis_types=auto)


def param_sharding(mesh, cfg: TrainConfig, state: Any) -> Any:
  """NamedShardings for a state pytree from the config's regex rules (first match wins):
  `replicated`, or `fsdp` (largest divisible dimension sharded over `data`)."""
  import re
  rules = [(re.compile(r), kind) for r, kind in cfg.param_sharding]
  data = mesh.shape["data"]

  def spec(path, leaf):
    name = param_path(path)
    kind = next((k for r, k in rules if r.fullmatch(name) or r.search(name)), "replicated")
    shape = getattr(leaf, "shape", ())
    if kind == "fsdp" and shape:
      dims = sorted(range(len(shape)), key=lambda d: -shape[d])
      for d in dims:
        if shape[d] % data == 0:
          parts = [None] * len(shape)
          parts[d] = "data"
          return NamedSharding(mesh, P(*parts))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(spec, state)


def place_state(state: Any, shardings: Any) -> Any:
  """Puts host-identical values onto (possibly multi-process) shardings; typed PRNG keys too."""
  if jax.process_count() == 1:
    return jax.device_put(state, shardings)

  def put(x, sharding):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = np.asarray(jax.random.key_data(x))
      arr = jax.make_array_from_callback(data.shape, NamedSharding(sharding.mesh, P()), lambda i: data[i])
      return jax.random.wrap_key_data(arr, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

  return jax.tree.map(put, state, shardings)


class ShardedLoader:
  """The global batch as `data_shards` loaders (one per input shard), this process reading its
  contiguous share; its local batch is their batches concatenated in shard order. The global batch
  depends on `data_shards` only, so 1 process and N processes see exactly the same examples."""

  def __init__(self, source, transform, global_batch: int, seed: int, data_shards: int):
    procs, pid = jax.process_count(), jax.process_index()
    if data_shards % procs or global_batch % data_shards:
      raise ConfigError(f"data_shards ({data_shards}) must be a multiple of the process count ({procs}) "
                        f"and divide the micro-batch ({global_batch})")
    per = data_shards // procs
    self.loaders = [make_loader(source, transform, global_batch // data_shards, seed,
                                shard_index=s, shard_count=data_shards)
                    for s in range(pid * per, (pid + 1) * per)]

  def __iter__(self):
    iters = [iter(l) for l in self.loaders]
    while True:
      parts = [next(i) for i in iters]
      yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict:
    return {"shards": [l.get_state() for l in self.loaders]}

  def set_state(self, state: dict) -> None:
    if len(state.get("shards", [])) != len(self.loaders):
      raise ConfigError(f"the checkpoint's input state has {len(state.get('shards', []))} shards for this "
                        f"process, the run has {len(self.loaders)}: resume with the same data_shards and processes")
    for loader, s in zip(self.loaders, state["shards"]):
      loader.set_state(s)

  def close(self) -> None:
    for l in self.loaders:
      l.close()


class BlockSource:
  """Random access to the corpus' blocks for the input pipeline (all blocks held in memory)."""

  def __init__(self, corpus: CorpusReader):
    self.blocks = list(corpus.iter_blocks())

  def __len__(self) -> int:
    return len(self.blocks)

  def __getitem__(self, i: int):
    return self.blocks[i]


def example_transform(cfg: TrainConfig, specials) -> Callable:
  if cfg.task == "ict":
    return lambda block, rng: masking.ict_example(block, rng, specials, query_len=cfg.model.query_len,
                                                  block_len=cfg.model.block_len, remove_prob=cfg.ict_remove_prob)
  masker = masking.make_masker(cfg.masking, specials, query_len=cfg.model.query_len, max_masks=cfg.max_masks)
  return masker


def init_model(cfg: TrainConfig, log_fn) -> RealmModel:
  model = RealmModel(cfg.model, rngs=nnx.Rngs(cfg.seed))
  if cfg.init == "minilm":
    log_fn(hfconv.init_from_minilm(model, cfg.model.bert.num_layers))
  elif cfg.init:
    parts = weights.load_weights(cfg.init, model)
    log_fn(f"initialised {', '.join(parts)} from {cfg.init}")
  return model


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Waits until every process arrives, through the coordination service (no device collective:
  gloo's 30 s context deadline is too short for a process that is still compiling or embedding)."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # the coordination client has no public accessor in jax 0.10
  distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


def agree(value: str | None) -> str | None:
  """Multi-host: every process adopts process 0's `value` (a short string or None)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  buf = np.zeros(128, np.uint8)
  raw = (value or "").encode()[:128]
  buf[:len(raw)] = np.frombuffer(raw, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return bytes(out).rstrip(b"\0").decode() or None


def gather_json(value: Any) -> list[Any]:
  """Every process's JSON-serialisable `value`, in process order (a collective)."""
  if jax.process_count() == 1:
    return [value]
  import json
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
  longest = int(np.max(multihost_utils.process_allgather(np.array([raw.size], np.int32))))
  buf = np.zeros(longest, np.uint8)
  buf[:raw.size] = raw
  rows = np.asarray(multihost_utils.process_allgather(buf))
  return [json.loads(bytes(r).rstrip(b"\0").decode()) for r in rows]


def _local_copy(module: nnx.Module) -> nnx.Module:
  """A copy of `module` whose arrays live on this process only (replicated arrays: the local
  replica; sharded ones: all-gathered, which every process must call together)."""
  graphdef, state = nnx.split(module)
  if jax.process_count() == 1:
    return nnx.merge(graphdef, state)
  from jax.experimental import multihost_utils

  def local(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return x
    if x.is_fully_replicated:
      return x.addressable_data(0)
    return multihost_utils.process_allgather(x, tiled=True)

  return nnx.merge(graphdef, jax.tree.map(local, state))


# ------------------------------------------------------------------------------------------------
# The index the step retrieves from, and its background watcher
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ActiveIndex:
  info: index_lib.IndexInfo
  on_mesh: mips.RowShardedEmbeddings
  searcher: Any = None  # ScaNN, for cfg.retrieval == "scann"


class IndexWatcher(threading.Thread):
  """Polls `index/LATEST`; loads and verifies a newer version off the critical path.

  The loop calls `take()` between steps; a bad version is logged and skipped (the trainer keeps
  its current index).
  """

  def __init__(self, storage: Storage, corpus: CorpusReader, current: str, poll_s: float, log_fn,
               with_searcher: bool):
    super().__init__(daemon=True, name="realm-index-watcher")
    self.storage, self.corpus, self.poll_s, self.log = storage, corpus, poll_s, log_fn
    self.current, self.with_searcher = current, with_searcher
    self._ready: tuple[Any, Any] | None = None
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self.rejected: list[str] = []

  def run(self) -> None:
    while not self._stop.wait(self.poll_s):
      info = None
      try:
        info = index_lib.latest_index_info(self.storage)
        if info is None or info.version == self.current or info.version in self.rejected:
          continue
        t0 = time.perf_counter()
        loaded = index_lib.load_index(self.storage, info.version, corpus=self.corpus)
        searcher = loaded.load_searcher() if self.with_searcher else None
        with self._lock:
          self._ready = (loaded, searcher)
        self.current = info.version
        self.log(f"index watcher: loaded {info.version} (checkpoint step {info.step}) in "
                 f"{time.perf_counter() - t0:.1f}s; swapping in at the next step")
      except RealmError as e:
        bad = getattr(e, "version", None) or (info.version if info else self._latest_name())
        if bad not in self.rejected:
          self.rejected.append(bad)
          self.log(f"index watcher: refused index version {bad}: {e}; keeping the current index")
      except Exception as e:  # storage hiccups: try again at the next poll
        self.log(f"index watcher: {type(e).__name__}: {e}")

  def _latest_name(self) -> str:
    """The version LATEST names, read raw (for log lines when its manifest is unreadable)."""
    try:
      return str(self.storage.read_json(f"{index_lib.PREFIX}/LATEST").get("version", "?"))
    except Exception:  # noqa: BLE001 - only for a log line
      return "?"

  def take(self):
    with self._lock:
      ready, self._ready = self._ready, None
    return ready

  def stop(self) -> None:
    self._stop.set()


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
  step: int
  history: list[dict]
  index_versions: list[str]


class Trainer:
  """Owns the run: call `run()`; `stop_after` ends early (tests, demos) without TRAINING_DONE."""

  def __init__(self, cfg: TrainConfig, storage_uri: str, *, resume: bool = False,
               log_fn: Callable[[str], None] | None = None, stop_after: int | None = None,
               write_done: bool = True, on_step: Callable[[int, int], None] | None = None):
    maybe_initialize_distributed()
    self.cfg, self.resume, self.stop_after, self.write_done = cfg, resume, stop_after, write_done
    self.on_step = on_step  # (step, last step of this run) after every step: progress bars
    self.is_chief = jax.process_index() == 0
    self.log = log_fn or (lambda msg: print(f"[realm-jax {cfg.task}] {msg}", flush=True) if self.is_chief else None)
    self.storage = Storage.open(storage_uri)
    self.mesh = make_mesh(cfg)

    # -- data ------------------------------------------------------------------------------------
    self.corpus = CorpusReader(self.storage, cfg.corpus_prefix)
    self.tok = self.corpus.tokenizer()
    if self.tok.vocab_size > cfg.model.bert.vocab_size:
      raise ConfigError(f"the corpus tokenizer has {self.tok.vocab_size} tokens but the model's "
                        f"vocab_size is {cfg.model.bert.vocab_size}")
    if self.corpus.block_len > cfg.model.block_len:
      raise ConfigError(f"corpus blocks are up to {self.corpus.block_len} tokens, model.block_len is {cfg.model.block_len}")
    self.blocks = BlockSource(self.corpus)
    self.same_corpus = cfg.query_corpus_prefix in (None, cfg.corpus_prefix)
    queries = self.blocks if self.same_corpus else BlockSource(CorpusReader(self.storage, cfg.query_corpus_prefix))
    procs = jax.process_count()
    micro_batch = cfg.batch_size // cfg.grad_accum_steps
    if micro_batch % self.mesh.shape["data"]:
      raise ConfigError(f"the micro-batch ({micro_batch} = batch_size / grad_accum_steps) must be divisible "
                        f"by the data-parallel size {self.mesh.shape['data']}")
    self.micro_batch = micro_batch
    self.loader = ShardedLoader(queries, example_transform(cfg, self.tok), micro_batch, cfg.seed,
                                cfg.data_shards or procs)
    self.batch_sharding = NamedSharding(self.mesh, P("data"))

    # -- model and optimizer ---------------------------------------------------------------------
    self.model = init_model(cfg, self.log)
    self.model.train()
    schedule = warmup_linear_decay(cfg.learning_rate, cfg.num_train_steps, cfg.warmup_steps)
    tx = bert_adamw(schedule, cfg.weight_decay, cfg.clip_norm, lr_mults=cfg.lr_mults)
    if cfg.grad_accum_steps > 1:
      tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
    self.optimizer = nnx.Optimizer(self.model, tx, wrt=nnx.Param)

    # -- sharding: params and optimizer state by the config's rules ------------------------------
    state = nnx.state((self.model, self.optimizer))
    self.state_sharding = param_sharding(self.mesh, cfg, state)
    nnx.update((self.model, self.optimizer), place_state(state, self.state_sharding))

    # -- checkpoints -------------------------------------------------------------------------------
    self.ckpt = Checkpoints(self.storage.uri("checkpoints"), keep=cfg.keep_checkpoints,
                            async_save=cfg.async_checkpointing)
    self.step = 0
    latest = self.ckpt.step_to_resume(resume)
    if latest is not None:
      data_state, meta = self.ckpt.restore(latest, self.model, self.optimizer)
      per_process = data_state["processes"]
      if len(per_process) != jax.process_count():
        raise ConfigError(f"checkpoint step {latest} was written by {len(per_process)} processes; resume it "
                          f"with the same number (this run has {jax.process_count()})")
      self.loader.set_state(per_process[jax.process_index()])
      self.step = int(meta["step"])
      self.log(f"resumed from checkpoint step {self.step}")
    elif resume:
      self.log("no checkpoint to resume from: starting at step 0")
    if self.write_done and self.is_chief and self.storage.exists(DONE_MARKER):
      self.storage.delete(DONE_MARKER)

    # -- corpus tokens on the mesh, for re-embedding candidates ----------------------------------
    self.dev_corpus = None
    if cfg.task == "realm":
      doc, body = device_corpus.host_token_tables(self.blocks.blocks, cfg.model.block_len, self.tok)
      self.dev_corpus = device_corpus.place_corpus(doc, body, self.mesh, self.tok)
    self.active: ActiveIndex | None = None
    self.watcher: IndexWatcher | None = None
    self._compile()

  # -- index ---------------------------------------------------------------------------------------
  def _publish_index(self) -> None:
    """Embeds the corpus with the current document tower and publishes it (bootstrap / sync).

    Process 0 embeds on its own devices (a jitted computation over the global mesh would need
    every process); the others wait at a barrier until the version is published.
    """
    embedder = _local_copy(self.model.retriever.doc_embedder)  # every process takes part
    if self.is_chief:
      local_mesh = jax.make_mesh((jax.local_device_count(),), ("data",), devices=jax.local_devices(),
                                 axis_types=(jax.sharding.AxisType.Auto,))
      info = index_lib.build_and_publish_index(
          self.storage, embedder, self.corpus, self.cfg.model, step=self.step,
          mesh=local_mesh, with_scann=self.cfg.retrieval == "scann", keep=self.cfg.keep_index_versions)
      self.log(f"published index {info.version} from the document tower at step {self.step} "
               f"({info.num_blocks} blocks, embed {info.timings.get('embed_seconds', 0):.1f}s)")
    barrier(f"realm-jax-index-published-{self.step}")

  def _activate(self, loaded: index_lib.LoadedIndex, searcher=None) -> None:
    self.active = ActiveIndex(loaded.info, mips.shard_rows(loaded.embeddings, self.mesh), searcher)
    self.index_versions.append(loaded.info.version)

  def _setup_index(self) -> None:
    if self.cfg.task != "realm":
      return
    info = index_lib.latest_index_info(self.storage)
    if info is None:
      self.log("no index published yet: embedding the corpus with the initial document tower")
      self._publish_index()
    loaded = index_lib.load_index(self.storage, corpus=self.corpus)
    self._activate(loaded, loaded.load_searcher() if self.cfg.retrieval == "scann" else None)
    self.log(f"using index {loaded.info.version} (checkpoint step {loaded.info.step}, {loaded.info.num_blocks} blocks)")
    if self.cfg.index_refresh == "async":
      self.watcher = IndexWatcher(self.storage, self.corpus, loaded.info.version, self.cfg.index_poll_seconds,
                                  self.log, with_searcher=self.cfg.retrieval == "scann")
      self.watcher.start()

  def _maybe_swap_index(self) -> None:
    cfg = self.cfg
    if cfg.task != "realm":
      return
    if cfg.index_refresh == "sync" and self.step > 0 and self.step % cfg.sync_refresh_every == 0 \
        and self.active.info.step < self.step:
      self._publish_index()
      loaded = index_lib.load_index(self.storage, corpus=self.corpus)
      self._activate(loaded, loaded.load_searcher() if cfg.retrieval == "scann" else None)
      self.log(f"synchronous refresh: now using {loaded.info.version}")
    if self.watcher is None:
      return
    while True:
      ready = self.watcher.take()
      # Every process must swap at the same step: process 0's watcher decides.
      chosen = agree(ready[0].info.version if ready else None)
      if chosen is not None and chosen != self.active.info.version:
        if ready is None or ready[0].info.version != chosen:  # this process had not loaded it yet
          loaded = index_lib.load_index(self.storage, chosen, corpus=self.corpus)
          ready = (loaded, loaded.load_searcher() if cfg.retrieval == "scann" else None)
        old = self.active.info.version
        self._activate(*ready)
        self.log(f"swapped index {old} -> {self.active.info.version} at step {self.step} "
                 f"(staleness {self.step - self.active.info.step})")
      staleness = self.step - self.active.info.step
      if cfg.max_index_staleness is None or staleness <= cfg.max_index_staleness:
        return
      self.log(f"index is {staleness} steps stale (> {cfg.max_index_staleness}): waiting for a fresher one")
      time.sleep(cfg.index_poll_seconds)

  # -- the jitted step -------------------------------------------------------------------------------
  def _compile(self) -> None:
    cfg = self.cfg
    per_span = cfg.model.marginal == "span"
    graphdef, _ = nnx.split((self.model, self.optimizer))

    def loss_fn(model, batch, corpus, index):
      if cfg.task == "ict":
        return realm_step.ict_loss(model, batch)
      return realm_step.realm_loss(model, batch, corpus, index, per_span=per_span, approx=cfg.approx_top_k)

    def train_step(state, batch, corpus, index):
      model, optimizer = nnx.merge(graphdef, state)
      (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch, corpus, index)
      metrics["grad_norm"] = optax.tree.norm(grads)
      optimizer.update(model, grads)
      return nnx.state((model, optimizer)), metrics

    self._train_step = jax.jit(train_step, donate_argnums=(0,), out_shardings=(self.state_sharding, None))

    self.model.eval()  # the same parameters, dropout off: for host-side (ScaNN) query embedding
    eval_graphdef, _ = nnx.split(self.model)
    self.model.train()
    self._embed_queries = jax.jit(
        lambda state, *inputs: nnx.merge(eval_graphdef, state).retriever.embed_queries(*inputs))
    self.index_versions: list[str] = []

  def _global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    keep = {k: v for k, v in local.items() if k not in ("mlm_labels", "sentence_removed")}
    if "block_id" in keep:  # excluded from retrieval: only meaningful within the same corpus
      keep["block_id"] = keep["block_id"].astype(np.int32) if self.same_corpus else np.full_like(keep["block_id"], -1, np.int32)
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in keep.items()}

  def _scann_candidates(self, batch: dict[str, jax.Array]) -> None:
    """Host-side retrieval for `retrieval='scann'`: query embeddings with the current weights,
    ScaNN search on the host, candidates fed to the step as `candidate_ids`."""
    q = self._embed_queries(nnx.state(self.model), batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    res = self.active.searcher.search(np.asarray(q), self.cfg.model.num_candidates - 1,
                                      exclude_ids=np.asarray(batch["block_id"])[:, None])
    batch["candidate_ids"] = jax.device_put(res.ids, self.batch_sharding)

  # -- the loop --------------------------------------------------------------------------------------
  def run(self) -> TrainResult:
    cfg = self.cfg
    writer = MetricsWriter(self.storage, cfg.task, enabled=self.is_chief)
    self._setup_index()
    total_micro = cfg.num_train_steps * cfg.grad_accum_steps
    end = total_micro if self.stop_after is None else min(total_micro, self.step + self.stop_after)
    history: list[dict] = []
    t_last, steps_since = time.perf_counter(), 0
    it = iter(self.loader)
    try:
      while self.step < end:
        self._maybe_swap_index()
        batch = self._global_batch(next(it))
        if cfg.task == "realm" and cfg.retrieval == "scann":
          self._scann_candidates(batch)
        state = nnx.state((self.model, self.optimizer))
        index = self.active.on_mesh if self.active else None
        if jax.process_count() > 1 and not hasattr(self._train_step, "as_text"):
          # Compile ahead, then meet: processes enter the first collective together.
          self._train_step = self._train_step.lower(state, batch, self.dev_corpus, index).compile()
          barrier("realm-jax-step-compiled")
        new_state, metrics = self._train_step(state, batch, self.dev_corpus, index)
        nnx.update((self.model, self.optimizer), new_state)
        self.step += 1
        steps_since += 1
        if self.on_step is not None:
          self.on_step(self.step, end)
        if self.step % cfg.log_every == 0 or self.step == end:
          scalars = {k: float(np.asarray(v.addressable_data(0))) for k, v in metrics.items()}
          if self.active is not None:
            scalars["index_staleness"] = float(self.step - self.active.info.step)
          scalars["learning_rate"] = float(warmup_linear_decay(cfg.learning_rate, cfg.num_train_steps,
                                                               cfg.warmup_steps)(self.step // cfg.grad_accum_steps))
          elapsed = time.perf_counter() - t_last
          rate = steps_since * self.micro_batch / max(elapsed, 1e-9)
          scalars["examples_per_second"] = rate
          history.append({"step": self.step, **scalars})
          writer.write(self.step, scalars)
          eta = (end - self.step) * elapsed / max(steps_since, 1)
          self.log(progress_line(self.step, total_micro, {k: scalars[k] for k in ("loss",) + tuple(
              k for k in ("mlm_accuracy", "retrieval_utility", "ict_accuracy", "index_staleness") if k in scalars)},
                                 rate, eta))
          t_last, steps_since = time.perf_counter(), 0
        if self.step % cfg.checkpoint_every == 0 or self.step == end:
          self._save(writer)
    finally:
      if self.watcher is not None:
        self.watcher.stop()
      self.ckpt.wait()
      writer.close()
    if self.step >= total_micro and self.write_done and self.is_chief:
      self.storage.write_bytes(DONE_MARKER, f"{self.step}\n".encode())
      self.log(f"training done at step {self.step}; wrote {DONE_MARKER}")
    self.ckpt.close()
    self.loader.close()
    barrier("realm-jax-run-finished")  # leave together: process 0 has more to flush than the rest
    return TrainResult(self.step, history, list(self.index_versions))

  def _save(self, writer: MetricsWriter) -> None:
    meta = {"config": self.cfg.to_dict(), "index_version": self.active.info.version if self.active else None}
    # orbax writes JSON items from process 0 only: gather every process's input position first.
    data_state = {"processes": gather_json(self.loader.get_state())}
    self.ckpt.save(self.step, self.model, self.optimizer, data_state, meta)
    writer.flush()
