"""`model.bert.remat` and bfloat16 compute against the plain float32 REALM step.

The oracle for remat is the same step without it: rematerialisation recomputes the forward pass
in the backward one, so the loss and the gradients (dropout on, the same random streams) must be
the float32 ones up to summation order. bfloat16 compute (float32 parameters) is held to a stated
tolerance.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.train_step import make_inputs  # noqa: E402
from realm_jax.config import get_preset  # noqa: E402
from realm_jax.errors import ConfigError  # noqa: E402
from realm_jax.models import RealmModel  # noqa: E402
from realm_jax.retrieval import mips  # noqa: E402
from realm_jax.train import device_corpus, realm_step  # noqa: E402

# bfloat16 keeps 8 mantissa bits: a loss of ~10 over a few hundred positions moves by ~1e-2.
BF16_RTOL = 2e-2


def _loss_and_grads(remat: str, dtype: str = "float32"):
  cfg = get_preset("tiny", query_len=16, block_len=32, num_candidates=4,
                   **{"bert.remat": remat, "bert.dtype": dtype})
  rng = np.random.default_rng(0)
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,))
  doc, body, batch, sp = make_inputs(cfg, 2, 64, rng)
  corpus = device_corpus.place_host_rows(doc.astype(np.uint16), mesh, sp)
  index = mips.shard_rows(rng.normal(size=(64, cfg.retriever_dim)).astype(np.float32), mesh)
  model = RealmModel(cfg, rngs=nnx.Rngs(0))
  model.train()  # dropout on: remat must replay the same random streams
  batch = {k: jnp.asarray(v) for k, v in batch.items()}

  @nnx.jit
  def step(m):
    return nnx.value_and_grad(lambda m: realm_step.realm_loss(m, batch, corpus, index), has_aux=True)(m)

  (loss, _), grads = step(model)
  return float(loss), grads


@pytest.fixture(scope="module")
def plain():
  return _loss_and_grads("none")


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_loss_and_gradients(plain, remat):
  loss, grads = _loss_and_grads(remat)
  assert np.isfinite(plain[0]) and plain[0] > 1
  np.testing.assert_allclose(loss, plain[0], rtol=1e-5)
  diff = optax.tree.norm(jax.tree.map(lambda a, b: a - b, grads, plain[1]))
  assert float(diff) <= 1e-5 * float(optax.tree.norm(plain[1]))


def test_bfloat16_compute_is_near_float32(plain):
  loss, grads = _loss_and_grads("full", "bfloat16")
  np.testing.assert_allclose(loss, plain[0], rtol=BF16_RTOL)
  cos = optax.tree.sum(jax.tree.map(lambda a, b: jnp.sum(a * b), grads, plain[1])) / (
      optax.tree.norm(grads) * optax.tree.norm(plain[1]))
  assert float(cos) > 0.99  # the same descent direction


def test_bad_remat_is_a_config_error():
  with pytest.raises(ConfigError, match="remat"):
    get_preset("tiny", **{"bert.remat": "some"})


def test_remat_keeps_fewer_residuals():
  """Autodiff's saved residuals (what the backward pass reads) of a tiny encoder: per-layer remat
  keeps the layers' inputs, not their attention maps and FFN activations."""
  from jax._src.ad_checkpoint import saved_residuals

  from realm_jax.models.bert import BertEncoder

  ids = jnp.ones((8, 128), jnp.int32)
  kept = {}
  for remat in ("none", "full", "dots"):
    cfg = get_preset("tiny", **{"bert.remat": remat, "bert.dropout_rate": 0.0})
    graphdef, state = nnx.split(BertEncoder(cfg.bert, pooler=False, rngs=nnx.Rngs(0)))
    res = saved_residuals(lambda s, g=graphdef: nnx.merge(g, s)(ids, ids, ids * 0)[0].sum(), state)
    kept[remat] = sum(int(np.prod(r[0].shape)) * r[0].dtype.itemsize for r in res)
  assert kept["full"] * 5 < kept["none"] and kept["full"] <= kept["dots"] < kept["none"], kept
