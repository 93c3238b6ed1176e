"""BERT's optimiser in optax: AdamW without bias correction, decay off for LayerNorm and biases,
global-norm clipping, linear warmup then linear decay to zero; optional per-parameter learning-rate
multipliers by path regex (big_vision's `lr_mults`)."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from realm_jax.rules import first_match, key_names, param_path


def bert_warmup_steps(total_steps: int) -> int:
  """The original schedule's warmup: min(10000, max(100, total // 10)), capped by the run length."""
  return min(10_000, max(100, total_steps // 10), max(total_steps - 1, 1))


def warmup_linear_decay(peak_lr: float, total_steps: int, warmup_steps: int | None = None) -> optax.Schedule:
  """lr(t) = peak * t / warmup during warmup, then peak * (1 - t / total) down to 0."""
  warmup = bert_warmup_steps(total_steps) if warmup_steps is None else warmup_steps
  if warmup <= 0:
    return optax.linear_schedule(peak_lr, 0.0, total_steps)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak_lr, warmup),
       optax.linear_schedule(peak_lr * (1.0 - warmup / total_steps), 0.0, max(total_steps - warmup, 1))],
      [warmup])


class ScaleByAdamState(NamedTuple):
  mu: Any
  nu: Any


def scale_by_adam_no_bias_correction(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6
                                     ) -> optax.GradientTransformation:
  """Adam's update m / (sqrt(v) + eps) without bias correction, as BERT's AdamWeightDecayOptimizer."""

  def init(params):
    def zeros(p):
      return jnp.zeros_like(p, dtype=jnp.float32)
    return ScaleByAdamState(mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params))

  def update(updates, state, params=None):
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
    out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    return out, ScaleByAdamState(mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


def _is_decayed(path: tuple, _leaf) -> bool:
  """Weight decay applies to kernels and embeddings, not to LayerNorm parameters or biases."""
  names = key_names(path)
  return not (any("norm" in n for n in names) or names[-1] in ("bias", "output_bias"))


def decay_mask(params: Any) -> Any:
  return jax.tree_util.tree_map_with_path(_is_decayed, params)


def lr_multiplier(rules: Sequence[tuple[str, float]], path: tuple) -> float:
  """The multiplier of the first rule whose regex is found in the parameter's path
  (`retriever/query_embedder/bert/...`, `encoder/mlm/...`); 1 when none matches."""
  return float(first_match(rules, param_path(path), 1.0))


def scale_by_lr_mults(rules: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
  """Multiplies each parameter's update by its `lr_multiplier` (0 freezes it): e.g. a retriever
  that must move faster than an encoder which would otherwise memorise the training queries."""

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(lambda p, u: u * lr_multiplier(rules, p), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def bert_adamw(learning_rate: float | optax.Schedule, weight_decay: float = 0.01, clip_norm: float = 1.0,
               b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
               lr_mults: Sequence[tuple[str, float]] = ()) -> optax.GradientTransformation:
  """clip(global norm) -> Adam (no bias correction) -> decoupled weight decay (masked) -> -lr
  (-> per-parameter multipliers, when `lr_mults` has rules)."""
  parts = [
      optax.clip_by_global_norm(clip_norm),
      scale_by_adam_no_bias_correction(b1, b2, eps),
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  ]
  if lr_mults:
    parts.append(scale_by_lr_mults(tuple(lr_mults)))
  return optax.chain(*parts)
