"""Retrieval recall@k of a retriever on Open-QA questions over a small corpus (exact search).

Used by the demo to follow how well the retriever finds answer-bearing blocks as pre-training
goes; exact inner-product search in numpy is the ground truth at this size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from flax import nnx

from realm_jax.data import features
from realm_jax.data.blocks import Block
from realm_jax.data.qa import QAExample
from realm_jax.demo.questions import AnswerMatcher
from realm_jax.openqa import features as qa_features
from realm_jax.openqa.evaluate import recall_at
from realm_jax.retrieval.embed import make_embed_fn


def first_hit_ranks(question_emb: np.ndarray, block_emb: np.ndarray, examples: Sequence[QAExample],
                    matcher: AnswerMatcher, depth: int) -> list[int | None]:
  """1-based rank of the first answer-bearing block among the top `depth`, per question."""
  scores = question_emb @ block_emb.T
  depth = min(depth, scores.shape[1])
  top = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
  ranks = []
  for ex, rows in zip(examples, top):
    hits = set(matcher.hits(ex, [int(r) for r in rows]))
    ranks.append(next((i + 1 for i, r in enumerate(rows) if int(r) in hits), None))
  return ranks


class RecallProbe:
  """Embeds the corpus and the questions with a retriever and scores recall@k."""

  def __init__(self, blocks: Sequence[Block], examples: Sequence[QAExample], tok, block_len: int,
               query_len: int, ks: Sequence[int] = (1, 5, 20)):
    self.examples, self.ks = list(examples), tuple(ks)
    self.matcher = AnswerMatcher(blocks)
    self.doc_inputs = features.blocks_doc_inputs(blocks, block_len, tok)
    q = qa_features.encode_questions(self.examples, tok, query_len, with_answers=False)
    self.query_inputs = {k: q[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    self._embed_fns = {}  # one compiled EmbedFn per tower (it reads the tower's current weights)

  def _embed(self, embedder: nnx.Module, inputs) -> np.ndarray:
    fn = self._embed_fns.get(id(embedder))  # the EmbedFn keeps the tower alive, so ids stay unique
    if fn is None:
      fn = self._embed_fns[id(embedder)] = make_embed_fn(embedder, batch_size=128)
    return fn(inputs)

  def embed_queries(self, retriever: nnx.Module) -> np.ndarray:
    return self._embed(retriever.query_embedder, self.query_inputs)

  def embed(self, retriever: nnx.Module) -> tuple[np.ndarray, np.ndarray]:
    """(question embeddings, block embeddings) with the retriever's current weights."""
    return self.embed_queries(retriever), self._embed(retriever.doc_embedder, self.doc_inputs)

  def recall(self, question_emb: np.ndarray, block_emb: np.ndarray) -> dict[int, float]:
    ranks = first_hit_ranks(question_emb, block_emb, self.examples, self.matcher, max(self.ks))
    return {k: recall_at(ranks, k) for k in self.ks}

  def __call__(self, retriever: nnx.Module) -> dict[int, float]:
    return self.recall(*self.embed(retriever))
