"""The REALM pre-training step, read top to bottom: retrieve, re-embed, read, marginalise, update.

1. embed the masked query with the query tower;
2. retrieve the top k-1 blocks from the (stale) index on the mesh, excluding the query's own block,
   with the embedding before the retrieval dropout (the original retrieves in its example
   generator with an eval-mode embedder; the dropped-out embedding scores the candidates);
   An example whose candidates hold one block text twice (distinct ids, identical token rows),
   or a copy of its own block, is skipped (its targets weigh 0), as the original example
   generator skips such examples (`skip_duplicate_candidates`);
3. prepend the null document; re-embed all k candidates with the *current* document tower, so the
   gradient reaches both towers (the stale index only chooses the candidates);
4. run the knowledge-augmented encoder over `[CLS] query [SEP] body [SEP]` for every candidate;
5. maximise log sum_z p(z|x) p(y|z,x) (per token by default, per span behind a flag);
6. `train_step`: gradients of that loss (or of the ICT loss) and one optimizer update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from realm_jax.models import marginal_log_likelihood, relevance_scores
from realm_jax.retrieval import mips
from realm_jax.train.device_corpus import (
  DeviceCorpus,
  body_from_doc,
  doc_inputs_from_tokens,
  gather_rows,
  joint_inputs,
)

if TYPE_CHECKING:
  from realm_jax.train.config import TrainConfig


def retrieve_candidates(query_emb: jax.Array, index: mips.RowShardedEmbeddings, exclude: jax.Array,
                        num_candidates: int, approx: bool) -> jax.Array:
  """Global block ids `[B, num_candidates - 1]` (-1 where the corpus has too few blocks)."""
  found = mips.search(jax.lax.stop_gradient(query_emb), index, num_candidates - 1,
                      exclude_ids=exclude[:, None], approx=approx)
  return found.ids


def duplicate_candidates(tokens: jax.Array, valid: jax.Array, own: jax.Array, has_own: jax.Array) -> jax.Array:
  """Which examples hold a duplicate among their retrieved candidates: `[B]` bool.

  tokens `[B, K, L]` the retrieved blocks' token rows, valid `[B, K]` (id >= 0), own `[B, L]` the
  query's own block row, has_own `[B]` (the own block is known). The original example generator
  (`example_generator.generate_queries_and_candidates`) retrieves k blocks, the query's own among
  them, and skips the example when two have the same uid (a hash of title and body: the same
  text). Here the own block is excluded from the search by id, so a duplicate is two valid
  candidates with identical rows, or one identical to the own block (the original would have
  retrieved the own block next to its copy, their embeddings being equal).
  """
  same = jnp.all(tokens[:, :, None, :] == tokens[:, None, :, :], axis=-1)  # [B, K, K]
  k = tokens.shape[1]
  pair = valid[:, :, None] & valid[:, None, :] & jnp.triu(jnp.ones((k, k), bool), 1)[None]
  copy_of_own = jnp.all(tokens == own[:, None, :], axis=-1) & valid & has_own[:, None]  # [B, K]
  return jnp.any(same & pair, axis=(1, 2)) | jnp.any(copy_of_own, axis=1)


def null_document(corpus: DeviceCorpus, batch: int) -> jax.Array:
  """The null document's token row `[CLS] [SEP] [SEP]` ([B, 1, block_len]; its body is `[SEP]`)."""
  doc = jnp.full((batch, 1, corpus.block_len), corpus.pad_id, jnp.int32)
  return doc.at[:, :, 0].set(corpus.cls_id).at[:, :, 1].set(corpus.sep_id).at[:, :, 2].set(corpus.sep_id)


def realm_loss(model: nnx.Module, batch: dict[str, jax.Array], corpus: DeviceCorpus,
               index: mips.RowShardedEmbeddings, per_span: bool = False, approx: bool = False,
               skip_duplicates: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Loss and metrics of one REALM batch (see the module docstring). `skip_duplicates`: examples
  with duplicate candidates (`duplicate_candidates`) contribute no loss and no metrics; the
  metric `duplicate_skipped` is their share of the batch."""
  cfg = model.config
  c = cfg.num_candidates
  q_search, q_emb = model.retriever.embed_queries_both(batch["input_ids"], batch["attention_mask"],
                                                       batch["token_type_ids"])
  b = q_emb.shape[0]

  if "candidate_ids" in batch:  # retrieved on the host (ScaNN in the input pipeline)
    ids = batch["candidate_ids"]
  else:
    ids = retrieve_candidates(q_search, index, batch["block_id"], c, approx)  # [B, C-1]
  retrieved = gather_rows(corpus.tokens, ids)  # [B, C-1, Lb]
  doc_tokens = jnp.concatenate([null_document(corpus, b), retrieved], axis=1)  # [B, C, Lb]
  body_tokens = body_from_doc(doc_tokens, corpus.sep_id, corpus.pad_id)  # body [SEP] pad...
  valid = jnp.concatenate([jnp.ones((b, 1), bool), ids >= 0], axis=1)  # [B, C]
  batch = dict(batch)
  if skip_duplicates:
    own_id = batch["block_id"].astype(jnp.int32)
    own = gather_rows(corpus.tokens, own_id[:, None])[:, 0]  # [B, Lb] (zeros where unknown)
    skipped = duplicate_candidates(retrieved, ids >= 0, own, own_id >= 0)  # [B]
    batch["mlm_weights"] = jnp.where(skipped[:, None], 0, batch["mlm_weights"]).astype(batch["mlm_weights"].dtype)
  else:
    skipped = jnp.zeros((b,), bool)

  d_emb = model.retriever.embed_docs(*doc_inputs_from_tokens(doc_tokens, corpus.pad_id, corpus.sep_id))
  scores = jnp.where(valid, relevance_scores(q_emb, d_emb), -1e9)  # [B, C]

  joint = joint_inputs(batch["input_ids"], batch["attention_mask"], body_tokens, corpus.pad_id)
  positions = jnp.broadcast_to(batch["mlm_positions"][:, None, :], (b, c, batch["mlm_positions"].shape[-1]))
  logits = model.encoder(*joint, mlm_positions=positions)  # [B, C, M, V]
  loss, aux = marginal_log_likelihood(logits, batch["mlm_targets"], batch["mlm_weights"], scores, per_span)
  metrics = realm_metrics(logits, scores, aux, batch, ids, loss)
  metrics["duplicate_skipped"] = skipped.astype(jnp.float32).mean()
  return loss, metrics


def realm_metrics(logits, scores, aux, batch, ids, loss) -> dict[str, jax.Array]:
  """MLM accuracy of the marginal prediction, retrieval utility vs the null document, p(z|x)
  entropy, recall of a known gold block where the batch names one (`gold_block_id` >= 0), and
  how many queries came from the retrieval corpus (`own_block_known`: `block_id` >= 0) and how
  many of those retrieved their own block anyway (`own_block_retrieved`, 0 while the exclusion
  works).

  `retrieval_utility` is the original REALM code's: per masked token, the marginal log-likelihood
  log sum_z p(z|x) p(y|z,x) minus the log-likelihood given the null document alone, averaged over
  masked tokens. `top1_utility` is per example: the target log-likelihood given the top-scoring
  retrieved block minus that given the null document."""
  w = batch["mlm_weights"]
  log_p_z = aux["log_p_z"]  # [B, C]
  marginal = jax.nn.logsumexp(log_p_z[:, :, None, None] + jax.nn.log_softmax(logits, -1), axis=1)  # [B, M, V]
  correct = (jnp.argmax(marginal, -1) == batch["mlm_targets"]).astype(jnp.float32)
  lp = aux["log_p_y_given_z"]  # [B, C], candidate 0 is the null document
  top1 = 1 + jnp.argmax(scores[:, 1:], axis=-1)
  top1_utility = jnp.take_along_axis(lp, top1[:, None], axis=1)[:, 0] - lp[:, 0]
  tok_lp = aux["token_log_p_y_given_z"]  # [B, C, M]
  token_utility = jax.nn.logsumexp(log_p_z[:, :, None] + tok_lp, axis=1) - tok_lp[:, 0]  # [B, M]
  has_target = (w.sum(-1) > 0).astype(jnp.float32)
  entropy = -(jnp.exp(log_p_z) * log_p_z).sum(-1)
  gold = batch.get("gold_block_id", jnp.full(ids.shape[:1], -1, jnp.int32))
  has_gold = (gold >= 0).astype(jnp.float32)
  hit = jnp.any(ids == gold[:, None], axis=-1).astype(jnp.float32) * has_gold
  own = batch.get("block_id", jnp.full(ids.shape[:1], -1, jnp.int32))
  own_hit = jnp.any((ids == own[:, None]) & (own[:, None] >= 0), axis=-1)
  n = jnp.maximum(has_target.sum(), 1.0)
  return {
      "loss": loss,
      "mlm_accuracy": (correct * w).sum() / jnp.maximum(w.sum(), 1.0),
      "retrieval_utility": (token_utility * w).sum() / jnp.maximum(w.sum(), 1.0),
      "top1_utility": (top1_utility * has_target).sum() / n,
      "p_z_entropy": (entropy * has_target).sum() / n,
      "null_doc_prob": (jnp.exp(log_p_z[:, 0]) * has_target).sum() / n,
      "gold_recall": hit.sum() / jnp.maximum(has_gold.sum(), 1.0),
      "gold_count": has_gold.sum(),
      "own_block_known": (own >= 0).astype(jnp.float32).sum(),
      "own_block_retrieved": own_hit.astype(jnp.float32).sum(),
  }


def ict_loss(model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ORQA's Inverse Cloze Task: each sentence must pick its own block among every block of the
  global batch (in-batch softmax; under jit the batch-sharded embeddings are all-gathered)."""
  q = model.retriever.embed_queries(batch["query_input_ids"], batch["query_attention_mask"],
                                    batch["query_token_type_ids"])
  d = model.retriever.embed_docs(batch["block_input_ids"], batch["block_attention_mask"],
                                 batch["block_token_type_ids"])
  logits = q @ d.T  # [B, B]
  labels = jnp.arange(q.shape[0])
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
  accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return loss, {"loss": loss, "ict_accuracy": accuracy}


def train_step(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array], corpus: DeviceCorpus | None,
               index: mips.RowShardedEmbeddings | None, *, cfg: TrainConfig) -> tuple[nnx.State, dict[str, Any]]:
  """One optimizer step on the `(model, optimizer)` state: the REALM (or ICT) loss, its gradients,
  the update. The trainer jits it with the state donated and its shardings kept (`train/loop.py`)."""
  model, optimizer = nnx.merge(graphdef, state)

  def loss_fn(model):
    if cfg.task == "ict":
      return ict_loss(model, batch)
    return realm_loss(model, batch, corpus, index, per_span=cfg.model.marginal == "span", approx=cfg.approx_top_k,
                      skip_duplicates=cfg.skip_duplicate_candidates)

  (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  metrics["grad_norm"] = optax.tree.norm(grads)
  optimizer.update(model, grads)
  return nnx.state((model, optimizer)), metrics
