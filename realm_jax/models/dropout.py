"""Dropout whose mask costs half the random bits of `nnx.Dropout`'s.

`nnx.Dropout` draws one float32 uniform (32 random bits) per element. Most of a BERT's masks are
the attention probabilities' (`[batch, heads, L, L]`), and on XLA:CPU generating their bits with
threefry takes longer than the layer's matmuls: the MiniLM REALM step spends about a third of its
time there (`benchmarks/train_step.py`). This layer cuts each 32-bit word into two 16-bit
uniforms and keeps an element when its uniform is at least round(rate x 65536); kept elements
are scaled by 1 / P(keep), so the expectation is exact and the rate differs from the configured
one by at most 2^-17 (rates within 2^-17 of 1 keep one level in 65536). The words are drawn with
the input's leading shape (the last axis halved), and threefry's bits for a shape do not depend
on how it is sharded, so neither does the mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import rnglib

UNIFORM_LEVELS = 1 << 16  # one 32-bit word -> two uniforms in [0, 65536)


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> tuple[jax.Array, float]:
  """A boolean mask of `shape` (True: keep) and the probability of keeping an element."""
  threshold = min(round(rate * UNIFORM_LEVELS), UNIFORM_LEVELS - 1)
  last = shape[-1] if shape else 1
  words = jax.random.bits(key, (*shape[:-1], (last + 1) // 2), jnp.uint32)
  halves = jnp.concatenate([words & 0xFFFF, words >> 16], axis=-1)[..., :last]
  return halves.reshape(shape) >= threshold, 1.0 - threshold / UNIFORM_LEVELS


class Dropout(nnx.Dropout):
  """`nnx.Dropout` (same arguments, same `deterministic` and `rngs` handling) with 16-bit uniforms."""

  def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None) -> jax.Array:
    deterministic = self.deterministic if deterministic is None else deterministic
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    rngs = self.rngs if rngs is None else rngs
    if isinstance(rngs, rnglib.Rngs):
      key = rngs[self.rng_collection]()
    elif isinstance(rngs, rnglib.RngStream):
      key = rngs()
    else:
      key = rngs
    shape = list(inputs.shape)
    for dim in self.broadcast_dims:
      shape[dim] = 1
    mask, keep = keep_mask(key, self.rate, tuple(shape))
    mask = jnp.broadcast_to(mask, inputs.shape)
    return jax.lax.select(mask, inputs / jnp.asarray(keep, inputs.dtype), jnp.zeros_like(inputs))
