"""A TFDS builder for the block corpus: prepare once (ArrayRecord), read on every host.

`manual_dir` holds either a built corpus (`manifest.json` + shards, i.e. the `corpus/` folder
of a storage root, local or `gs://`) or document files (`*.jsonl`, `*.txt`, `*.xml`, `*.xml.bz2`), which are
turned into blocks with the config's tokenizer and block length. TensorFlow is not needed:
with `file_format="array_record"` preparation and `tfds.data_source` work without it (only
`as_dataset()` needs TensorFlow). array_record writes local files: prepare into a local
`data_dir`, then copy the dataset folder to `gs://` for the hosts to read.

  builder = RealmBlocks(data_dir=DIR, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=MANUAL))
  source = tfds.data_source("realm_blocks", data_dir=DIR)["train"]   # source[i] -> dict
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from realm_jax.data.blocks import Block
from realm_jax.errors import RealmError

_DOC_PATTERNS = ("*.jsonl", "*.json", "*.txt", "*.xml", "*.xml.bz2", "*.bz2")


@dataclasses.dataclass
class RealmBlocksConfig(tfds.core.BuilderConfig):
  """How to make blocks when `manual_dir` holds documents (ignored for a built corpus)."""

  tokenizer: str = "minilm"
  block_len: int = 288
  tagger: str = "rule"


class RealmBlocks(tfds.core.GeneratorBasedBuilder):
  """REALM/ORQA blocks: `[CLS] title [SEP] body [SEP]` <= block_len tokens, with salient spans."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Blocks from a realm-jax corpus or from JSONL/text/MediaWiki documents."}
  BUILDER_CONFIGS = [RealmBlocksConfig(name="default", description="bert-base-uncased WordPiece, 288 tokens")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put a built realm-jax corpus (manifest.json + tokens-*.npy, spans-*.npz, text-*.npz) or document files "
      "(.jsonl/.txt/.xml/.xml.bz2) in the manual_dir.")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file. (tfds finds it through `importlib_resources`, an etils[epath] extra that a
    plain tensorflow-datasets install may lack; the answer is the same.)"""
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    ragged = lambda: tfds.features.Tensor(shape=(None,), dtype=np.int32)  # noqa: E731
    pairs = lambda: tfds.features.Tensor(shape=(None, 2), dtype=np.int32)  # noqa: E731
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "block_id": np.int64,
            "title": tfds.features.Text(),
            "text": tfds.features.Text(),
            "title_ids": ragged(),
            "body_ids": ragged(),
            "body_offsets": pairs(),
            "sentences": pairs(),
            "salient_spans": pairs(),
        }),
        homepage="https://arxiv.org/abs/2002.08909",
        disable_shuffling=True,  # record i is block i (row i of the index).
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    return {"train": self._generate_examples(dl_manager.manual_dir)}

  def _generate_examples(self, manual_dir):
    for block in _blocks(manual_dir, self.builder_config):
      yield int(block.block_id), {
          "block_id": np.int64(block.block_id), "title": block.title, "text": block.text,
          "title_ids": block.title_ids, "body_ids": block.body_ids,
          "body_offsets": block.body_offsets.reshape(-1, 2), "sentences": block.sentences.reshape(-1, 2),
          "salient_spans": block.salient_spans.reshape(-1, 2),
      }


def _blocks(manual_dir, config: RealmBlocksConfig):
  """Blocks of the corpus in `manual_dir` (local or `gs://`), building it first (in a temp dir)
  when it holds documents."""
  from realm_jax.data.corpus import MANIFEST, CorpusReader, build_corpus
  from realm_jax.storage import Storage

  uri = os.fspath(manual_dir).rstrip("/")
  root, _, prefix = uri.rpartition("/")
  storage = Storage.open(root or "/")
  if storage.exists(f"{prefix}/{MANIFEST}"):
    yield from CorpusReader(storage, prefix=prefix).iter_blocks()
    return
  folder = epath.Path(uri)
  docs = sorted({os.fspath(p) for pattern in _DOC_PATTERNS for p in folder.glob(pattern)})
  if not docs:
    raise RealmError(f"{uri}: no {MANIFEST} and no document files ({', '.join(_DOC_PATTERNS)})")
  with tempfile.TemporaryDirectory(prefix="realm-blocks-") as tmp:
    build_corpus(docs, tmp, tokenizer=config.tokenizer, block_len=config.block_len, tagger=config.tagger)
    yield from CorpusReader(tmp).iter_blocks()


def example_to_block(example: dict) -> Block:
  """A `Block` from one record of `tfds.data_source(...)` (text fields arrive as bytes)."""
  text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)  # noqa: E731
  return Block(block_id=int(example["block_id"]), title=text(example["title"]), text=text(example["text"]),
               title_ids=example["title_ids"], body_ids=example["body_ids"],
               body_offsets=example["body_offsets"], sentences=example["sentences"],
               salient_spans=example["salient_spans"])
