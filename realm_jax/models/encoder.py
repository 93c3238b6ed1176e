"""The knowledge-augmented encoder and REALM's marginal likelihood over retrieved documents.

The encoder reads `[CLS] query [SEP] body [SEP]` for each candidate document z and predicts the
masked tokens y; training maximises log p(y|x) = log sum_z p(z|x) p(y|z,x). The original code
(and HuggingFace) marginalise per masked token; the paper writes it per span (`per_span=True`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from realm_jax.config import RealmConfig
from realm_jax.models.bert import BertEncoder, MlmHead


class KnowledgeAugEncoder(nnx.Module):
  """BERT + MLM head (output weights tied to the word embeddings)."""

  def __init__(self, cfg: RealmConfig, *, rngs: nnx.Rngs):
    self.bert = BertEncoder(cfg.bert, pooler=False, rngs=rngs)
    self.mlm = MlmHead(cfg.bert, rngs=rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array,
               mlm_positions: jax.Array | None = None) -> jax.Array:
    """Returns MLM logits `[..., P, V]` at `mlm_positions` `[..., P]` (all `L` positions if None).

    Gathering the masked positions first keeps the `[.., L, vocab]` logits out of memory: REALM
    masks at most 10 of 384 tokens.
    """
    hidden, _ = self.bert(input_ids, attention_mask, token_type_ids)
    if mlm_positions is not None:
      hidden = jnp.take_along_axis(hidden, mlm_positions[..., None].astype(jnp.int32), axis=-2)
    return self.mlm(hidden, self.bert.embeddings.word_embeddings)


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) per position: logits `[..., P, V]`, targets `[..., P]` -> `[..., P]` float32."""
  return -optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def marginal_log_likelihood(mlm_logits: jax.Array, targets: jax.Array, target_mask: jax.Array,
                            candidate_scores: jax.Array, per_span: bool = False
                            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """REALM's loss: -log sum_z p(z|x) p(y|z,x).

  Args:
    mlm_logits: `[B, C, P, V]` encoder logits at the P target positions for each of C candidates.
    targets: `[B, P]` gold token ids (any value where `target_mask` is 0).
    target_mask: `[B, P]` 1 for real targets.
    candidate_scores: `[B, C]` retrieval logits q.d_z; log p(z|x) = log_softmax over C.
    per_span: False marginalises each token separately (original code, HF); True marginalises
      the joint probability of all targets of an example (the paper's span form).

  Returns:
    (scalar loss, aux) where aux holds `log_p_z` `[B, C]`, `log_p_y_given_z` `[B, C]` (the summed
    target log-likelihood under each candidate) and `token_log_p_y_given_z` `[B, C, P]` (per target
    token, 0 where `target_mask` is 0), for metrics.
  """
  mask = target_mask.astype(jnp.float32)
  tok_lp = token_log_probs(mlm_logits, jnp.broadcast_to(targets[:, None, :], mlm_logits.shape[:-1]))
  tok_lp = tok_lp * mask[:, None, :]  # [B, C, P]
  log_p_z = jax.nn.log_softmax(candidate_scores.astype(jnp.float32), axis=-1)  # [B, C]
  span_lp = tok_lp.sum(-1)  # [B, C]
  if per_span:
    marginal = jax.nn.logsumexp(log_p_z + span_lp, axis=-1)  # [B]
    has_target = (mask.sum(-1) > 0).astype(jnp.float32)
    loss = -(marginal * has_target).sum() / jnp.maximum(has_target.sum(), 1.0)
  else:
    marginal = jax.nn.logsumexp(log_p_z[:, :, None] + tok_lp, axis=1)  # [B, P]
    loss = -(marginal * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  return loss, {"log_p_z": log_p_z, "log_p_y_given_z": span_lp, "token_log_p_y_given_z": tok_lp}
