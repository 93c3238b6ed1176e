"""Answering one question with a fine-tuned model: the best spans over the read blocks, each
with its evidence block (the span highlighted) and its scores (`realm-jax ask`)."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from realm_jax.config import RealmConfig
from realm_jax.data.qa import QAExample, normalize_answer
from realm_jax.openqa import features, loading
from realm_jax.openqa.step import read, retrieve, searcher_hits


@dataclasses.dataclass
class Answer:
  """One candidate answer and where it came from."""

  text: str
  score: float  # reader span logit + retriever logit (what the argmax ranks by)
  reader_score: float
  retriever_score: float
  block_id: int
  block_rank: int  # 1-based rank of the block in the retrieval beam
  title: str
  block_text: str
  span_chars: tuple[int, int]


class Answerer:
  """Top answers for single questions, the reader beam read in one jitted call; retrieved on the
  mesh, or on the host by the index version's ScaNN `searcher` when one is given."""

  def __init__(self, model: nnx.Module, cfg: RealmConfig, tables: loading.CorpusTables, embeddings,
               mesh: jax.sharding.Mesh, candidates: int = 20, searcher=None):
    self.model, self.cfg, self.tables, self.searcher = model, cfg, tables, searcher
    if tables.num_blocks < cfg.reader_beam_size:
      raise loading.OpenQALoadError(f"the corpus has {tables.num_blocks} blocks, fewer than reader_beam_size "
                                    f"{cfg.reader_beam_size}")
    self.corpus = loading.reader_corpus(tables, None if searcher is not None else embeddings, cfg, mesh)
    self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    model.eval()
    graphdef, _ = nnx.split(model)
    self._graphdef = graphdef
    r = cfg.reader_beam_size

    def top_spans(state, batch, corpus, ids=None, scores=None):
      m = nnx.merge(graphdef, state)
      _, ids, logits = retrieve(m, batch, corpus, r, ids=ids, scores=scores)
      out = read(m, batch, corpus, ids, logits)
      flat = out["logits"].reshape(out["logits"].shape[0], -1)
      scores, best = jax.lax.top_k(flat, min(candidates, flat.shape[-1]))
      s = out["logits"].shape[-1]
      block, span = best // s, best % s
      return {"ids": ids, "logits": logits, "block": block, "score": scores,
              "start": out["starts"][span] - out["offset"][:, None], "end": out["ends"][span] - out["offset"][:, None]}

    self._top = jax.jit(top_spans)

  def ask(self, question: str, top: int = 1) -> list[Answer]:
    """The `top` best distinct answers (by normalised text) to `question`."""
    example = QAExample("ask", question, [""])
    host = features.encode_questions([example], self.tables.tok, self.cfg.query_len, with_answers=False)
    batch = {k: jax.device_put(v, self.replicated) for k, v in host.items()}
    state = jax.device_put(nnx.state(self.model), self.replicated)
    hits = (None, None)
    if self.searcher is not None:
      hits = jax.device_put(searcher_hits(self._graphdef, state, batch, self.searcher, self.cfg.reader_beam_size),
                            self.replicated)
    raw = jax.device_get(self._top(state, batch, self.corpus, *hits))
    answers, seen = [], set()
    for j in range(raw["score"].shape[1]):
      rank = int(raw["block"][0, j])
      block_id = int(raw["ids"][0, rank])
      if block_id < 0:
        continue
      block = self.tables.block(block_id)
      start, end = int(raw["start"][0, j]), int(raw["end"][0, j])
      text = features.span_text(block, start, end)
      key = normalize_answer(text)
      if not text or key in seen:
        continue
      seen.add(key)
      retriever = float(raw["logits"][0, rank])
      score = float(raw["score"][0, j])
      answers.append(Answer(text, score, score - retriever, retriever, block_id, rank + 1, block.title, block.text,
                            (int(block.body_offsets[start, 0]), int(block.body_offsets[end, 1]))))
      if len(answers) == top:
        break
    return answers


def highlighted(answer: Answer):
  """The evidence block as rich Text with the answer span highlighted."""
  from rich.text import Text
  text = Text(answer.block_text)
  text.stylize("bold reverse", *answer.span_chars)
  return text
