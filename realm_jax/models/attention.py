"""Softmax attention with dropout on its probabilities, and a hand-written backward.

`attend(q, k, v, bias, mask, inv_keep)` is BERT's attention core in `[batch, heads, length, d]`
layout: `softmax(q k^T + bias)`, dropped out (`mask`, kept entries scaled by `inv_keep`), times v;
`q` comes pre-scaled by 1/sqrt(d). Its backward is written out (`jax.custom_vjp`) rather than
left to autodiff: on XLA:CPU autodiff's version of the same math ran the MiniLM encoder's
training step (16 x 384 tokens, forward + backward) ~5% slower: its gradient matmuls came out
with the head dimension (32) as a matmul's rows, which the CPU's matmul kernels run at a fraction
of their speed, plus extra transposes of the `[batch, heads, L, L]` tensors. The hand-written one
saves the probabilities and the dropout mask, and computes

  dP' = g v^T,  dv = P'^T g,  dP = mask * dP' * inv_keep,  dS = P * (dP - rowsum(dP * P)),
  dq = dS k,  dk = dS^T q        (P the probabilities, P' = P after dropout)

in the operands' dtype, bfloat16 operands accumulating in float32 as every matmul here does; the
softmax and its gradient run in float32. `tests/test_attention.py` checks it against autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def accumulator(dtype) -> jnp.dtype:
  """float32 for low-precision dtypes (their matmuls accumulate in float32), else the dtype."""
  return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else jnp.dtype(dtype)


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """Two-operand `jnp.einsum` in the operands' dtype; bfloat16 operands accumulate in float32."""
  return jnp.einsum(spec, a, b, preferred_element_type=accumulator(a.dtype)).astype(a.dtype)


def _forward(q, k, v, bias, mask, inv_keep):
  scores = einsum("bnqd,bnkd->bnqk", q, k)
  probs = jax.nn.softmax(scores.astype(jnp.float32) + bias, axis=-1)
  dropped = probs if mask is None else jnp.where(mask, probs * inv_keep, 0.0)
  return einsum("bnqk,bnkd->bnqd", dropped.astype(v.dtype), v), probs.astype(v.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, mask: jax.Array | None,
           inv_keep: jax.Array) -> jax.Array:
  """Attention context `[b, n, L, d]`; `bias` float32 `[b, 1, 1, L]` (0 or the most negative
  float), `mask` boolean `[b, n, L, L]` (True: keep) or None for no dropout. float32 operands
  take the hand-written backward; low-precision ones autodiff's (measured faster for bfloat16 on
  XLA:CPU, whose batched bfloat16 matmuls with a float32 accumulator it handles differently)."""
  if accumulator(q.dtype) != q.dtype:
    return _forward(q, k, v, bias, mask, inv_keep)[0]
  return _attend(q, k, v, bias, mask, inv_keep)


@jax.custom_vjp
def _attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, mask: jax.Array | None,
           inv_keep: jax.Array) -> jax.Array:
  return _forward(q, k, v, bias, mask, inv_keep)[0]


def _attend_fwd(q, k, v, bias, mask, inv_keep):
  ctx, probs = _forward(q, k, v, bias, mask, inv_keep)
  return ctx, (q, k, v, probs, mask, inv_keep)


def _attend_bwd(res, g):
  q, k, v, probs, mask, inv_keep = res
  g = g.astype(v.dtype)
  d_dropped = einsum("bnqd,bnkd->bnqk", g, v).astype(jnp.float32)
  if mask is None:
    dropped, d_probs = probs, d_dropped
  else:
    dropped = jnp.where(mask, probs * inv_keep.astype(probs.dtype), jnp.zeros((), probs.dtype))
    d_probs = jnp.where(mask, d_dropped * inv_keep, 0.0)
  dv = einsum("bnqk,bnqd->bnkd", dropped, g)
  p = probs.astype(jnp.float32)
  d_scores = (p * (d_probs - jnp.sum(d_probs * p, axis=-1, keepdims=True))).astype(q.dtype)
  dq = einsum("bnqk,bnkd->bnqd", d_scores, k)
  dk = einsum("bnqk,bnqd->bnkd", d_scores, q)
  return dq, dk, dv, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)
