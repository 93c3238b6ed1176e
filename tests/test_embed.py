"""make_embed_fn against direct model calls (8 and 1 devices); embed_corpus resumes after a crash."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from realm_jax.config import get_preset
from realm_jax.data.corpus import CorpusReader, build_corpus
from realm_jax.data.features import blocks_doc_inputs
from realm_jax.models.microbatch import CPU_STEP_ELEMENTS, rows_per_step
from realm_jax.models.retriever import RetrieverEmbedder
from realm_jax.retrieval.embed import (
  EmbedError,
  bucket_lengths,
  embed_corpus,
  length_batches,
  make_embed_fn,
  shard_name,
  used_lengths,
)
from realm_jax.storage import Storage

CFG = get_preset("tiny", **{"bert.vocab_size": 30522})
BLOCK_LEN = 64
_WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


def write_docs(path, num_docs: int):
  """Tiny synthetic articles (6 sentences each: ~2 blocks of 64 tokens)."""
  with open(path, "w") as f:
    for i in range(num_docs):
      sents = [f"Sentence {j} of document {i} is about {_WORDS[(i + j) % 11]} and "
               f"{_WORDS[(i * j) % 11]} in Paris on {j + 1} May 19{i + 50}." for j in range(6)]
      f.write(json.dumps({"title": f"Doc {i}", "text": " ".join(sents)}) + "\n")
  return str(path)


def make_corpus(storage, tmp_path, num_docs: int = 10, shard_blocks: int = 5,
                prefix: str = "corpus") -> CorpusReader:
  """A real corpus built by the corpus module (MiniLM vocabulary), in `prefix/` of `storage`."""
  docs = write_docs(tmp_path / f"docs-{num_docs}.jsonl", num_docs)
  build_corpus([docs], storage, prefix, block_len=BLOCK_LEN, shard_blocks=shard_blocks)
  return CorpusReader(storage, prefix)


def make_embedder(seed: int = 0) -> RetrieverEmbedder:
  return RetrieverEmbedder(CFG, rngs=nnx.Rngs(seed))


def reference(embedder, inputs) -> np.ndarray:
  """The embedder called directly, in eval mode, on everything at once."""
  view = nnx.view(embedder, deterministic=True)
  return np.asarray(view(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]))


class CrashAfter:
  """Our embed function, failing (as a device or host error would) on its `crash_on`-th call."""

  def __init__(self, embed_fn, crash_on: int | None = None):
    self.embed_fn, self.crash_on, self.calls = embed_fn, crash_on, 0

  def __call__(self, inputs):
    self.calls += 1
    if self.crash_on is not None and self.calls == self.crash_on:
      raise RuntimeError(f"simulated failure on call {self.calls}")
    return self.embed_fn(inputs)


@pytest.fixture(scope="module")
def embedder():
  return make_embedder()


@pytest.fixture(scope="module")
def embed_fn(embedder):
  return make_embed_fn(embedder, batch_size=8)  # all 8 emulated devices


def _random_inputs(n: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, length + 1, n)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1000, 30000, (n, length)).astype(np.int32) * mask
  types = ((np.arange(length)[None] >= lengths[:, None] // 2) & (mask == 1)).astype(np.int32)
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.mark.parametrize("devices,batch_size,step_tokens", [(8, 8, "auto"), (1, 5, "auto"), (8, 16, 20), (1, 6, 64)])
def test_embed_fn_matches_direct_call(embedder, devices, batch_size, step_tokens):
  """Also with micro-batches inside a batch (step_tokens: 20 gives 1 row a device and step)."""
  assert jax.device_count() == 8
  mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
  fn = make_embed_fn(embedder, mesh, batch_size=batch_size, step_tokens=step_tokens)
  inputs = _random_inputs(13, 32)  # 13 is not a multiple of the batch: the last batch is padded
  embedder.train()  # the embed fn must still run without dropout, and leave the module as it was
  try:
    got = fn(inputs)
    few = fn({k: v[:3] for k, v in inputs.items()})
  finally:
    embedder.eval()
  assert embedder.bert.embeddings.dropout.deterministic is True
  want = reference(embedder, inputs)
  assert got.dtype == np.float32 and got.shape == (13, CFG.retriever_dim)
  # Jitted batches vs the eager reference over LayerNorm-ed outputs (O(1)): float32 rounding ~1e-6.
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(few, want[:3], atol=1e-5)
  shapes = {p for x in (inputs, {k: v[:3] for k, v in inputs.items()})
            for _, p in length_batches(used_lengths(x["attention_mask"]), fn.batch_size, bucket_lengths(32))}
  assert fn.compilations == len(shapes)  # one per padded length: a fixed number of rows
  fn(inputs)
  assert fn.compilations == len(shapes)
  assert len(fn.mesh.devices.flat) == devices


def test_length_buckets():
  assert bucket_lengths(288) == (16, 32, 64, 128, 192, 256, 288)
  assert bucket_lengths(64) == (16, 32, 64) and bucket_lengths(8) == (8,)
  mask = np.zeros((4, 10), np.int32)
  mask[0, :3] = 1
  mask[1, [0, 1, 6]] = 1  # a hole: the last kept position counts
  mask[3] = 1
  assert used_lengths(mask).tolist() == [3, 7, 10, 10]  # an all-padding row keeps its length
  batches = length_batches(np.array([40, 3, 64, 17, 5]), 2, bucket_lengths(64))
  assert [(r.tolist(), p) for r, p in batches] == [([1, 4], 16), ([3, 0], 64), ([2], 64)]


def test_length_bucketing_matches_padded_batches(embedder):
  """Rows of mixed lengths in shuffled order: the bucketed embed fn cuts padding (several padded
  lengths compiled) and gives the fully padded batches' embeddings, row for row, within 1e-5."""
  inputs = _random_inputs(40, 64, seed=3)
  inputs["attention_mask"][0, 5] = 0  # a hole in a mask
  bucketed = make_embed_fn(embedder, batch_size=8)
  padded = make_embed_fn(embedder, batch_size=8, bucketing=False)
  got, want = bucketed(inputs), padded(inputs)
  assert bucketed.compilations > 1 and padded.compilations == 1
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(got, reference(embedder, inputs), atol=1e-5)
  assert np.abs(want[1:] - want[:-1]).max() > 0.1  # rows differ: a permutation would show


def test_length_bucketing_keeps_index_rows(tmp_path, embedder):
  """embed_corpus with and without bucketing writes the same rows in block-id order."""
  storage = Storage.open(str(tmp_path / "root"))
  with open(tmp_path / "docs.jsonl", "w") as f:  # articles of 1 to 5 sentences: blocks of many lengths
    for i in range(12):
      text = " ".join(f"Sentence {j} of article {i} is about {_WORDS[(i + j) % 11]}." for j in range(1 + 3 * i % 5))
      f.write(json.dumps({"title": f"Article {i}", "text": text}) + "\n")
  build_corpus([str(tmp_path / "docs.jsonl")], storage, "corpus", block_len=BLOCK_LEN, shard_blocks=5)
  corpus = CorpusReader(storage, "corpus")
  feats = blocks_doc_inputs(list(corpus.iter_blocks()), BLOCK_LEN, corpus.tokenizer())
  assert len(set(used_lengths(feats["attention_mask"]).tolist())) > 2  # blocks of several lengths
  sets = [embed_corpus(corpus, make_embed_fn(embedder, batch_size=8, bucketing=b), storage, f"b{b}",
                       block_len=BLOCK_LEN, progress=False).load(storage) for b in (True, False)]
  np.testing.assert_allclose(sets[0], sets[1], atol=1e-5)
  np.testing.assert_allclose(sets[0], reference(embedder, feats), atol=1e-5)


def test_embed_fn_sees_updated_weights(embedder):
  model = make_embedder(seed=1)
  fn = make_embed_fn(model, batch_size=8)
  inputs = _random_inputs(4, 16, seed=1)
  before = fn(inputs)
  kernel = model.projection.kernel  # the trainer's weights moved
  kernel[...] = kernel[...] + jax.random.normal(jax.random.key(0), kernel[...].shape)
  after = fn(inputs)
  np.testing.assert_allclose(after, reference(model, inputs), atol=1e-5)
  assert not np.allclose(before, after)


def test_embed_fn_empty_and_bad_inputs(embed_fn):
  inputs = _random_inputs(4, 16)
  empty = embed_fn({k: v[:0] for k, v in inputs.items()})
  assert empty.shape == (0, CFG.retriever_dim) and empty.dtype == np.float32
  with pytest.raises(EmbedError, match="token_type_ids"):
    embed_fn({k: v for k, v in inputs.items() if k != "token_type_ids"})
  with pytest.raises(EmbedError, match="shapes"):
    embed_fn({**inputs, "attention_mask": inputs["attention_mask"][:, :8]})


def test_embed_corpus_resumes_after_crash(tmp_path, embedder, embed_fn):
  storage = Storage.open(str(tmp_path / "root"))
  corpus = make_corpus(storage, tmp_path)
  assert corpus.num_shards == 4 and corpus.num_blocks > 3 * 5

  crashing = CrashAfter(embed_fn, crash_on=3)
  with pytest.raises(RuntimeError, match="simulated failure"):
    embed_corpus(corpus, crashing, storage, "work/a", progress=False)
  assert storage.exists(f"work/a/{shard_name(0)}") and storage.exists(f"work/a/{shard_name(1)}")
  assert not storage.exists(f"work/a/{shard_name(2)}")

  resumed = CrashAfter(embed_fn)
  result = embed_corpus(corpus, resumed, storage, "work/a", progress=False)
  assert resumed.calls == 2  # only shards 2 and 3
  assert result.embedded_shards == 2 and result.embedded_blocks == sum(result.rows[2:])

  whole = CrashAfter(embed_fn)
  uninterrupted = embed_corpus(corpus, whole, storage, "work/b", progress=False)
  assert whole.calls == 4
  got = result.load(storage)
  np.testing.assert_array_equal(got, uninterrupted.load(storage))
  # Row i is block i: compare with the model on every block's inputs at once.
  blocks = list(corpus.iter_blocks())
  assert [b.block_id for b in blocks] == list(range(corpus.num_blocks))
  want = reference(embedder, blocks_doc_inputs(blocks, BLOCK_LEN, corpus.tokenizer()))
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert result.paths == [f"work/a/{shard_name(i)}" for i in range(4)]
  assert (result.num_blocks, result.dim, result.dtype) == (corpus.num_blocks, CFG.retriever_dim, "float32")

  again = CrashAfter(embed_fn)  # everything done: nothing to embed
  assert embed_corpus(corpus, again, storage, "work/a", progress=False).embedded_shards == 0
  assert again.calls == 0


def test_embed_corpus_refuses_foreign_files(tmp_path, embed_fn):
  storage = Storage.open(str(tmp_path / "root"))
  corpus = make_corpus(storage, tmp_path, num_docs=4, shard_blocks=4)
  embed_corpus(corpus, embed_fn, storage, "work", identity={"step": 1}, progress=False)
  with pytest.raises(EmbedError, match=r"embed\.json.*another job.*identity"):
    embed_corpus(corpus, embed_fn, storage, "work", identity={"step": 2}, progress=False)
  # A shard of the wrong shape under the expected name is named, not silently trusted.
  storage.delete("work")
  embed_corpus(corpus, embed_fn, storage, "other", progress=False)
  storage.write_array(f"work/{shard_name(1)}", np.zeros((2, 128), np.float32))
  with pytest.raises(EmbedError, match=shard_name(1)):
    embed_corpus(corpus, embed_fn, storage, "work", progress=False)


def test_embed_corpus_bfloat16(tmp_path, embed_fn):
  storage = Storage.open(str(tmp_path / "root"))
  corpus = make_corpus(storage, tmp_path, num_docs=3, shard_blocks=4)
  f32 = embed_corpus(corpus, embed_fn, storage, "f32", progress=False)
  bf16 = embed_corpus(corpus, embed_fn, storage, "bf16", dtype="bfloat16", progress=False)
  raw = storage.read_array(bf16.paths[0], dtype=ml_dtypes.bfloat16)
  assert raw.dtype == ml_dtypes.bfloat16 and raw.shape == (bf16.rows[0], 128)
  assert storage.stat(bf16.paths[0]).size < 0.6 * storage.stat(f32.paths[0]).size
  # bfloat16 keeps 8 mantissa bits: values of magnitude <= ~4 round by <= 4 * 2^-8 ~ 1.6e-2.
  np.testing.assert_allclose(bf16.load(storage), f32.load(storage), atol=2e-2)


def test_rows_per_step():
  assert rows_per_step(64, 288, 1, 512) == 1 and rows_per_step(64, 144, 1, 512) == 2
  assert rows_per_step(64, 16, 1, 512) == 32 and rows_per_step(64, 16, 8, 512) == 64
  assert rows_per_step(16, 32, 8, 20) == 8  # one row a device, even over the budget
  assert rows_per_step(64, 288, 1, None) == 64 and rows_per_step(12, 8, 8, 16) == 12  # uneven: one step


def test_cpu_micro_batches_hold_a_fixed_number_of_activations():
  """On CPU a step holds about 512 x 384 activation elements: 512 tokens of a 384-wide tower,
  1,536 of the 128-wide tiny one; the width is read from the embedder's token embeddings."""
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
  tiny = make_embed_fn(make_embedder(), mesh)
  minilm = make_embed_fn(RetrieverEmbedder(get_preset("minilm"), rngs=nnx.Rngs(0)), mesh)
  assert (tiny.step_tokens, minilm.step_tokens) == (1536, 512) == (CPU_STEP_ELEMENTS // 128, CPU_STEP_ELEMENTS // 384)
  assert make_embed_fn(make_embedder(), mesh, step_tokens=None).step_tokens is None
