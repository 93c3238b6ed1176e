"""Batched Open-QA evaluation on the mesh (blocks retrieved there, or on the host by ScaNN): exact
match (ORQA's SQuAD normalisation, regex match for CuratedTrec), retrieval recall@k (DPR's
`has_answer` on the top-k blocks), predictions JSONL; the CLI prints the summaries
(`cli/evaluate.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from realm_jax.config import RealmConfig
from realm_jax.data import qa
from realm_jax.data.qa import QAExample
from realm_jax.models.microbatch import step_tokens_for
from realm_jax.openqa import features, loading
from realm_jax.openqa.step import predict, searcher_hits

RECALL_KS = (1, 5, 20, 100)


def first_hit_rank(texts: Sequence[str], example: QAExample) -> int | None:
  """1-based rank of the first block text containing an answer (DPR `has_answer`), or None."""
  for rank, text in enumerate(texts, start=1):
    if qa.has_answer(text, example.answers, example.answer_type):
      return rank
  return None


def recall_at(ranks: Sequence[int | None], k: int) -> float:
  """Fraction of questions whose first answer-bearing block is within the top k."""
  return float(np.mean([r is not None and r <= k for r in ranks])) if ranks else 0.0


@dataclasses.dataclass
class Summary:
  """Aggregate metrics of one evaluation run."""

  name: str
  num_questions: int
  exact_match: float
  recall: dict[int, float]
  seconds: float

  @property
  def questions_per_second(self) -> float:
    return self.num_questions / max(self.seconds, 1e-9)

  def to_dict(self) -> dict:
    return {"name": self.name, "num_questions": self.num_questions, "exact_match": self.exact_match,
            **{f"recall@{k}": v for k, v in self.recall.items()}, "seconds": self.seconds,
            "questions_per_second": self.questions_per_second}


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _predict(graphdef, beam: int, step_tokens: int | None, devices: int, state, batch, corpus, ids=None,
             scores=None):
  return predict(nnx.merge(graphdef, state), batch, corpus, beam, step_tokens=step_tokens, devices=devices,
                 ids=ids, scores=scores)


class Evaluator:
  """Answers questions in batches sharded over the mesh `data` axis, against a frozen index.
  Inside a batch the towers run over micro-batches of at most `step_tokens` tokens a device
  ("auto": 512 on CPU, where that is faster, the whole batch on accelerators). With a `searcher`
  (the index version's ScaNN searcher), the blocks are retrieved on the host by it instead of by
  exact MIPS on the mesh, and the index's embeddings are not placed on the mesh (`embeddings` may
  be None); reading is the same."""

  def __init__(self, model: nnx.Module, cfg: RealmConfig, tables: loading.CorpusTables, embeddings,
               mesh: jax.sharding.Mesh, batch_size: int = 64, recall_ks: Sequence[int] = RECALL_KS,
               searcher=None, step_tokens: int | None | str = "auto"):
    self.model, self.cfg, self.tables, self.mesh = model, cfg, tables, mesh
    self.searcher = searcher
    data = mesh.shape["data"]
    self.batch_size = max(data, -(-batch_size // data) * data)
    n = tables.num_blocks
    if n < cfg.reader_beam_size:
      raise loading.OpenQALoadError(f"the corpus has {n} blocks, fewer than reader_beam_size {cfg.reader_beam_size}")
    self.recall_ks = tuple(recall_ks)
    self.beam = min(max(max(self.recall_ks, default=1), cfg.reader_beam_size), n)
    self.corpus = loading.reader_corpus(tables, None if searcher is not None else embeddings, cfg, mesh)
    self.sharding = NamedSharding(mesh, P("data"))
    self.step_tokens = step_tokens_for(mesh, cfg.bert.hidden_size) if step_tokens == "auto" else step_tokens
    model.eval()
    self._graphdef, _ = nnx.split(model)

  def _raw(self, examples: Sequence[QAExample]) -> dict[str, np.ndarray]:
    """Device predictions for `examples`, batch by batch (the last batch padded)."""
    state = jax.device_put(nnx.state(self.model), NamedSharding(self.mesh, P()))  # e.g. restored on one device
    outs = []
    for i in range(0, len(examples), self.batch_size):
      chunk = examples[i:i + self.batch_size]
      host = features.encode_questions(chunk, self.tables.tok, self.cfg.query_len, with_answers=False)
      host = features.pad_batch(host, self.batch_size)
      batch = {k: jax.device_put(v, self.sharding) for k, v in host.items()}
      hits = (None, None)
      if self.searcher is not None:
        hits = jax.device_put(searcher_hits(self._graphdef, state, batch, self.searcher, self.beam), self.sharding)
      outs.append((len(chunk), _predict(self._graphdef, self.beam, self.step_tokens, self.mesh.shape["data"],
                                        state, batch, self.corpus, *hits)))
    if not outs:
      return {}
    keys = outs[0][1].keys()
    return {k: np.concatenate([np.asarray(o[k])[:n] for n, o in outs]) for k in keys}

  def answer(self, examples: Sequence[QAExample]) -> list[dict]:
    """One record per question: the answer text, its block (id, title, rank), span and scores."""
    raw = self._raw(examples)
    out = []
    for i, ex in enumerate(examples):
      block = self.tables.block(int(raw["block_id"][i]))
      start, end = int(raw["start"][i]), int(raw["end"][i])
      text = features.span_text(block, start, end)
      chars = [int(block.body_offsets[start, 0]), int(block.body_offsets[end, 1])] if text else None
      ids = [int(b) for b in raw["ids"][i] if b >= 0]
      out.append({"qid": ex.qid, "question": ex.question, "answer": text, "block_id": int(raw["block_id"][i]),
                  "block_rank": int(raw["block"][i]) + 1, "title": block.title, "span_tokens": [start, end],
                  "span_chars": chars, "score": float(raw["score"][i]),
                  "reader_score": float(raw["reader_score"][i]),
                  "retriever_score": float(raw["retriever_score"][i]), "retrieved": ids,
                  "retrieved_scores": [float(s) for s in raw["scores"][i][:len(ids)]]})
    return out

  def evaluate(self, examples: Sequence[QAExample], name: str = "questions") -> tuple[list[dict], Summary]:
    """Predictions (with `correct` and `first_hit_rank`) and the summary for a question set."""
    t0 = time.perf_counter()
    preds = self.answer(examples)
    seconds = time.perf_counter() - t0
    score_records(examples, preds, lambda block_id: self.tables.block(block_id).text)
    return preds, summarize(name, preds, [k for k in self.recall_ks if k <= self.beam], seconds)


def score_records(examples: Sequence[QAExample], records: Sequence[dict], block_text) -> None:
  """Adds `answers`, `correct` (EM, or regex match for regex sets) and `first_hit_rank` (over the
  record's `retrieved` block ids, text from `block_text(id)`) to each prediction record."""
  for ex, p in zip(examples, records):
    p["answers"] = list(ex.answers)
    p["correct"] = bool(qa.score(p["answer"], ex))
    p["first_hit_rank"] = first_hit_rank([block_text(b) for b in p["retrieved"]], ex)


def summarize(name: str, records: Sequence[dict], recall_ks: Sequence[int], seconds: float) -> Summary:
  """Exact match and recall@k over scored records."""
  em = float(np.mean([p["correct"] for p in records])) if records else 0.0
  ranks = [p["first_hit_rank"] for p in records]
  return Summary(name, len(records), em, {k: recall_at(ranks, k) for k in recall_ks}, seconds)


def write_predictions(path: str, predictions: Sequence[dict]) -> None:
  """Predictions as JSONL (one object per question), written through a temp file then renamed:
  `path` holds the old file or the whole new one, never a part, and no temp file is left."""
  import contextlib
  import os
  import tempfile

  from realm_jax.errors import RealmError

  directory = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.tmp-")
  except OSError as e:
    raise RealmError(f"{path}: cannot write predictions there ({e.strerror or e})") from None
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      for p in predictions:
        f.write(json.dumps(p, ensure_ascii=False) + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    raise RealmError(f"{path}: writing predictions failed ({e.strerror or e})") from None
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
