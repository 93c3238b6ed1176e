"""Reference retrievers for the demo's summary, on the same blocks and questions as the trained
retriever: BM25 (`bm25s`) over each block's title and text, and the full 6-layer MiniLM sentence
embedder used as it was trained (mean pooling over the tokens, unit length, no projection).

Neither is part of REALM; they show where the demo's small retriever stands.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from realm_jax.data import features
from realm_jax.data.blocks import Block
from realm_jax.data.qa import QAExample
from realm_jax.demo.questions import AnswerMatcher
from realm_jax.demo.recall import first_hit_ranks
from realm_jax.models.retriever import mean_pool
from realm_jax.openqa import features as qa_features
from realm_jax.openqa.evaluate import recall_at


def _recall(ranks: list[int | None], ks: Sequence[int]) -> dict[str, float]:
  return {f"recall@{k}": recall_at(ranks, k) for k in ks}


def bm25_recall(blocks: Sequence[Block], examples: Sequence[QAExample], ks: Sequence[int] = (1, 5, 20)
                ) -> dict[str, float]:
  """recall@k of BM25 (bm25s' defaults: Lucene scoring, k1 1.5, b 0.75, English stopwords)."""
  import logging

  import bm25s

  logging.getLogger("bm25s").setLevel(logging.WARNING)  # its index-building messages are not the demo's
  matcher = AnswerMatcher(blocks)
  corpus = [f"{b.title}. {b.text}" for b in blocks]
  retriever = bm25s.BM25()
  retriever.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)
  depth = min(max(ks), len(blocks))
  top, _ = retriever.retrieve(bm25s.tokenize([ex.question for ex in examples], stopwords="en", show_progress=False),
                              k=depth, show_progress=False, n_threads=1)
  ranks = []
  for ex, rows in zip(examples, np.asarray(top)):
    hits = set(matcher.hits(ex, [int(r) for r in rows]))
    ranks.append(next((i + 1 for i, r in enumerate(rows) if int(r) in hits), None))
  return _recall(ranks, ks)


def _mean_pooled(bert: nnx.Module, inputs: dict[str, np.ndarray], batch: int = 64) -> np.ndarray:
  @jax.jit
  def embed(state, ids, mask):
    model = nnx.merge(graphdef, state)
    hidden, _ = model(ids, mask, jnp.zeros_like(ids))
    pooled = mean_pool(hidden, mask)
    return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)

  graphdef, state = nnx.split(bert)
  ids, mask = inputs["input_ids"].astype(np.int32), inputs["attention_mask"].astype(np.int32)
  out = []
  for i in range(0, len(ids), batch):
    n = len(ids[i:i + batch])
    pad = batch - n  # one compiled shape
    out.append(np.asarray(embed(state, np.pad(ids[i:i + batch], ((0, pad), (0, 0))),
                                np.pad(mask[i:i + batch], ((0, pad), (0, 0)))))[:n])
  return np.concatenate(out)


def minilm_recall(blocks: Sequence[Block], examples: Sequence[QAExample], tok, block_len: int, query_len: int,
                  ks: Sequence[int] = (1, 5, 20)) -> dict[str, float]:
  """recall@k of the packaged 6-layer MiniLM sentence embedder, mean-pooled as it was trained."""
  from realm_jax.config import get_preset
  from realm_jax.convert.hf import load_bert, num_layers_of, read_state_dict
  from realm_jax.data import sources
  from realm_jax.models.bert import BertEncoder

  sd = read_state_dict(sources.minilm_dir())
  cfg = dataclasses.replace(get_preset("minilm").bert, num_layers=num_layers_of(sd), dropout_rate=0.0)
  bert = BertEncoder(cfg, pooler=False, rngs=nnx.Rngs(0))
  load_bert(bert, sd, source="MiniLM-L6")
  bert.eval()
  docs = features.blocks_doc_inputs(blocks, block_len, tok)
  q = qa_features.encode_questions(list(examples), tok, query_len, with_answers=False)
  ranks = first_hit_ranks(_mean_pooled(bert, q), _mean_pooled(bert, docs), examples, AnswerMatcher(blocks),
                          max(ks))
  return _recall(ranks, ks)
