"""The hashed dropout (`models/dropout.py`): a Bernoulli mask at the configured rate, unbiased,
neighbouring elements along every axis and the masks of different keys uncorrelated, the same mask
on one device and sharded over eight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from realm_jax.models.dropout import UNIFORM_LEVELS, Dropout, keep_mask, uniform_bits

N = 1 << 21  # ~2.1M elements: the keep fraction's standard deviation is ~2e-4 at rate 0.1


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.03])
def test_keep_fraction_and_scale_are_the_rates(rate):
  mask, keep = keep_mask(jax.random.key(0), rate, (512, N // 512))
  assert abs((1 - keep) - rate) <= 1 / (2 * UNIFORM_LEVELS)
  frac = float(np.asarray(mask).mean())
  assert abs(frac - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / N)
  out = Dropout(rate, rngs=nnx.Rngs(dropout=1))(jnp.ones((512, N // 512)))
  values = np.unique(np.asarray(out))
  np.testing.assert_allclose(values, [0.0, 1 / keep], rtol=1e-6)  # kept elements scaled by 1 / P(keep)
  assert abs(float(np.asarray(out).mean()) - 1.0) < 5 * np.sqrt(rate / (1 - rate) / N)


def _uncorrelated(a: np.ndarray, b: np.ndarray, rate: float) -> None:
  """Two keep masks of equal size: both-kept as often as independence says, correlation ~0."""
  a, b = a.ravel(), b.ravel()
  p = (1 - rate) ** 2
  assert abs(float((a & b).mean()) - p) < 5 * np.sqrt(p * (1 - p) / a.size)
  assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)


@pytest.mark.parametrize("rate", [0.5, 0.1])
def test_neighbours_along_every_axis_and_other_keys_are_uncorrelated(rate):
  """The hash's input is (index in the last two axes, index in the leading ones): neighbours in
  each of the four axes of an attention-shaped mask, and a second key's mask, are independent."""
  shape = (8, 12, 96, 96)  # leading: batch x heads (the outer index); inner: the 96 x 96 scores
  key = jax.random.key(3)
  mask = np.asarray(keep_mask(key, rate, shape)[0])
  for axis in range(len(shape)):
    lo = np.take(mask, range(shape[axis] - 1), axis=axis)
    hi = np.take(mask, range(1, shape[axis]), axis=axis)
    _uncorrelated(lo, hi, rate)
  for other_key in (jax.random.key(4), jax.random.split(key)[0], jax.random.fold_in(key, 1)):
    _uncorrelated(mask, np.asarray(keep_mask(other_key, rate, shape)[0]), rate)
  # a mask is not a shifted copy of itself along the flat order either (lags of one row, one head)
  flat = mask.ravel()
  for lag in (1, 96, 96 * 96):
    _uncorrelated(flat[:-lag], flat[lag:], rate)


def test_uniform_bits_are_uniform():
  """Chi-square of the top 8 bits over 2^20 elements (255 degrees of freedom: mean 255, sd 22.6)."""
  bits = np.asarray(uniform_bits(jax.random.key(11), (1024, 1024)))
  counts = np.bincount((bits >> 24).ravel(), minlength=256)
  expected = bits.size / 256
  chi2 = float(((counts - expected) ** 2 / expected).sum())
  assert chi2 < 255 + 6 * 22.6, chi2
  low = np.bincount((bits & 0xFF).ravel(), minlength=256)  # and the low 8 bits
  assert float(((low - expected) ** 2 / expected).sum()) < 255 + 6 * 22.6


def test_more_than_two_to_the_32_elements_in_the_last_two_axes_is_refused():
  with pytest.raises(ValueError, match="2\\^32"):
    uniform_bits(jax.random.key(0), (1 << 17, 1 << 16))


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 1)])
def test_odd_and_small_shapes(shape):
  mask, _ = keep_mask(jax.random.key(0), 0.5, shape)
  assert mask.shape == shape and mask.dtype == jnp.bool_


def test_broadcast_dims_and_deterministic():
  layer = Dropout(0.5, broadcast_dims=(0,), rngs=nnx.Rngs(dropout=0))
  out = np.asarray(layer(jnp.ones((4, 64))))
  assert (out == out[0]).all()  # one mask for every row
  layer.eval()
  np.testing.assert_array_equal(np.asarray(layer(jnp.ones((4, 64)))), np.ones((4, 64)))


def test_the_mask_does_not_depend_on_the_mesh():
  assert jax.device_count() == 8
  x = jnp.ones((16, 12, 48, 48))
  key = jax.random.key(7)
  one = np.asarray(jax.jit(lambda k, x: Dropout(0.1)(x, rngs=k))(key, x))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))  # as parallel.make_mesh
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  eight = jax.jit(lambda k, x: Dropout(0.1)(x, rngs=k))(key, xs)
  assert eight.sharding.is_equivalent_to(xs.sharding, x.ndim)  # the output keeps the sharding
  np.testing.assert_array_equal(np.asarray(eight), one)


def test_rate_one_keeps_nothing_in_the_layer_and_its_mask():
  x = jnp.ones((4, 8, 8))
  layer = Dropout(1.0, rngs=nnx.Rngs(dropout=0))
  np.testing.assert_array_equal(np.asarray(layer(x)), 0.0)
  mask, keep = layer.mask(x.shape)
  assert not np.asarray(mask).any() and keep == 1.0
