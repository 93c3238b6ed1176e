"""Dropout on an attention-probability tensor: our hashed mask vs `nnx.Dropout` vs PyTorch.

One command: `python benchmarks/dropout_mask.py [--shape 16 12 384 384] [--rate 0.1] [--iters 7]`.
Each side applies dropout to a float32 tensor of `--shape` (by default the MiniLM REALM step's
attention probabilities: 2 queries x 8 candidates, 12 heads, 384 x 384), jitted for JAX; the
peers are `nnx.Dropout` (threefry, one float32 uniform per element), the same threefry bits cut
into two 16-bit uniforms per 32-bit word (this project's earlier mask), a select with a
precomputed mask (the floor: reading and writing the tensor) and `torch.nn.functional.dropout`
(PyTorch's CPU Bernoulli). Prints the median milliseconds, the fraction kept, the ratio of each
peer to ours, and the 1-minute load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from realm_jax.models.dropout import Dropout


def _threefry16_mask(key, rate, shape):
  threshold = min(round(rate * 65536), 65535)
  last = shape[-1]
  words = jax.random.bits(key, (*shape[:-1], (last + 1) // 2), jnp.uint32)
  halves = jnp.concatenate([words & 0xFFFF, words >> 16], axis=-1)[..., :last]
  return halves >= threshold, 1.0 - threshold / 65536


def _median_ms(fn, iters: int) -> tuple[float, float]:
  out = fn(0)
  ts = []
  for i in range(iters):
    t0 = time.perf_counter()
    out = fn(i + 1)
    ts.append(time.perf_counter() - t0)
  kept = float(np.mean(np.asarray(out) != 0))
  return statistics.median(ts) * 1e3, kept


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", type=int, nargs="+", default=[16, 12, 384, 384])
  p.add_argument("--rate", type=float, default=0.1)
  p.add_argument("--iters", type=int, default=7)
  args = p.parse_args()
  shape, rate = tuple(args.shape), args.rate
  print(f"load before: {os.getloadavg()[0]:.2f}; shape {shape}, rate {rate}; {jax.devices()[0].platform}")
  x = jnp.ones(shape, jnp.float32)

  def jitted(layer_fn):
    f = jax.jit(layer_fn)
    return lambda i: jax.block_until_ready(f(x, jax.random.key(i)))

  ours = Dropout(rate)
  flax_layer = nnx.Dropout(rate)
  mask0 = np.asarray(jax.random.bernoulli(jax.random.key(0), 1 - rate, shape))
  select = jax.jit(lambda x, m: jax.lax.select(m, x / (1 - rate), jnp.zeros_like(x)))
  mask0 = jnp.asarray(mask0)

  def threefry16(x, key):
    m, keep = _threefry16_mask(key, rate, shape)
    return jax.lax.select(m, x / keep, jnp.zeros_like(x))

  sides = {
      "ours (hashed uint32)": jitted(lambda x, key: ours(x, rngs=key)),
      "nnx.Dropout (threefry float32)": jitted(lambda x, key: flax_layer(x, rngs=key)),
      "threefry, two 16-bit uniforms a word": jitted(threefry16),
      "select with a precomputed mask (floor)": lambda i: jax.block_until_ready(select(x, mask0)),
  }
  try:
    import torch
    xt = torch.ones(shape, dtype=torch.float32)
    sides["torch.nn.functional.dropout"] = lambda i: torch.nn.functional.dropout(xt, rate, training=True)
  except ImportError:
    print("torch not installed: no PyTorch row")
  results = {name: _median_ms(fn, args.iters) for name, fn in sides.items()}
  base = results["ours (hashed uint32)"][0]
  for name, (ms, kept) in results.items():
    print(f"{name:40s} {ms:8.1f} ms  kept {kept:.5f}  {ms / base:5.2f}x ours")
  print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
