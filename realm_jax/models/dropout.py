"""Dropout whose mask is a hash of each element's coordinates, not threefry bits.

`nnx.Dropout` draws one float32 uniform per element from threefry. Most of a BERT's masks are the
attention probabilities' (`[batch, heads, L, L]`), and on XLA:CPU generating their bits takes
longer than the layer's matmuls: one `[16, 12, 384, 384]` mask applied to its input took 384 ms
with `nnx.Dropout`, 226 ms with threefry's 32-bit words cut into two 16-bit uniforms, and 39 ms
with this layer, of which 31 ms is the select itself (`benchmarks/dropout_mask.py`).

Here each element's 32-bit uniform is a counter-based hash (as Philox and threefry are, with a
cheaper function): threefry draws two seed words from the layer's key, and the element at
(outer, inner) - `inner` its index within the last two axes, `outer` within the leading ones -
gets `mix(mix(inner ^ seed0) ^ mix(outer + seed1))`, with `mix` the `lowbias32` integer hash (two
xorshift-multiply rounds, both bijections of uint32). An element is kept when its uniform is at
least round(rate x 2^32); kept elements are scaled by 1 / P(keep), so the expectation is exact and
the rate differs from the configured one by at most 2^-33. The mask depends only on the key and
the element's coordinates in the global shape, so not on how the input is sharded, and it is
elementwise work that XLA fuses into the select (no random-bit buffer). Dropout needs independent,
unbiased keep decisions, not cryptographic bits: `tests/test_dropout.py` checks the keep rate,
and that neighbours along every axis, and the masks of different keys, are uncorrelated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import rnglib

UNIFORM_LEVELS = 1 << 32  # each element's uniform is one 32-bit word
_MAX_INNER = 1 << 32  # the last two axes are indexed by one uint32


def _mix(x: jax.Array) -> jax.Array:
  """`lowbias32` (C. Wellons' hash prospector): a bijection of uint32 with low avalanche bias."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _index(shape: tuple[int, ...], axes: range) -> jax.Array:
  """The row-major index of each element within `axes` of `shape`, as uint32 (broadcast to `shape`)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for ax in reversed(axes):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, ax) * jnp.uint32(stride % (1 << 32))
    stride *= shape[ax]
  return index


def uniform_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """One uniform uint32 per element of `shape`, a function of `key` and the element's coordinates."""
  shape = tuple(int(d) for d in shape)
  split = max(len(shape) - 2, 0)
  if int(np.prod(shape[split:], dtype=np.int64)) > _MAX_INNER:
    raise ValueError(f"dropout over {shape}: the last two axes hold more than 2^32 elements")
  seed = jax.random.bits(key, (2,), jnp.uint32)
  inner = _index(shape, range(split, len(shape)))
  outer = _index(shape, range(split))
  return _mix(_mix(inner ^ seed[0]) ^ _mix(outer + seed[1]))


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> tuple[jax.Array, float]:
  """A boolean mask of `shape` (True: keep) and the probability of keeping an element."""
  threshold = min(round(rate * UNIFORM_LEVELS), UNIFORM_LEVELS - 1)
  return uniform_bits(key, shape) >= jnp.uint32(threshold), 1.0 - threshold / UNIFORM_LEVELS


class Dropout(nnx.Dropout):
  """`nnx.Dropout` (same arguments, same `deterministic` and `rngs` handling) with hashed uniforms."""

  def mask(self, shape: tuple[int, ...], *, rngs=None) -> tuple[jax.Array, float] | None:
    """(keep mask of `shape`, P(keep)) for a caller that applies it itself, or None when this
    layer would not drop anything (rate 0, or deterministic). At rate 1 nothing is kept (P(keep)
    is returned as 1 so that callers' scaling stays finite)."""
    if self.rate == 0.0 or self.deterministic:
      return None
    if self.rate == 1.0:
      return jnp.zeros(shape, jnp.bool_), 1.0
    rngs = self.rngs if rngs is None else rngs
    if isinstance(rngs, rnglib.Rngs):
      key = rngs[self.rng_collection]()
    elif isinstance(rngs, rnglib.RngStream):
      key = rngs()
    else:
      key = rngs
    return keep_mask(key, self.rate, tuple(shape))

  def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None) -> jax.Array:
    deterministic = self.deterministic if deterministic is None else deterministic
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    shape = list(inputs.shape)
    for dim in self.broadcast_dims:
      shape[dim] = 1
    mask, keep = self.mask(tuple(shape), rngs=rngs)
    mask = jnp.broadcast_to(mask, inputs.shape)
    return jax.lax.select(mask, inputs / jnp.asarray(keep, inputs.dtype), jnp.zeros_like(inputs))
