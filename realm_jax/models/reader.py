"""The ORQA span reader and the Open-QA losses (retriever and reader marginal likelihoods).

Every span of width <= `max_span_width` inside the evidence block is scored by
Dense(H -> 2*S) -> start + end -> ReLU -> LayerNorm(eps 1e-3) -> Dense(1), plus the block's
retriever logit; the prediction is the argmax over (block, span).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from realm_jax.config import RealmConfig
from realm_jax.models.bert import BertEncoder, _dense


def span_candidates(seq_len: int, max_width: int) -> tuple[np.ndarray, np.ndarray]:
  """All (start, end) token pairs with end - start < max_width, ordered by width then start."""
  starts, ends = [], []
  for width in range(1, max_width + 1):
    starts.append(np.arange(seq_len - width + 1))
    ends.append(np.arange(width - 1, seq_len))
  return np.concatenate(starts).astype(np.int32), np.concatenate(ends).astype(np.int32)


def mask_to_score(mask: jax.Array, dtype=jnp.float32) -> jax.Array:
  """0 where mask is true, the most negative finite value elsewhere (as the original code)."""
  return (1.0 - mask.astype(dtype)) * jnp.finfo(dtype).min


class SpanReader(nnx.Module):
  """BERT over `[CLS] question [SEP] block [SEP]` and the ORQA span scorer."""

  def __init__(self, cfg: RealmConfig, *, rngs: nnx.Rngs):
    self.max_span_width = cfg.max_span_width
    self.bert = BertEncoder(cfg.bert, pooler=False, rngs=rngs)
    self.span_intermediate = _dense(cfg.bert, cfg.bert.hidden_size, 2 * cfg.span_hidden_size, rngs)
    self.span_norm = nnx.LayerNorm(cfg.span_hidden_size, epsilon=cfg.reader_layer_norm_eps,
                                   dtype=jnp.dtype(cfg.bert.dtype), rngs=rngs)
    self.span_output = _dense(cfg.bert, cfg.span_hidden_size, 1, rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array,
               block_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Inputs `[..., L]`; `block_mask` marks block tokens (spans must start and end inside it).

    Returns (span logits `[..., S]` float32 without the retriever logit, starts `[S]`, ends `[S]`).
    """
    hidden, _ = self.bert(input_ids, attention_mask, token_type_ids)
    starts, ends = span_candidates(hidden.shape[-2], self.max_span_width)
    start_proj, end_proj = jnp.split(self.span_intermediate(hidden), 2, axis=-1)
    span_hidden = jnp.take(start_proj, starts, axis=-2) + jnp.take(end_proj, ends, axis=-2)
    span_hidden = self.span_norm(jax.nn.relu(span_hidden))
    logits = self.span_output(span_hidden)[..., 0].astype(jnp.float32)
    span_mask = jnp.take(block_mask, starts, axis=-1) * jnp.take(block_mask, ends, axis=-1)
    return logits + mask_to_score(span_mask), jnp.asarray(starts), jnp.asarray(ends)


def marginal_log_loss(logits: jax.Array, is_correct: jax.Array) -> jax.Array:
  """-log sum over correct entries of softmax(logits), along the last axis; 0 where none is correct."""
  log_num = jax.nn.logsumexp(logits + mask_to_score(is_correct, logits.dtype), axis=-1)
  loss = jax.nn.logsumexp(logits, axis=-1) - log_num
  return loss * jnp.any(is_correct, axis=-1).astype(logits.dtype)


def correct_spans(starts: jax.Array, ends: jax.Array, gold_starts: jax.Array, gold_ends: jax.Array) -> jax.Array:
  """Spans matching any gold (start, end): gold `[..., A]` (-1 = none) -> `[..., S]` bool."""
  hit = (starts[None, :] == gold_starts[..., :, None]) & (ends[None, :] == gold_ends[..., :, None])
  return jnp.any(hit, axis=-2)


def openqa_losses(retriever_logits: jax.Array, has_answer: jax.Array, reader_logits: jax.Array,
                  reader_correct: jax.Array) -> dict[str, jax.Array]:
  """ORQA's two losses for a batch of questions.

  Args:
    retriever_logits: `[Q, K]` scores of the K retrieved blocks (the large beam).
    has_answer: `[Q, K]` whether each block contains an answer string.
    reader_logits: `[Q, R, S]` span logits of the R read blocks, retriever logit already added.
    reader_correct: `[Q, R, S]` spans matching an answer.
  """
  retriever_loss = marginal_log_loss(retriever_logits, has_answer)
  q = reader_logits.shape[0]
  reader_loss = marginal_log_loss(reader_logits.reshape(q, -1), reader_correct.reshape(q, -1))
  return {"retriever_loss": retriever_loss, "reader_loss": reader_loss,
          "loss": jnp.mean(retriever_loss + reader_loss)}


def predict_span(reader_logits: jax.Array, starts: jax.Array, ends: jax.Array) -> dict[str, jax.Array]:
  """argmax over (block, span) of `[..., R, S]` logits -> block index, start, end, score."""
  flat = reader_logits.reshape(*reader_logits.shape[:-2], -1)
  best = jnp.argmax(flat, axis=-1)
  n_spans = reader_logits.shape[-1]
  span = best % n_spans
  return {"block": best // n_spans, "start": starts[span], "end": ends[span],
          "score": jnp.take_along_axis(flat, best[..., None], axis=-1)[..., 0]}
