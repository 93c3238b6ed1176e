"""The attention core's hand-written backward (`models/attention.py`) against autodiff of the same
forward, with and without dropout and padded keys; and the layer still matches its old form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax.models.attention import attend
from realm_jax.models.dropout import keep_mask


def _reference(q, k, v, bias, mask, inv_keep):
  """The same math written for autodiff, in float32."""
  probs = jax.nn.softmax(jnp.einsum("bnqd,bnkd->bnqk", q, k) + bias, axis=-1)
  if mask is not None:
    probs = jnp.where(mask, probs * inv_keep, 0.0)
  return jnp.einsum("bnqk,bnkd->bnqd", probs, v)


def _inputs(dropout: bool, seed: int = 0):
  b, n, length, d = 2, 3, 10, 8
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(b, n, length, d)), jnp.float32) for _ in range(3))
  valid = np.ones((b, length), bool)
  valid[1, 6:] = False  # padded keys in the second sequence
  bias = jnp.where(jnp.asarray(valid)[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)
  mask, keep = keep_mask(jax.random.key(seed), 0.3, (b, n, length, length)) if dropout else (None, 1.0)
  return q, k, v, bias, mask, jnp.float32(1.0 / keep)


@pytest.mark.parametrize("dropout", [False, True])
def test_the_backward_is_autodiffs(dropout):
  q, k, v, bias, mask, inv_keep = _inputs(dropout)
  g = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)  # a cotangent that is not all ones

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v, bias, mask, inv_keep) * g)

  np.testing.assert_allclose(attend(q, k, v, bias, mask, inv_keep), _reference(q, k, v, bias, mask, inv_keep),
                             rtol=1e-6, atol=1e-6)
  ours = jax.grad(loss(attend), argnums=(0, 1, 2))(q, k, v)
  ref = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
  for name, a, r in zip("qkv", ours, ref):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6, err_msg=f"d{name}")
  # padded keys get no gradient, and dropped probabilities pass none to v
  np.testing.assert_array_equal(np.asarray(ours[1])[1, :, 6:], 0.0)


def test_it_composes_with_jit_and_remat():
  """The custom rule composes with jit and remat (the trainer wraps layers in nnx.remat)."""
  q, k, v, bias, mask, inv_keep = _inputs(True, seed=2)
  f = jax.jit(jax.grad(jax.checkpoint(lambda q: jnp.sum(attend(q, k, v, bias, mask, inv_keep) ** 2))))
  r = jax.grad(lambda q: jnp.sum(_reference(q, k, v, bias, mask, inv_keep) ** 2))(q)
  np.testing.assert_allclose(f(q), r, rtol=1e-5, atol=1e-5)
