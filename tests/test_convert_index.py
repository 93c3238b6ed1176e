"""`realm-jax convert index`: block_emb streamed out of a TF bundle (checked against TensorFlow's own
reader), ORQA blocks/titles TFRecords (written by TensorFlow) into our corpus, embeddings published
as an index version our loader reads, row order preserved; memory of the streaming measured in a
child process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from realm_jax.cli.main import main
from realm_jax.convert import index as ix
from realm_jax.data.corpus import CorpusReader
from realm_jax.retrieval import index as index_lib
from realm_jax.storage import Storage
from tests.helpers.ranking import assert_top_k


def _save(prefix, tensors: dict):
  os.makedirs(os.path.dirname(prefix), exist_ok=True)
  names = sorted(tensors)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                    tensors=[tf.constant(tensors[n]) for n in names])
  return prefix


def _tfrecords(path, strings):
  with tf.io.TFRecordWriter(str(path)) as w:
    for s in strings:
      w.write(s.encode("utf-8"))
  return str(path)


def test_bundle_index_and_row_slices_match_tensorflow(tmp_path):
  rng = np.random.default_rng(0)
  emb = rng.standard_normal((1003, 16)).astype(np.float32)
  prefix = _save(str(tmp_path / "ck" / "model.ckpt-5"), {
      "block_emb": emb, "global_step": np.int64(7), "a/b/kernel": rng.standard_normal((3, 5)).astype(np.float32),
      "ids": np.arange(11, dtype=np.int32)})
  _, entries = ix.read_bundle_index((tmp_path / "ck" / "model.ckpt-5.index").read_bytes(), "x")
  want = dict(tf.train.list_variables(prefix))
  assert {k: list(v.shape) for k, v in entries.items()} == want
  assert entries["ids"].dtype == np.int32 and entries["block_emb"].dtype == np.float32
  with ix.RowReader(prefix, "block_emb") as r:
    parts = [r.read(s, min(1003, s + 100)) for s in range(0, 1003, 100)]  # in order: checks the crc too
    np.testing.assert_array_equal(np.concatenate(parts), tf.train.load_variable(prefix, "block_emb"))
    np.testing.assert_array_equal(r.read(500, 503), emb[500:503])
  with pytest.raises(ix.IndexConversionError, match=r"no variable 'nope'"):
    ix.RowReader(prefix, "nope")
  data = tmp_path / "ck" / "model.ckpt-5.data-00000-of-00001"
  raw = bytearray(data.read_bytes())
  off = entries["block_emb"].offset + 4 * 16 * 900
  raw[off] ^= 0xFF
  data.write_bytes(bytes(raw))
  with ix.RowReader(prefix, "block_emb") as r, pytest.raises(ix.IndexConversionError, match="crc32c of block_emb"):
    for s in range(0, 1003, 250):
      r.read(s, min(1003, s + 250))


def test_tfrecord_reader_matches_tensorflow_and_checks_crc(tmp_path):
  texts = ["", "héllo wörld", "x" * 70000, "last"]
  path = _tfrecords(tmp_path / "r.tfr", texts)
  assert [r.decode() for r in ix.read_tfrecords(path)] == texts
  assert [r.numpy().decode() for r in tf.data.TFRecordDataset(path)] == texts
  raw = bytearray((tmp_path / "r.tfr").read_bytes())
  raw[30] ^= 1
  (tmp_path / "bad.tfr").write_bytes(bytes(raw))
  with pytest.raises(ix.IndexConversionError, match="record 1: data checksum mismatch"):
    list(ix.read_tfrecords(str(tmp_path / "bad.tfr")))


def test_convert_index_publishes_corpus_embeddings_and_scann_in_row_order(tmp_path):
  n = 53
  rng = np.random.default_rng(1)
  emb = rng.standard_normal((n, 128)).astype(np.float32)
  prefix = _save(str(tmp_path / "orqa" / "model.ckpt-1"), {"block_emb": emb, "global_step": np.int64(1)})
  bodies = [f"Block number {i} talks about topic {i * 7 % 11}. It has a second sentence." for i in range(n)]
  titles = [f"Title {i}" for i in range(n)]
  blocks = _tfrecords(tmp_path / "blocks.tfr", bodies)
  title_file = _tfrecords(tmp_path / "titles.tfr", titles)
  root = str(tmp_path / "root")
  assert main(["convert", "index", "--checkpoint", prefix, "--blocks", blocks, "--titles", title_file,
               "--storage", root, "--rows-per-shard", "20", "--step", "7"]) == 0
  storage = Storage.open(root)
  corpus = CorpusReader(storage)
  assert corpus.num_blocks == n and corpus.num_shards == 3
  got = [(b.block_id, b.title, b.text) for b in corpus.iter_blocks()]
  assert got == [(i, titles[i], bodies[i]) for i in range(n)]
  tok = corpus.tokenizer()
  assert list(corpus.get_blocks([17])[0].body_ids) == list(tok.encode(bodies[17]).ids)
  loaded = index_lib.load_index(storage, corpus=corpus)
  np.testing.assert_array_equal(loaded.embeddings, emb)
  assert [r for _, r in loaded.info.shards] == [20, 20, 13] and loaded.info.has_scann and loaded.info.step == 7
  searcher = loaded.load_searcher()
  queries = rng.standard_normal((4, 128)).astype(np.float32)
  res = searcher.search(queries, 3)
  # 128-d Gaussian queries and rows (a brute-force searcher at this size): sum |q_i x_i| ~ 80, so
  # float32 rounding is <= 128 * 2^-24 * 80 ~ 6e-4 whatever the summation order.
  assert_top_k(res.ids, queries, emb, 3, atol=2e-3, scores=res.scores)


def test_convert_index_refuses_mismatched_counts(tmp_path):
  prefix = _save(str(tmp_path / "c" / "ckpt"), {"block_emb": np.zeros((5, 8), np.float32)})
  blocks = _tfrecords(tmp_path / "b.tfr", ["a", "b", "c", "d"])
  titles = _tfrecords(tmp_path / "t.tfr", ["a", "b", "c", "d", "e"])
  with pytest.raises(ix.IndexConversionError, match="more records than"):
    ix.convert_index(prefix, str(tmp_path / "r1"), blocks=blocks, titles=titles, log=lambda s: None)
  with pytest.raises(ix.IndexConversionError, match="4 blocks, but block_emb has 5 rows"):
    ix.convert_index(prefix, str(tmp_path / "r2"), blocks=blocks, build_scann=False, log=lambda s: None)
  assert not Storage.open(str(tmp_path / "r2")).exists("corpus/manifest.json")


_CHILD = """
import resource, sys, numpy as np
from realm_jax.cli.main import main
from realm_jax.convert import index as ix
if sys.argv[1] == "convert":
  ix.convert_index(sys.argv[2], sys.argv[3], rows_per_shard=int(sys.argv[4]), log=lambda s: None)
else:
  from realm_jax.retrieval import embed, index  # the same imports, nothing read
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_streaming_memory_stays_far_below_two_copies(tmp_path):
  """A 400k x 128 block_emb (205 MB): the child's peak RSS grows by well under one array size."""
  n, d = 400_000, 128
  prefix = _save(str(tmp_path / "big" / "ckpt"), {"block_emb": np.ones((n, d), np.float32)})
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
  def run(*a):
    return int(subprocess.run([sys.executable, "-c", _CHILD, *a], capture_output=True, text=True,
                                        env=env, check=True).stdout.split()[-1])
  base = run("baseline")
  peak = run("convert", prefix, str(tmp_path / "root"), "150000")
  size = n * d * 4
  assert peak - base < 0.5 * size, (peak, base, size)
  shards = Storage.open(str(tmp_path / "root")).list("imported-embeddings")
  assert len([s for s in shards if s.endswith(".npy")]) == 3
  assert json.loads(Storage.open(str(tmp_path / "root")).read_bytes("imported-embeddings/embed.json"))["shards"] == \
      [150000, 150000, 100000]
