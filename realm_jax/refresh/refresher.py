"""The index refresher loop: newest finalized checkpoint -> document tower -> embeddings -> index.

It runs as its own process (its own host and devices on Cloud) next to the trainer, sharing only
the storage root (a `Storage`). Its configuration is the one the trainer stored in its checkpoints:
the refresher waits for the first finalized checkpoint and reads the model, corpus and retention
from it (a `config` or `overrides` given to it are checked against that, field by field). Each
round: re-read the trainer's finalized checkpoints (read-only orbax manager), pick the newest one
newer than the index LATEST names, restore only its `retriever` part onto this process's mesh,
embed every block and publish `index/<version>/` with `retrieval.index.build_and_publish_index`
(staged embeddings, create-only files, manifest, then LATEST by compare-and-swap, then pruning).
It stops once `TRAINING_DONE` exists or after `max_versions` publishes. A crash at any moment
leaves LATEST on a complete version; a restart resumes the staged embeddings of the checkpoint it
was working on.

Multi-host: run it as a multi-process JAX job (the trainer's `jax.distributed` launch). Process 0
decides what to do next; every process restores the retriever, embeds its own run of corpus
shards on its own devices, uploads them and a ScaNN partition, and process 0 publishes.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from realm_jax import layout, parallel, publish
from realm_jax.config import RealmConfig
from realm_jax.data.corpus import open_corpus
from realm_jax.errors import RealmError
from realm_jax.logs import RunLog
from realm_jax.models.retriever import Retriever
from realm_jax.retrieval import embed as embed_lib, index as index_lib
from realm_jax.storage import Storage
from realm_jax.train.checkpoints import Checkpoints, CorruptCheckpoint
from realm_jax.train.config import TrainConfig, apply_overrides, flat_fields


class RefreshError(RealmError):
  """The refresher cannot use the trainer's checkpoints (another configuration, or not REALM)."""


@dataclasses.dataclass(frozen=True)
class RefreshOptions:
  """How the loop runs; the model, corpus and retention come from the trainer's config."""

  max_versions: int | None = None  # exit after publishing this many versions
  poll_seconds: float = 5.0  # wait between looks at the checkpoints when there is nothing new
  with_scann: bool = True  # also build and publish a ScaNN searcher (a partition per process)
  keep: int | None = None  # index versions to retain (default: cfg.keep_index_versions)
  embed_batch_size: int = 256  # rows per jit call (rounded up to a multiple of the devices)
  dtype: str = "float32"  # embeddings as stored: float32 | bfloat16


@dataclasses.dataclass
class RefreshResult:
  """What one `Refresher.run()` did, and why it stopped."""

  published: list[index_lib.IndexInfo]
  conflicts: list[int]  # checkpoint steps whose publish lost the LATEST race
  reason: str  # "training done" | "max versions"


def forget_gcs_listings() -> None:
  """Drops gcsfs's cached directory listings (orbax lists `gs://` through etils -> gcsfs, which
  caches them per process): without this a long-lived reader never sees the trainer's new steps."""
  gcsfs = sys.modules.get("gcsfs")
  if gcsfs is not None:
    for fs in list(getattr(gcsfs.GCSFileSystem, "_cache", {}).values()):
      fs.invalidate_cache()


class _RetrieverOnly(nnx.Module):
  """Just the `retriever` part of RealmModel, so `Checkpoints.restore_part` finds it by name
  without the refresher building (or holding) the knowledge-augmented encoder."""

  def __init__(self, cfg: RealmConfig, *, rngs: nnx.Rngs):
    self.retriever = Retriever(cfg, rngs=rngs)


class Refresher:
  """Owns the loop: `Refresher("gs://bucket/run").run()`, or `Refresher(storage)` for any `Storage`.

  `config` and `overrides` (`key=value`), when given, are what the caller believes the trainer ran
  with: a field that contradicts the checkpoint's stored config raises RefreshError naming it.
  `log_fn` also receives every log line (they always go to the `realm_jax.refresh` logger)."""

  def __init__(self, storage: Storage | str, options: RefreshOptions = RefreshOptions(), *,
               config: TrainConfig | None = None, overrides: Sequence[str] = (),
               log_fn: Callable[[str], None] | None = None):
    parallel.initialize_distributed("refresh")  # a multi-process refresher joins its job
    self.storage = storage if isinstance(storage, Storage) else Storage.open(storage)
    self.options = options
    self.log = RunLog("realm_jax.refresh", log_fn)
    self.claimed, self.overrides = config, list(overrides)
    self.cfg: TrainConfig | None = None  # the trainer's, read from its first checkpoint we look at
    self._last_warning = ""
    self._rejected: set[int] = set()  # checkpoint steps that failed verification: never retried
    # Checkpoints restore replicated over every process's devices; each process embeds its share on
    # its own devices (`local`: a copy of the retriever there, updated after each restore).
    self.sharding = NamedSharding(embed_lib.default_mesh(), P())
    self.mesh = parallel.local_mesh()
    self.ckpt = Checkpoints(self.storage.uri(layout.CHECKPOINTS), read_only=True)
    self.log(f"watching {self.storage.uri(layout.CHECKPOINTS)} on {jax.device_count()} "
             f"{jax.devices()[0].platform} device(s)")

  # -- the trainer's config -------------------------------------------------------------------------
  def stored_config(self, step: int) -> TrainConfig:
    """The config the trainer saved with checkpoint `step`, checked against what we were told."""
    where = f"{self.ckpt.directory}/{step}"
    stored = (self.ckpt.read_meta(step) or {}).get("config")
    if stored is None:
      raise RefreshError(f"{where}: the checkpoint holds no config (not written by `realm-jax pretrain`)")
    try:
      cfg = TrainConfig.from_dict(stored)
    except (TypeError, RealmError) as e:
      raise RefreshError(f"{where}: the stored config is not a TrainConfig this version reads ({e})") from e
    claimed = apply_overrides(self.claimed or cfg, self.overrides)
    theirs, mine = flat_fields(cfg), flat_fields(claimed)  # the same fields, in declaration order
    for field, value in theirs.items():
      if mine[field] != value:
        raise RefreshError(f"{where}: --config/--set give {field}={mine[field]!r}, the trainer ran with "
                           f"{field}={value!r}; leave --config and --set out to use its config")
    if cfg.task != "realm":
      raise RefreshError(f"{where}: a {cfg.task!r} run: only REALM pre-training retrieves from an index, "
                         "so there is nothing to refresh")
    return cfg

  def _configure(self, step: int) -> None:
    """Takes the trainer's config from checkpoint `step` and builds what embedding needs."""
    cfg = self.cfg = self.stored_config(step)
    self.corpus = open_corpus(self.storage, cfg.corpus, cfg.corpus_prefix)
    self.keep = self.options.keep or cfg.keep_index_versions
    self.model = _RetrieverOnly(cfg.model, rngs=nnx.Rngs(0))
    state = nnx.state(self.model)
    nnx.update(self.model, parallel.place_state(state, jax.tree.map(lambda _: self.sharding, state)))
    self.local = parallel.local_copy(self.model)
    # One embed fn for the whole run: it reads the (restored in place) weights at each call, so
    # the jit compilation is paid once, not once per version.
    self.embed_fn = embed_lib.make_embed_fn(self.local.retriever.doc_embedder, self.mesh,
                                            self.options.embed_batch_size)
    self.log(f"the trainer's config (from checkpoint step {step}): model {cfg.model.fingerprint()}, corpus "
             f"{self.corpus.num_blocks} blocks in {self.corpus.num_shards} shards; keeping {self.keep} index versions")

  # -- what to do next -----------------------------------------------------------------------------
  def index_step(self) -> int:
    """Checkpoint step of the index LATEST names; -1 when none (or LATEST's manifest is bad:
    then the version name, `<step>-<suffix>`, still tells the step)."""
    try:
      info = index_lib.latest_index_info(self.storage)
      return -1 if info is None else info.step
    except RealmError as e:
      try:
        pointer = self.storage.read_json(f"{layout.INDEX}/{publish.LATEST}")
        step = publish.version_key(pointer["version"])[0]
      except (RealmError, KeyError, TypeError):
        step = -1
      message = f"the index LATEST names is unreadable ({e}); treating it as step {step}"
      if message != self._last_warning:  # once, not at every poll
        self._last_warning = message
        self.log.warning(message)
      return step

  def _staged(self, step: int) -> bool:
    prefix = index_lib.staging_prefix(layout.INDEX_WORK, step, self.cfg.model,
                                      index_lib.corpus_fingerprint(self.corpus), self.options.dtype)
    return self.storage.exists(f"{prefix}/{embed_lib.INFO_FILE}")

  def next_step(self) -> int | None:
    """The checkpoint to index next, or None. Normally the newest finalized step newer than the
    index; but a step whose embeddings a killed refresher had already staged is resumed first
    (re-embedding from scratch would waste that work; the next round takes the newest)."""
    forget_gcs_listings()
    self.ckpt.reload()
    newer = [s for s in self.ckpt.all_steps() if s > self.index_step() and s not in self._rejected]
    while self.cfg is None and newer:
      try:
        self._configure(max(newer))
      except CorruptCheckpoint as e:
        self._reject(max(newer), e)
        newer.remove(max(newer))
    if not newer:
      return None
    staged = [s for s in newer if self._staged(s)]
    return max(staged) if staged else max(newer)

  def _reject(self, step: int, error: object) -> None:
    self._rejected.add(step)
    self.log.warning(f"refused checkpoint step {step}: {error}; skipping it")

  def done(self) -> bool:
    return self.storage.exists(layout.TRAINING_DONE)

  # -- one refresh -----------------------------------------------------------------------------------
  def refresh(self, step: int) -> index_lib.IndexInfo | None:
    """Indexes checkpoint `step`; None if the checkpoint vanished or the publish lost the race."""
    t0 = time.perf_counter()
    self.log(f"checkpoint step {step}: restoring the retriever (index LATEST is at step "
             f"{self.index_step()})")
    problem, corrupt = None, False
    try:
      if self.cfg is None:
        self._configure(step)
      elif self.stored_config(step).model != self.cfg.model:
        raise RefreshError(f"{self.ckpt.directory}/{step}: the trainer's model config changed since the "
                           "checkpoint this refresher started from; restart the refresher")
      self.ckpt.restore_part(step, self.model, "retriever", self.sharding)
      nnx.update(self.local, nnx.state(parallel.local_copy(self.model)))
    except RefreshError:
      raise
    except CorruptCheckpoint as e:  # damaged, or being deleted by the trainer's retention right now
      problem, corrupt = str(e), True
    except Exception as e:  # pruned by the trainer's retention meanwhile, or half-deleted
      problem = f"{type(e).__name__}: {e}"
    problems = [p for p in parallel.gather_json([problem, corrupt]) if p[0]]
    refused = [p for p, bad in problems if bad]
    if refused:  # every process refuses this step for good, together
      self._reject(step, refused[0])
      return None
    if problems:  # every process gives up on this step together
      self.log.warning(f"checkpoint step {step}: cannot restore it ({problems[0][0]}); looking again at the next poll")
      return None
    restore_s = time.perf_counter() - t0
    mine = index_lib.process_shards(self.corpus.num_shards, jax.process_index(), jax.process_count())
    blocks = sum(int(self.corpus.shards[i]["num_blocks"]) for i in mine)
    share = (f" (this process: {blocks} blocks, shards {mine.start}..{mine.stop - 1})"
             if jax.process_count() > 1 else "")
    self.log(f"checkpoint step {step}: restored in {restore_s:.1f}s; embedding "
             f"{self.corpus.num_blocks} blocks ({self.corpus.num_shards} shards){share} on "
             f"{self.mesh.size} device(s)")
    try:
      info = index_lib.build_and_publish_index(
          self.storage, self.local.retriever.doc_embedder, self.corpus, self.cfg.model, step=step,
          mesh=self.mesh, with_scann=self.options.with_scann, keep=self.keep,
          dtype=self.options.dtype, embed_fn=self.embed_fn)
    except publish.PublishConflict as e:
      self.log(f"checkpoint step {step}: not published, another publisher got there first ({e})")
      return None
    t = info.timings
    self.log(f"published index {info.version}: {info.num_blocks} blocks x {info.dim} from "
             f"checkpoint step {step}; restore {restore_s:.1f}s, embed {t.get('embed_seconds', 0):.1f}s, "
             f"scann {t.get('scann_seconds', 0):.1f}s, publish {t.get('publish_seconds', 0):.1f}s, "
             f"total {time.perf_counter() - t0:.1f}s")
    return info

  # -- the loop ----------------------------------------------------------------------------------------
  def run(self) -> RefreshResult:
    """Refreshes until TRAINING_DONE exists or `max_versions` versions are published."""
    published: list[index_lib.IndexInfo] = []
    conflicts: list[int] = []
    waiting_since = None
    while True:
      if self.cfg is None and jax.process_count() > 1:
        # Reading the trainer's config restores a checkpoint item: every process together, from
        # the newest step process 0 sees (next_step would configure on process 0 alone).
        newest = None
        if jax.process_index() == 0:
          forget_gcs_listings()
          self.ckpt.reload()
          steps = [s for s in self.ckpt.all_steps() if s not in self._rejected]
          newest = str(max(steps)) if steps else None
        newest = parallel.agree(newest)  # a string (or None) for every process
        if newest is not None:
          problem = None
          try:
            self._configure(int(newest))
          except CorruptCheckpoint as e:  # refused by every process together (none waits alone)
            problem = str(e)
          refused = [p for p in parallel.gather_json(problem) if p]
          if refused:
            self.cfg = None
            self._reject(int(newest), refused[0])
            continue
      decision = None  # process 0 decides for everyone: "done", "max", "wait" or a step
      if jax.process_index() == 0:
        if self.done():
          decision = "done"
        elif self.options.max_versions is not None and len(published) >= self.options.max_versions:
          decision = "max"
        else:
          step = self.next_step()
          decision = "wait" if step is None else str(step)
      decision = parallel.agree(decision)
      if decision == "done":
        self.log(f"{layout.TRAINING_DONE} found: the trainer finished; exiting after {len(published)} "
                 "published version(s)")
        return RefreshResult(published, conflicts, "training done")
      if decision == "max":
        self.log(f"published {len(published)} version(s) (--max-versions): exiting")
        return RefreshResult(published, conflicts, "max versions")
      step = None if decision == "wait" else int(decision)
      if step is None:
        if waiting_since is None:
          waiting_since = time.perf_counter()
          self.log(f"no finalized checkpoint newer than the index (step {self.index_step()}); "
                   f"polling every {self.options.poll_seconds:g}s")
        time.sleep(self.options.poll_seconds)
        continue
      waiting_since = None
      info = self.refresh(step)
      if info is not None:
        published.append(info)
      elif self.index_step() >= step:
        conflicts.append(step)
      else:
        time.sleep(self.options.poll_seconds)


__all__ = ["RefreshError", "RefreshOptions", "RefreshResult", "Refresher"]
