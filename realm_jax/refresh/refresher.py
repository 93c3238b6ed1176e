"""The index refresher loop: newest finalized checkpoint -> document tower -> embeddings -> index.

It runs as its own process (its own host and devices on Cloud) next to the trainer, sharing only
the storage root. Each round: re-read the trainer's finalized checkpoints (read-only orbax
manager), pick the newest one newer than the index LATEST names, restore only its `retriever`
part onto this process's mesh, embed every block and publish `index/<version>/` with
`retrieval.index.build_and_publish_index` (staged embeddings, create-only files, manifest, then
LATEST by compare-and-swap, then pruning). It stops once `TRAINING_DONE` exists or after
`max_versions` publishes. A crash at any moment leaves LATEST on a complete version; a restart
resumes the staged embeddings of the checkpoint it was working on.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from realm_jax import publish
from realm_jax.config import RealmConfig
from realm_jax.data.corpus import CorpusReader
from realm_jax.errors import RealmError
from realm_jax.models.retriever import Retriever
from realm_jax.refresh import faults as faults_lib
from realm_jax.retrieval import embed as embed_lib
from realm_jax.retrieval import index as index_lib
from realm_jax.train.checkpoints import Checkpoints
from realm_jax.train.config import TrainConfig
from realm_jax.train.trainer import DONE_MARKER



class RefreshError(RealmError):
  """The refresher cannot use the trainer's checkpoints (another model configuration)."""


@dataclasses.dataclass(frozen=True)
class RefreshOptions:
  """How the loop runs; the model, corpus and retention come from the TrainConfig."""

  max_versions: int | None = None  # exit after publishing this many versions
  poll_seconds: float = 5.0  # wait between looks at the checkpoints when there is nothing new
  with_scann: bool = False  # also build and publish a ScaNN searcher
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
  """Owns the loop: `Refresher(cfg, "gs://bucket/run").run()`."""

  def __init__(self, cfg: TrainConfig, storage_uri: str, options: RefreshOptions = RefreshOptions(),
               *, log_fn: Callable[[str], None] | None = None):
    self.cfg, self.options = cfg, options
    self.log = log_fn or (lambda msg: print(f"[realm-jax refresh] {msg}", flush=True))
    self.storage = faults_lib.open_storage(storage_uri)
    self.faults = getattr(self.storage, "faults", None)
    self._last_warning = ""
    self.corpus = CorpusReader(self.storage, cfg.corpus_prefix)
    self.keep = options.keep or cfg.keep_index_versions
    self.mesh = embed_lib.default_mesh()
    self.sharding = replicated = NamedSharding(self.mesh, P())
    self.model = _RetrieverOnly(cfg.model, rngs=nnx.Rngs(0))
    nnx.update(self.model, jax.device_put(nnx.state(self.model), replicated))
    # One embed fn for the whole run: it reads the (restored in place) weights at each call, so
    # the jit compilation is paid once, not once per version.
    self.embed_fn = embed_lib.make_embed_fn(self.model.retriever.doc_embedder, self.mesh,
                                            options.embed_batch_size)
    self.ckpt = Checkpoints(self.storage.uri("checkpoints"), read_only=True)
    self.log(f"watching {self.storage.uri('checkpoints')} on {jax.device_count()} "
             f"{jax.devices()[0].platform} device(s); corpus {self.corpus.num_blocks} blocks in "
             f"{self.corpus.num_shards} shards; keeping {self.keep} index versions")

  # -- what to do next -----------------------------------------------------------------------------
  def index_step(self) -> int:
    """Checkpoint step of the index LATEST names; -1 when none (or LATEST's manifest is bad:
    then the version name, `<step>-<suffix>`, still tells the step)."""
    try:
      info = index_lib.latest_index_info(self.storage)
      return -1 if info is None else info.step
    except RealmError as e:
      try:
        pointer = self.storage.read_json(f"{index_lib.PREFIX}/{publish.LATEST}")
        step = publish.version_key(pointer["version"])[0]
      except (RealmError, KeyError, TypeError):
        step = -1
      message = f"the index LATEST names is unreadable ({e}); treating it as step {step}"
      if message != self._last_warning:  # once, not at every poll
        self._last_warning = message
        self.log(message)
      return step

  def _staged(self, step: int) -> bool:
    prefix = index_lib.staging_prefix(index_lib.WORK_PREFIX, step, self.cfg.model,
                                      index_lib.corpus_fingerprint(self.corpus), self.options.dtype)
    return self.storage.exists(f"{prefix}/{embed_lib.INFO_FILE}")

  def next_step(self) -> int | None:
    """The checkpoint to index next, or None. Normally the newest finalized step newer than the
    index; but a step whose embeddings a killed refresher had already staged is resumed first
    (re-embedding from scratch would waste that work; the next round takes the newest)."""
    forget_gcs_listings()
    self.ckpt.reload()
    newer = [s for s in self.ckpt.all_steps() if s > self.index_step()]
    if not newer:
      return None
    staged = [s for s in newer if self._staged(s)]
    return max(staged) if staged else max(newer)

  def done(self) -> bool:
    return self.storage.exists(DONE_MARKER)

  # -- one refresh -----------------------------------------------------------------------------------
  def _check_config(self, step: int) -> None:
    meta = self.ckpt.read_meta(step)
    model = (meta.get("config") or {}).get("model")
    if model is None:
      return
    theirs = RealmConfig.from_dict(model)
    if theirs.fingerprint() != self.cfg.model.fingerprint():
      raise RefreshError(
          f"{self.ckpt.directory}/{step}: the trainer's model config (fingerprint "
          f"{theirs.fingerprint()}) is not this refresher's ({self.cfg.model.fingerprint()}); pass "
          "the trainer's --config and --set model.* overrides")

  def refresh(self, step: int) -> index_lib.IndexInfo | None:
    """Indexes checkpoint `step`; None if the checkpoint vanished or the publish lost the race."""
    t0 = time.perf_counter()
    self.log(f"checkpoint step {step}: restoring the retriever (index LATEST is at step "
             f"{self.index_step()})")
    try:
      self._check_config(step)
      self.ckpt.restore_part(step, self.model, "retriever", self.sharding)
    except RefreshError:
      raise
    except Exception as e:  # pruned by the trainer's retention meanwhile, or half-deleted
      self.log(f"checkpoint step {step}: cannot restore it ({type(e).__name__}: {e}); "
               "looking again at the next poll")
      return None
    restore_s = time.perf_counter() - t0
    if self.faults is not None:
      self.faults.hit("restore")
    self.log(f"checkpoint step {step}: restored in {restore_s:.1f}s; embedding "
             f"{self.corpus.num_blocks} blocks ({self.corpus.num_shards} shards) on "
             f"{self.mesh.size} device(s)")
    try:
      info = index_lib.build_and_publish_index(
          self.storage, self.model.retriever.doc_embedder, self.corpus, self.cfg.model, step=step,
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
      if self.done():
        self.log(f"{DONE_MARKER} found: the trainer finished; exiting after {len(published)} "
                 "published version(s)")
        return RefreshResult(published, conflicts, "training done")
      if self.options.max_versions is not None and len(published) >= self.options.max_versions:
        self.log(f"published {len(published)} version(s) (--max-versions): exiting")
        return RefreshResult(published, conflicts, "max versions")
      step = self.next_step()
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


__all__ = ["DONE_MARKER", "RefreshError", "RefreshOptions", "RefreshResult", "Refresher"]
