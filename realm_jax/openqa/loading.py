"""What fine-tuning, evaluation and `ask` share: model initialisation and restore, the corpus
tables and the frozen index (built once from the document tower, or loaded as published)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
from etils import epath
from flax import nnx

from realm_jax import parallel, weights
from realm_jax.config import RealmConfig
from realm_jax.convert import hf as hfconv
from realm_jax.data.corpus import CorpusReader, open_corpus
from realm_jax.errors import RealmError
from realm_jax.models import KnowledgeAugEncoder, OpenQAModel
from realm_jax.openqa import features
from realm_jax.openqa.step import ReaderCorpus
from realm_jax.retrieval import index as index_lib, mips
from realm_jax.storage import Storage
from realm_jax.train.checkpoints import Checkpoints


class OpenQALoadError(RealmError):
  """A fine-tuned model, its index or its corpus cannot be loaded."""


class _EncoderShell(nnx.Module):
  """Holds a pre-training `encoder` part, so its BERT can initialise the reader."""

  def __init__(self, cfg: RealmConfig, rngs: nnx.Rngs):
    self.encoder = KnowledgeAugEncoder(cfg, rngs=rngs)


def _copy_encoder_to_reader(model: OpenQAModel, shell: _EncoderShell) -> None:
  """REALM fine-tuning starts the reader from the pre-trained knowledge-augmented encoder's BERT."""
  nnx.update(model.reader.bert, nnx.state(shell.encoder.bert, nnx.Param))


def init_openqa_model(cfg: RealmConfig, init: str | None, seed: int, log: Callable[[str], None]) -> OpenQAModel:
  """A fresh OpenQAModel, initialised from `init`: None (random), "minilm" (packaged BERT), a
  pre-training storage root (its newest checkpoint: retriever, and the encoder's BERT for the
  reader) or a weights directory (retriever and reader, or encoder -> reader)."""
  model = OpenQAModel(cfg, rngs=nnx.Rngs(seed))
  if not init or init == "random":
    log("initialised the Open-QA model randomly")
    return model
  if init == "minilm":
    log(hfconv.init_from_minilm(model, cfg.bert.num_layers))
    return model
  root = epath.Path(init)
  if (root / "checkpoints").exists():
    ckpt = Checkpoints(str(root / "checkpoints"), read_only=True)
    step = ckpt.latest_step()
    if step is None:
      raise OpenQALoadError(f"{init}/checkpoints holds no finished checkpoint")
    ckpt.restore_part(step, model, "retriever")
    parts = ["retriever"]
    if "encoder" in ckpt.items(step):  # a pre-training root: the reader starts from the encoder's BERT
      shell = _EncoderShell(cfg, nnx.Rngs(seed))
      ckpt.restore_part(step, shell, "encoder")
      _copy_encoder_to_reader(model, shell)
      parts.append("reader (from the encoder's BERT)")
    else:  # a fine-tuning root: it has a reader itself
      ckpt.restore_part(step, model, "reader")
      parts.append("reader")
    log(f"initialised {', '.join(parts)} from checkpoint step {step} under {init}")
    return model
  if not (root / weights.CONFIG_FILE).exists():
    raise OpenQALoadError(f"{init}: no checkpoints/ (not a pre-training or fine-tuning root that has saved a "
                          f"checkpoint) and no {weights.CONFIG_FILE} (not a realm-jax weights directory)")
  available = _weight_parts(init)
  wanted = [p for p in ("retriever", "reader") if p in available]
  if "retriever" not in wanted:
    raise OpenQALoadError(f"{init}: weights have parts {sorted(available)}; fine-tuning needs `retriever`")
  weights.load_weights(init, model, wanted)
  if "reader" not in wanted and "encoder" in available:
    shell = _EncoderShell(cfg, nnx.Rngs(seed))
    weights.load_weights(init, shell, ["encoder"])
    _copy_encoder_to_reader(model, shell)
    wanted.append("reader (from the encoder's BERT)")
  log(f"initialised {', '.join(wanted)} from {init}")
  return model


def _weight_parts(uri: str) -> set[str]:
  import orbax.checkpoint as ocp
  weights.read_config(uri)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    meta = ckpt.restore(epath.Path(uri) / "weights", ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  return set(meta["parts"])


@dataclasses.dataclass
class Finetuned:
  """A model ready to answer: weights, config, the index version it was trained with."""

  model: OpenQAModel
  config: RealmConfig
  index_version: str | None
  step: int | None
  corpus_prefix: str
  corpus: str | None = None  # the corpus URI the model was fine-tuned on (None: under the root)


def load_finetuned(storage_uri: str, step: int | None = None, weights_uri: str | None = None) -> Finetuned:
  """The fine-tuned model under `storage_uri/checkpoints` (newest step unless `step`), or the
  converted weights at `weights_uri` (retriever + reader) with the root's latest index."""
  if weights_uri:
    cfg = weights.read_config(weights_uri)
    model = OpenQAModel(cfg, rngs=nnx.Rngs(0))
    available = _weight_parts(weights_uri)
    if not {"retriever", "reader"} <= available:
      raise OpenQALoadError(f"{weights_uri}: has parts {sorted(available)}; answering needs retriever and reader")
    weights.load_weights(weights_uri, model, ["retriever", "reader"])
    model.eval()
    return Finetuned(model, cfg, None, None, "corpus")
  storage = Storage.open(storage_uri)
  ckpt = Checkpoints(storage.uri("checkpoints"), read_only=True)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise OpenQALoadError(f"{storage.uri('checkpoints')}: no fine-tuning checkpoint (run `realm-jax finetune`)")
  if step not in ckpt.all_steps():
    raise OpenQALoadError(f"{storage.uri('checkpoints')}: no step {step}; have {ckpt.all_steps()}")
  meta = ckpt.read_meta(step)
  if meta.get("kind") != "openqa":
    raise OpenQALoadError(f"{storage.uri('checkpoints')}/{step} is not an Open-QA fine-tuning checkpoint")
  cfg = RealmConfig.from_dict(meta["config"]["model"])
  model = OpenQAModel(cfg, rngs=nnx.Rngs(0))
  for part in ("retriever", "reader"):
    ckpt.restore_part(step, model, part)
  model.eval()
  return Finetuned(model, cfg, meta.get("index_version"), step, meta["config"].get("corpus_prefix", "corpus"),
                   meta["config"].get("corpus"))


@dataclasses.dataclass
class CorpusTables:
  """The corpus, read by random access (no block is held in memory up front): its reader and the
  tokenizer it was built with. A block's text is read (one shard, cached) when an answer needs it."""

  reader: CorpusReader
  tok: object

  @property
  def num_blocks(self) -> int:
    return self.reader.num_blocks

  def block(self, block_id: int):
    """One block, with its text and offsets."""
    return self.reader.get_blocks([block_id])[0]


def load_corpus(storage: Storage, prefix: str, cfg: RealmConfig, uri: str | None = None) -> CorpusTables:
  """The corpus at `uri` (its own location), else at `prefix` under `storage`, opened for random
  access and checked against the model's vocabulary and block length."""
  corpus = open_corpus(storage, uri, prefix)
  tok = corpus.tokenizer()
  corpus.check_model(cfg.bert.vocab_size, cfg.block_len, tok)
  return CorpusTables(corpus, tok)


def ensure_index(storage: Storage, model: OpenQAModel, tables: CorpusTables, cfg: RealmConfig, mesh,
                 version: str | None, log: Callable[[str], None]) -> index_lib.IndexRows:
  """The index to retrieve from: `version` if given, else LATEST, else built now from the model's
  document tower and published (the document embeddings stay frozen from then on). Each process
  reads only its devices' rows of it (`load_index_rows`).

  Every process calls it. With several, process 0's view decides whether to build; then every
  process embeds its own run of corpus shards on its own devices (a computation over the global
  mesh would tie the processes step by step) and process 0 publishes, as the trainer's bootstrap
  index does."""
  missing = version is None and index_lib.latest_index_info(storage) is None
  if parallel.agree("build" if missing else None) == "build":
    model.eval()
    embedder = parallel.local_copy(model.retriever.doc_embedder)  # every process takes part
    if parallel.is_chief():
      log("no index published: embedding the corpus with the document tower (frozen from now on)")
    local = mesh if jax.process_count() == 1 else parallel.local_mesh()
    info = index_lib.build_and_publish_index(storage, embedder, tables.reader, cfg, step=0, mesh=local)
    if parallel.is_chief():
      log(f"published index {info.version} ({info.num_blocks} blocks)")
  loaded = load_index_rows(storage, version, tables, mesh)
  if loaded.info.dim != cfg.retriever_dim:
    raise OpenQALoadError(f"index {loaded.version} has {loaded.info.dim}-d embeddings, the model "
                          f"retrieves with {cfg.retriever_dim}-d queries")
  return loaded


def load_index_rows(storage: Storage, version: str | None, tables: CorpusTables, mesh) -> index_lib.IndexRows:
  """The rows of an index version (LATEST by default) that this process's devices of `mesh` hold."""
  ranges = mips.local_row_ranges(tables.num_blocks, mesh)
  return index_lib.load_index_rows(storage, ranges, version, corpus=tables.reader)


def host_bodies(doc: np.ndarray, sep_id: int, pad_id: int) -> np.ndarray:
  """int32 body ids (pad after the body) from `[CLS] title [SEP] body [SEP]` token rows: what
  `features.body_table` gives from whole blocks, cut from the stored rows instead."""
  doc = np.asarray(doc, np.int32)
  length = doc.shape[1]
  src = np.arange(length)[None, :] + np.argmax(doc == sep_id, axis=1)[:, None] + 1
  body = np.where(src < length, np.take_along_axis(doc, np.clip(src, 0, length - 1), axis=1), pad_id)
  return np.where(body == sep_id, pad_id, body).astype(np.int32)


def reader_corpus(tables: CorpusTables, index, cfg: RealmConfig, mesh) -> ReaderCorpus:
  """Places the frozen embeddings (an index's rows read for `mesh`, or a host matrix; None when
  the blocks are retrieved on the host by ScaNN) and the body tokens on the mesh; each process
  reads only its devices' token rows."""
  tok, reader = tables.tok, tables.reader
  if index is None:
    embeddings = None
  elif hasattr(index, "to_mesh"):
    embeddings = index.to_mesh(mesh)
  else:
    embeddings = mips.shard_rows(np.asarray(index, np.float32), mesh)
  bodies = mips.place_rows(reader.num_blocks, reader.block_len,
                           lambda a, b: host_bodies(reader.token_rows(a, b), tok.sep_id, tok.pad_id), mesh,
                           dtype=np.int32)
  cont = features.continuation_table(tok, cfg.bert.vocab_size)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return ReaderCorpus(embeddings, bodies, jax.device_put(cont, replicated), int(tok.pad_id), int(tok.sep_id))


@dataclasses.dataclass
class AnsweringSetup:
  """Everything `evaluate` and `ask` need: the model, the corpus, the index and the mesh."""

  finetuned: Finetuned
  tables: CorpusTables
  index: index_lib.IndexRows  # this process's rows (all of them: answering is one process; none
  # with ScaNN, which searches on the host and reads no embedding file)
  mesh: object
  searcher: object = None  # the version's ScaNN searcher (`retrieval="scann"`), else None


def load_for_answering(storage_uri: str, step: int | None = None, weights_uri: str | None = None,
                       index_version: str | None = None, corpus_prefix: str | None = None,
                       role: str = "evaluate", retrieval: str = "device") -> AnsweringSetup:
  """Model (checkpoint or weights), corpus and the index it was fine-tuned with (or `index_version`,
  or LATEST), all checked against each other. Answering runs as one process (`role` names it in
  the error on a multi-host machine). `retrieval="scann"` loads the version's ScaNN searcher (its
  partitions searched as one; refused for a version published without one) instead of the
  embedding rows: nothing of the index is placed on the mesh."""
  if retrieval not in ("device", "scann"):
    raise OpenQALoadError(f"retrieval must be 'device' or 'scann', got {retrieval!r}")
  parallel.initialize_distributed(role, multi_process=False)
  finetuned = load_finetuned(storage_uri, step, weights_uri)
  storage = Storage.open(storage_uri)
  tables = load_corpus(storage, corpus_prefix or finetuned.corpus_prefix, finetuned.config,
                       uri=None if corpus_prefix else finetuned.corpus)
  version = index_version or finetuned.index_version
  if version is None and index_lib.latest_index_info(storage) is None:
    raise OpenQALoadError(f"{storage.uri(index_lib.PREFIX)}: no index published; fine-tune there first or "
                          "publish one with `realm-jax refresh`")
  mesh = parallel.make_mesh()
  if retrieval == "scann":
    loaded = index_lib.load_index_rows(storage, [], version, corpus=tables.reader)  # its info, no rows
  else:
    loaded = load_index_rows(storage, version, tables, mesh)
  if loaded.info.dim != finetuned.config.retriever_dim:
    raise OpenQALoadError(f"index {loaded.version} has {loaded.info.dim}-d embeddings, the model retrieves with "
                          f"{finetuned.config.retriever_dim}-d queries")
  searcher = None
  if retrieval == "scann":
    uri = loaded.published.uri()
    if not (loaded.info.scann_parts or loaded.info.has_scann):
      raise OpenQALoadError(f"{uri}: this index version has no ScaNN searcher; use --retrieval device, or publish "
                            "one with ScaNN (`realm-jax refresh` without --no-scann)")
    searcher = loaded.load_searcher()
    if (searcher.info.num_rows, searcher.info.dim) != (loaded.info.num_blocks, loaded.info.dim):
      raise OpenQALoadError(f"{uri}: its ScaNN searcher covers {searcher.info.num_rows} rows of "
                            f"{searcher.info.dim}-d, the index has {loaded.info.num_blocks} of {loaded.info.dim}-d")
  return AnsweringSetup(finetuned, tables, loaded, mesh, searcher)
