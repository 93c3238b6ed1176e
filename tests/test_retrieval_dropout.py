"""Dropout on the 128-d retrieval embedding, as the original ICT module (`ict_model.module_fn`:
dense -> LayerNorm -> `tf.nn.dropout(rate=0.1)` when training): the embedding is dropped in
training (ICT, REALM, Open-QA), untouched in eval mode and by the index's embedder, and adding
the layer leaves the parameter initialisation and the random streams as they were."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from realm_jax.config import get_preset
from realm_jax.errors import ConfigError
from realm_jax.models.bert import BertEncoder, _dense, _norm
from realm_jax.models.encoder import KnowledgeAugEncoder
from realm_jax.models.realm import RealmModel
from realm_jax.retrieval.embed import make_embed_fn

RATE = 0.1


def _cfg(rate=RATE):
  # BERT's own dropout off, so that in training the retrieval dropout is the only random op.
  return get_preset("tiny", retrieval_dropout=rate, **{"bert.vocab_size": 200, "bert.dropout_rate": 0.0})


def _inputs(n=64, length=16, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, 200, size=(n, length)).astype(np.int32)
  ids[:, 0] = 2
  return jnp.asarray(ids), jnp.ones_like(ids), jnp.zeros_like(ids)


def _params(module):
  return jax.tree.leaves(nnx.state(module, nnx.Param))


def test_default_rate_is_the_originals_and_bad_rates_are_refused():
  assert get_preset("base").retrieval_dropout == 0.1
  with pytest.raises(ConfigError, match="retrieval_dropout"):
    get_preset("tiny", retrieval_dropout=1.0)


def test_the_layer_consumes_no_key_at_construction():
  """The model's parameters are those drawn, in order, by the modules without the layer: the
  retriever's BERT, projection and LayerNorm, then the encoder, from the same seed."""
  cfg = _cfg()
  model = RealmModel(cfg, rngs=nnx.Rngs(0))
  rngs = nnx.Rngs(0)
  bert = BertEncoder(cfg.bert, pooler=True, rngs=rngs)
  projection = _dense(cfg.bert, cfg.bert.hidden_size, cfg.retriever_dim, rngs)
  norm = _norm(cfg.bert, cfg.retriever_dim, rngs)
  encoder = KnowledgeAugEncoder(cfg, rngs=rngs)
  emb = model.retriever.query_embedder
  for ours, plain in ((emb.bert, bert), (emb.projection, projection), (emb.projection_norm, norm),
                      (model.encoder, encoder)):
    for a, b in zip(_params(ours), _params(plain), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ... and its random streams too (the layer holds none of its own).
  ours = jax.tree.leaves(nnx.state(model, nnx.RngState))
  zero = jax.tree.leaves(nnx.state(RealmModel(_cfg(0.0), rngs=nnx.Rngs(0)), nnx.RngState))
  assert len(ours) == len(zero)
  for a, b in zip(ours, zero):
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
                                             else a),
                                  np.asarray(jax.random.key_data(b) if jnp.issubdtype(b.dtype, jax.dtypes.prng_key)
                                             else b))


def test_training_drops_the_embedding_at_its_rate_and_eval_does_not():
  model = RealmModel(_cfg(), rngs=nnx.Rngs(0))
  x = _inputs()
  model.eval()
  clean = np.asarray(model.retriever.embed_queries(*x))
  model.train()
  dropped = np.asarray(model.retriever.embed_queries(*x))
  again = np.asarray(model.retriever.embed_queries(*x))
  zero = dropped == 0
  # Every kept value is the eval value scaled by 1 / (1 - rate) (inverted dropout).
  np.testing.assert_allclose(dropped[~zero], clean[~zero] / (1 - RATE), rtol=1e-5, atol=1e-6)
  # 64 x 128 values: the dropped share is within 4 standard deviations (0.0033) of the rate.
  assert abs(zero.mean() - RATE) < 0.014, zero.mean()
  assert not np.array_equal(zero, again == 0)  # a fresh mask per call
  # The search view of the same pass is the embedding before the dropout.
  before, after = model.retriever.embed_queries_both(*x)
  np.testing.assert_allclose(np.asarray(before), clean, rtol=1e-5, atol=1e-6)
  assert (np.asarray(after) == 0).mean() > 0.05
  # Eval mode is the embedding of a model without retrieval dropout.
  model.eval()
  plain = RealmModel(_cfg(0.0), rngs=nnx.Rngs(0))
  plain.train()  # rate 0 (and no BERT dropout): training changes nothing either
  np.testing.assert_array_equal(np.asarray(model.retriever.embed_queries(*x)),
                                np.asarray(plain.retriever.embed_queries(*x)))
  np.testing.assert_array_equal(np.asarray(model.retriever.embed_docs(*x)), clean)


def test_the_index_embedder_is_eval_mode_while_the_model_trains():
  """What the refresher and the index writer call (`make_embed_fn` over the document tower)
  gives the eval-mode embedding even though the model it reads is in training mode."""
  model = RealmModel(_cfg(), rngs=nnx.Rngs(0))
  x = _inputs(n=32)
  model.eval()
  clean = np.asarray(model.retriever.embed_docs(*x))
  model.train()
  fn = make_embed_fn(model.retriever.doc_embedder, batch_size=32)
  got = fn({"input_ids": np.asarray(x[0]), "attention_mask": np.asarray(x[1]), "token_type_ids": np.asarray(x[2])})
  np.testing.assert_allclose(got, clean, rtol=1e-5, atol=1e-5)
  assert (got == 0).mean() < 0.01  # nothing dropped
