"""The knowledge retriever: BERT towers whose pooled output is projected to a small search space.

`RetrieverEmbedder` maps `[CLS] text [SEP]` to a 128-d vector (pooled -> Dense -> LayerNorm, then
dropout in training, as the original `ict_model.module_fn`); `Retriever` holds the query and
document towers (one shared module by default, as the original `share_embedders=True`) and scores
documents by inner product.

The pooled output is the tanh-pooled [CLS] (`RealmConfig.retriever_pooling="cls"`, the paper's) or
the mean of the last layer over the real tokens ("mean", how sentence embedders such as MiniLM are
trained). `init_sentence_head` gives a mean-pooling tower a head that keeps such an embedder's
ranking instead of a random projection that discards it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from realm_jax.config import RealmConfig
from realm_jax.models.bert import BertEncoder, _dense, _norm
from realm_jax.models.dropout import Dropout

# The inner product of two unit vectors times this is what a sentence embedder's contrastive loss
# was trained on (sentence-transformers' MultipleNegativesRankingLoss: cosine x 20).
SENTENCE_SCORE_SCALE = 20.0


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """The mean of `hidden` `[..., L, H]` over the positions where `attention_mask` is 1."""
  m = attention_mask[..., None].astype(hidden.dtype)
  return (hidden * m).sum(-2) / jnp.maximum(m.sum(-2), 1.0)


class RetrieverEmbedder(nnx.Module):
  """BERT -> pooled output -> Dense(retriever_dim) -> LayerNorm -> dropout (training only).

  The dropout (`RealmConfig.retrieval_dropout`) holds no random stream of its own: it draws its
  masks from the BERT embeddings' dropout stream, and only when it drops something (rate > 0, in
  training). Building the module therefore consumes no key, so parameter initialisation and every
  other dropout mask are those of a model without the layer, and at rate 0 it changes nothing.
  """

  def __init__(self, cfg: RealmConfig, *, rngs: nnx.Rngs):
    self.pooling = cfg.retriever_pooling
    self.bert = BertEncoder(cfg.bert, pooler=self.pooling == "cls", rngs=rngs)
    self.projection = _dense(cfg.bert, cfg.bert.hidden_size, cfg.retriever_dim, rngs)
    self.projection_norm = _norm(cfg.bert, cfg.retriever_dim, rngs)
    self.dropout = Dropout(cfg.retrieval_dropout)  # no rngs: see the class docstring

  def project(self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    """The embedding before the retrieval dropout: `[..., L]` -> `[..., retriever_dim]` float32."""
    hidden, pooled = self.bert(input_ids, attention_mask, token_type_ids)
    if self.pooling == "mean":
      pooled = mean_pool(hidden, attention_mask)
    return self.projection_norm(self.projection(pooled)).astype(jnp.float32)

  def drop(self, emb: jax.Array) -> jax.Array:
    """The retrieval dropout of `project`'s output (identity in eval mode or at rate 0)."""
    if self.dropout.deterministic or self.dropout.rate == 0.0:
      return emb
    return self.dropout(emb, rngs=self.bert.embeddings.dropout.rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    """`[..., L]` token inputs -> `[..., retriever_dim]` float32 embeddings."""
    return self.drop(self.project(input_ids, attention_mask, token_type_ids))


def init_sentence_head(embedder: RetrieverEmbedder, scale: float = SENTENCE_SCORE_SCALE) -> str:
  """Sets the head of a mean-pooling tower whose BERT is a sentence embedder so that inner products
  of its outputs are `scale` x the cosine of the (projected, centred) mean-pooled vectors.

  The projection is the identity when `retriever_dim` equals the hidden size, otherwise the first
  `retriever_dim` columns of a fixed random orthonormal basis (numpy seed 0: a Johnson-Lindenstrauss
  projection, which keeps inner products approximately); the LayerNorm's scale is
  sqrt(scale / retriever_dim) and its bias 0, so each output has norm sqrt(scale) and the
  LayerNorm centres and normalises each vector. Returns a log line."""
  if embedder.pooling != "mean":
    raise ValueError("init_sentence_head needs a mean-pooling tower (retriever_pooling='mean')")
  kernel = embedder.projection.kernel
  hidden, dim = kernel.shape
  if dim == hidden:
    w = np.eye(hidden, dtype=np.float32)
  else:  # orthonormal columns (dim < hidden) or rows (dim > hidden: inner products kept exactly)
    big, small = max(hidden, dim), min(hidden, dim)
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((big, small)))
    w = (q if dim < hidden else q.T).astype(np.float32)
  kernel[...] = jnp.asarray(w, kernel.dtype)
  embedder.projection.bias[...] = jnp.zeros_like(embedder.projection.bias[...])
  norm = embedder.projection_norm
  norm.scale[...] = jnp.full_like(norm.scale[...], np.sqrt(scale / dim))
  norm.bias[...] = jnp.zeros_like(norm.bias[...])
  how = "identity" if dim == hidden else f"orthonormal {hidden}->{dim}"
  return f"sentence-embedder head: mean pooling, {how} projection, scores = {scale:g} x cosine"


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
