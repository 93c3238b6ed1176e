"""The 16-bit dropout (`models/dropout.py`): a Bernoulli mask at the configured rate, unbiased,
its two halves of a word independent, the same mask on one device and sharded over eight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from realm_jax.models.dropout import UNIFORM_LEVELS, Dropout, keep_mask

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


def test_the_two_halves_of_a_word_are_independent():
  rate, rows, cols = 0.5, 1024, 2048  # element j and j + cols/2 of a row come from one 32-bit word
  mask = np.asarray(keep_mask(jax.random.key(3), rate, (rows, cols))[0])
  lo, hi = mask[:, :cols // 2].ravel(), mask[:, cols // 2:].ravel()
  both = float((lo & hi).mean())
  assert abs(both - 0.25) < 5 * np.sqrt(0.25 * 0.75 / lo.size)
  assert abs(np.corrcoef(lo, hi)[0, 1]) < 5 / np.sqrt(lo.size)
  # and neighbouring rows and keys differ
  assert (mask[0] != mask[1]).mean() > 0.4
  other = np.asarray(keep_mask(jax.random.key(4), rate, (rows, cols))[0])
  assert (mask != other).mean() > 0.4


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
