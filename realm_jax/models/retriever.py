"""The knowledge retriever: BERT towers whose pooled [CLS] is projected to a small search space.

`RetrieverEmbedder` maps `[CLS] text [SEP]` to a 128-d vector (pooled -> Dense -> LayerNorm, then
dropout in training, as the original `ict_model.module_fn`); `Retriever` holds the query and
document towers (one shared module by default, as the original `share_embedders=True`) and scores
documents by inner product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from realm_jax.config import RealmConfig
from realm_jax.models.bert import BertEncoder, _dense, _norm


class RetrieverEmbedder(nnx.Module):
  """BERT -> pooled [CLS] -> Dense(retriever_dim) -> LayerNorm -> dropout (training only).

  The dropout (`RealmConfig.retrieval_dropout`) holds no random stream of its own: it draws its
  masks from the BERT embeddings' dropout stream, and only when it drops something (rate > 0, in
  training). Building the module therefore consumes no key, so parameter initialisation and every
  other dropout mask are those of a model without the layer, and at rate 0 it changes nothing.
  """

  def __init__(self, cfg: RealmConfig, *, rngs: nnx.Rngs):
    self.bert = BertEncoder(cfg.bert, pooler=True, rngs=rngs)
    self.projection = _dense(cfg.bert, cfg.bert.hidden_size, cfg.retriever_dim, rngs)
    self.projection_norm = _norm(cfg.bert, cfg.retriever_dim, rngs)
    self.dropout = nnx.Dropout(cfg.retrieval_dropout)  # no rngs: see the class docstring

  def project(self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    """The embedding before the retrieval dropout: `[..., L]` -> `[..., retriever_dim]` float32."""
    _, pooled = self.bert(input_ids, attention_mask, token_type_ids)
    return self.projection_norm(self.projection(pooled)).astype(jnp.float32)

  def drop(self, emb: jax.Array) -> jax.Array:
    """The retrieval dropout of `project`'s output (identity in eval mode or at rate 0)."""
    if self.dropout.deterministic or self.dropout.rate == 0.0:
      return emb
    return self.dropout(emb, rngs=self.bert.embeddings.dropout.rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    """`[..., L]` token inputs -> `[..., retriever_dim]` float32 embeddings."""
    return self.drop(self.project(input_ids, attention_mask, token_type_ids))


class Retriever(nnx.Module):
  """Query and document towers; `share_embedders` makes them one module (one set of weights)."""

  def __init__(self, cfg: RealmConfig, *, rngs: nnx.Rngs):
    self.query_embedder = RetrieverEmbedder(cfg, rngs=rngs)
    self.doc_embedder = self.query_embedder if cfg.share_embedders else RetrieverEmbedder(cfg, rngs=rngs)

  def embed_queries(self, input_ids, attention_mask, token_type_ids) -> jax.Array:
    return self.query_embedder(input_ids, attention_mask, token_type_ids)

  def embed_queries_both(self, input_ids, attention_mask, token_type_ids) -> tuple[jax.Array, jax.Array]:
    """(embedding before the retrieval dropout, after it) from one pass of the query tower."""
    emb = self.query_embedder.project(input_ids, attention_mask, token_type_ids)
    return emb, self.query_embedder.drop(emb)

  def embed_docs(self, input_ids, attention_mask, token_type_ids) -> jax.Array:
    return self.doc_embedder(input_ids, attention_mask, token_type_ids)


def relevance_scores(query_emb: jax.Array, doc_emb: jax.Array) -> jax.Array:
  """Inner products: query `[B, D]` against candidates `[B, C, D]` -> `[B, C]`."""
  return jnp.einsum("bd,bcd->bc", query_emb, doc_emb)
