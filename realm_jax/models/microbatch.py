"""Row-independent inference in small steps: on CPU, XLA runs a BERT tower over a few hundred
tokens at a time much faster than over one large batch (the step's activations stay in cache),
so the embedding and answering paths map their towers over micro-batches inside one jit."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# Activation elements (tokens x hidden size) per step and device on CPU: 512 tokens of MiniLM's 384
# (benchmarks/embed.py); a narrower model takes more tokens a step (the tiny preset, hidden 128:
# 1,536, where the reader answered 1.3x faster than at 512 tokens, benchmarks/openqa.py).
CPU_STEP_ELEMENTS = 512 * 384


def rows_per_step(rows: int, tokens_per_row: int, devices: int, step_tokens: int | None) -> int:
  """The most rows per step, a multiple of `devices` dividing `rows`, whose tokens stay within
  `step_tokens` per device (at least one row a device); `rows` itself when `step_tokens` is None."""
  if step_tokens is None or rows % devices:
    return rows
  local = rows // devices
  fits = [r for r in range(1, local + 1) if local % r == 0 and r * tokens_per_row <= step_tokens]
  return devices * max(fits, default=1)


def map_rows(fn: Callable, xs: tuple[jax.Array, ...], step_rows: int):
  """`fn(*xs)` for a function whose output rows depend only on the same input rows, computed
  `step_rows` leading rows at a time (`lax.map`). Step j takes rows j, j + n/step_rows, ...: each
  device keeps working on its own rows when the leading axis is sharded. `step_rows` divides n."""
  n = xs[0].shape[0]
  if step_rows >= n:
    return fn(*xs)
  steps = n // step_rows
  split = [jnp.moveaxis(x.reshape(step_rows, steps, *x.shape[1:]), 1, 0) for x in xs]
  out = jax.lax.map(lambda t: fn(*t), tuple(split))
  return jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1).reshape(n, *y.shape[2:]), out)


def step_tokens_for(mesh, hidden_size: int) -> int | None:
  """Tokens per step and device: CPU_STEP_ELEMENTS / `hidden_size` on CPU meshes; None (one step)
  on accelerators, which want large batches."""
  if mesh.devices.flat[0].platform != "cpu":
    return None
  return max(1, CPU_STEP_ELEMENTS // hidden_size)
