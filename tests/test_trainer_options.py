"""Trainer options on the real loop: FSDP parameter sharding, host ScaNN retrieval, MiniLM init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from realm_jax.config import get_preset
from realm_jax.convert import hf as hfconv
from realm_jax.data import sources
from realm_jax.retrieval import index as index_lib, mips
from realm_jax.storage import Storage
from realm_jax.train import inputs
from realm_jax.train.config import load_config
from realm_jax.train.trainer import Trainer
from tests.helpers.ranking import assert_top_k
from tests.test_trainer import OVERRIDES, _fresh_root

QUIET = lambda m: None  # noqa: E731


def _losses(result) -> list[float]:
  assert [h["step"] for h in result.history] == list(range(1, len(result.history) + 1))
  return [h["loss"] for h in result.history]


# ------------------------------------------------------------------------------------------------
# FSDP
# ------------------------------------------------------------------------------------------------

def test_fsdp_shards_params_and_matches_replicated_losses(corpus_root, tmp_path):
  assert jax.device_count() == 8
  fsdp = load_config("smoke", OVERRIDES).replace(param_sharding=((".*", "fsdp"),))
  replicated = load_config("smoke", OVERRIDES)

  trainer = Trainer(fsdp, _fresh_root(corpus_root, tmp_path, "fsdp"), log_fn=QUIET, stop_after=3)
  bert = trainer.model.encoder.bert
  leaves = {"word_embeddings [30522, 128]": bert.embeddings.word_embeddings.embedding,
            "layer 0 intermediate [128, 512]": bert.layers[0].intermediate.kernel,
            "layer 1 query [128, 128]": bert.layers[1].attention.query.kernel}

  def check_sharded(where):
    for name, var in leaves.items():
      arr = var[...]
      assert not arr.sharding.is_fully_replicated, f"{where}: {name} is replicated"
      shard = arr.sharding.shard_shape(arr.shape)
      assert np.prod(shard) * 8 == np.prod(arr.shape), f"{where}: {name} shard {shard} of {arr.shape}"
    # The optimizer's moments follow their parameter's rule (every matrix here has a dim of 128).
    moments = [x for x in jax.tree.leaves(nnx.state(trainer.optimizer)) if getattr(x, "ndim", 0) == 2]
    assert moments and not any(x.sharding.is_fully_replicated for x in moments), where

  check_sharded("after setup")
  sharded = trainer.run()
  check_sharded("after 3 steps")

  plain = Trainer(replicated, _fresh_root(corpus_root, tmp_path, "replicated"), log_fn=QUIET, stop_after=3)
  assert plain.model.encoder.bert.layers[0].intermediate.kernel[...].sharding.is_fully_replicated
  ref = plain.run()
  # As 1 vs 8 devices (test_trainer): FSDP changes the reduction order, not the arithmetic.
  np.testing.assert_allclose(_losses(sharded), _losses(ref), rtol=2e-4)
  np.testing.assert_allclose([h["grad_norm"] for h in sharded.history], [h["grad_norm"] for h in ref.history],
                             rtol=2e-3)
  # The trained weights agree too (FSDP changes the layout, not the arithmetic). AdamW divides
  # each update by sqrt(v): where an element's gradient is near zero, reduction-order noise in it
  # moves that element's update far more than the gradient's own rounding. Over seeds 0-2 (and two
  # dropout implementations) the largest difference was 1.07e-6, in one element of 65,536, the
  # others' 1.4e-7 - 6.8e-7; a layout bug moves many elements by a learning-rate-sized step.
  sharded_kernel = trainer.model.encoder.bert.layers[0].intermediate.kernel[...]
  plain_kernel = plain.model.encoder.bert.layers[0].intermediate.kernel[...]
  np.testing.assert_allclose(np.asarray(sharded_kernel), np.asarray(plain_kernel), rtol=1e-4, atol=2e-6)


# ------------------------------------------------------------------------------------------------
# ScaNN retrieval on the host
# ------------------------------------------------------------------------------------------------

def test_scann_retrieval_matches_device_retrieval(corpus_root, tmp_path):
  # Dropout off: the device step retrieves with its (train-mode) query embedding, ScaNN with the
  # eval-mode one; without dropout the two are the same function of the weights.
  common = OVERRIDES + ["model.bert.dropout_rate=0.0"]
  scann_cfg = load_config("smoke", common + ["retrieval=scann"])
  device_cfg = load_config("smoke", common + ["retrieval=device"])
  k = scann_cfg.model.num_candidates - 1

  root = _fresh_root(corpus_root, tmp_path, "scann")
  trainer = Trainer(scann_cfg, root, log_fn=QUIET, stop_after=3)
  trainer._setup_index()  # what run() does first: bootstrap the index (with a ScaNN searcher)
  assert trainer.active.searcher is not None and trainer.active.on_mesh is None  # no index rows on the mesh
  emb = index_lib.load_index(Storage.open(root)).embeddings
  assert emb.shape[0] == 16 and trainer.active.searcher.info.kind == "brute_force"
  # The candidates ScaNN feeds the step are the exact top-k (own block excluded) of numpy.
  batch = inputs.global_batch(next(iter(trainer.loader)), trainer.batch_sharding, trainer.same_corpus)
  trainer._scann_candidates(batch)
  q = np.asarray(trainer._embed_queries(nnx.state(trainer.model), batch["input_ids"], batch["attention_mask"],
                                        batch["token_type_ids"]))
  own = np.asarray(batch["block_id"])
  got = np.asarray(batch["candidate_ids"])
  assert got.shape == (8, k)
  # LayerNorm-ed 128-d embeddings (scores up to ~128): float32 rounding <= 128 * 2^-24 * 128 ~ 1e-3.
  assert_top_k(got, q, emb, k, atol=1e-3, exclude=own[:, None])
  # ... and the device step's own retrieval picks the same blocks for the same queries.
  from realm_jax.train.realm_step import retrieve_candidates
  on_mesh = mips.shard_rows(emb, trainer.mesh)
  dev = np.asarray(retrieve_candidates(jnp.asarray(q), on_mesh, batch["block_id"], k + 1, False))
  assert_top_k(dev, q, emb, k, atol=1e-3, exclude=own[:, None])
  trainer.loader.close()
  trainer.ckpt.close()

  # End to end: a few steps with ScaNN candidates give the losses of device retrieval.
  scann = Trainer(scann_cfg, _fresh_root(corpus_root, tmp_path, "scann-run"), log_fn=QUIET, stop_after=3).run()
  device = Trainer(device_cfg, _fresh_root(corpus_root, tmp_path, "device-run"), log_fn=QUIET, stop_after=3).run()
  assert all(np.isfinite(_losses(scann)))
  # The same candidates (checked above up to near-ties) read by the same step: reduction order only.
  np.testing.assert_allclose(_losses(scann), _losses(device), rtol=2e-4)
  np.testing.assert_allclose([h["retrieval_utility"] for h in scann.history],
                             [h["retrieval_utility"] for h in device.history], rtol=2e-3, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# MiniLM initialisation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [6, 2])
def test_minilm_init_loads_the_packaged_bert(corpus_root, tmp_path, layers):
  model = get_preset("minilm", query_len=32, block_len=64, num_candidates=4, **{"bert.num_layers": layers})
  cfg = load_config("smoke", OVERRIDES).replace(model=model, init="minilm")
  lines = []
  trainer = Trainer(cfg, _fresh_root(corpus_root, tmp_path, f"minilm{layers}"), log_fn=lines.append)
  try:
    assert any("MiniLM" in line for line in lines), lines
    sd = hfconv.read_state_dict(sources.minilm_dir())
    for bert in (trainer.model.retriever.query_embedder.bert, trainer.model.encoder.bert):
      assert len(bert.layers) == layers
      got = lambda var: np.asarray(var[...])  # noqa: E731
      np.testing.assert_array_equal(got(bert.embeddings.word_embeddings.embedding),
                                    sd["embeddings.word_embeddings.weight"])
      np.testing.assert_array_equal(got(bert.embeddings.layer_norm.scale), sd["embeddings.LayerNorm.weight"])
      for i in (0, layers - 1):
        np.testing.assert_array_equal(got(bert.layers[i].attention.query.kernel),
                                      sd[f"encoder.layer.{i}.attention.self.query.weight"].T)
        np.testing.assert_array_equal(got(bert.layers[i].attention.query.bias),
                                      sd[f"encoder.layer.{i}.attention.self.query.bias"])
        np.testing.assert_array_equal(got(bert.layers[i].output.kernel), sd[f"encoder.layer.{i}.output.dense.weight"].T)
    np.testing.assert_array_equal(got(trainer.model.retriever.query_embedder.bert.pooler.kernel),
                                  sd["pooler.dense.weight"].T)
  finally:
    trainer.loader.close()
    trainer.ckpt.close()


def test_a_corpus_with_more_ids_than_the_model_is_refused_naming_it(corpus_root, tmp_path):
  from realm_jax.data.corpus import CorpusError

  root = _fresh_root(corpus_root, tmp_path, "small-vocab")
  cfg = load_config("smoke", OVERRIDES + ["model.bert.vocab_size=1000"])
  with pytest.raises(CorpusError, match=r"corpus/manifest\.json: the corpus tokenizer has \d+ ids but the model's "
                     r"vocab_size is 1000$"):
    Trainer(cfg, root, log_fn=QUIET)
  assert not Storage.open(root).exists("checkpoints")  # refused before anything was written
