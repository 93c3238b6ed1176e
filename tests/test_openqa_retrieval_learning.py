"""Open-QA fine-tuning as ORQA does it: the query tower learns against a fixed index, the reader
reads several blocks.

16 invented people, two blocks each: a biography ("X was born in C1. X was buried in C2. X worked
as a J.", the two sentences in either order) and a travel note ("X travelled to C3 every summer. X
often visited C4."), four different cities. The questions are "Where was X born?" -> C1 and "Where
was X buried?" -> C2, all 32 fine-tuned on and evaluated. Every tower starts from the packaged
MiniLM-L6, the span head is fresh; the index is built once from the initial tower and stays fixed
(ORQA), the query tower and the reader are trained, and the reader reads the top 3 blocks.

The untrained query tower ranks X's travel note first for 1 question in 8 to 10; fine-tuning
moves the query tower (only it can change retrieval against the fixed index) and recall@1 of the
biography rises to ~1 (seed 0, the test's 48 steps: 0.875 -> 1.0; 80 steps, two seeds: 0.875 ->
0.969, 0.906 -> 1.0). With the query tower's gradient
cut (`stop_gradient` on the question embedding) the tower moves only by weight decay (2e-5) and
recall stays at 0.875: the test fails.
The reader learns to answer with a city of the biography (exact match 0 -> 0.53 in 48 steps, 0.5
in 80), but it does not learn to tell birth from burial: 0.5 is what a reader that ignores the
question reaches here (a 40-step run of a "died" variant with the question hidden from the
reader reached the same exact match as one that saw it). Nor in 200 steps with the span head at
20x and the rest of the reader at 4x the rate (`lr_mults`: exact match 0.47, the same answer to
both questions of 15 of the 16 people); a rate of 2e-4 or 5e-4 for everything collapses retrieval
(recall@1 0.875 -> 0.09 / 0.125).
"""

import json

import jax
import numpy as np
from flax import nnx

from realm_jax.config import get_preset
from realm_jax.data.corpus import build_corpus
from realm_jax.data.qa import QAExample
from realm_jax.openqa.config import FinetuneConfig
from realm_jax.openqa.evaluate import Evaluator
from realm_jax.openqa.finetune import Finetuner
from realm_jax.retrieval import index as index_lib
from realm_jax.storage import Storage
from tests.helpers.facts_corpus import JOBS, ONE_PIECE_CITIES, invented_names

NUM_PEOPLE = 16
READER_BEAM = 3
QUERY_CHANGE, RECALL_GAIN, LEARNED_EM = 0.005, 0.05, 0.4


def _corpus(path, seed: int = 0) -> list[QAExample]:
  """Writes the documents JSONL; returns the questions (born, buried) of every person."""
  rng = np.random.default_rng(seed)
  cities = [str(c) for c in ONE_PIECE_CITIES]
  docs, questions = [], []
  for i, name in enumerate(invented_names(NUM_PEOPLE, seed=seed)):
    born, buried = (cities[j] for j in rng.choice(len(cities), 2, replace=False))
    facts = [f"{name} was born in {born}.", f"{name} was buried in {buried}."]
    bio = " ".join(facts if rng.random() < 0.5 else facts[::-1]) + f" {name} worked as a {JOBS[i % len(JOBS)]}."
    went, visited = rng.choice([c for c in cities if c not in (born, buried)], 2, replace=False)
    docs += [{"title": name, "text": bio},
             {"title": f"{name} travels", "text": f"{name} travelled to {went} every summer. {name} often visited "
                                                  f"{visited}."}]
    questions += [QAExample(f"{name}-born", f"Where was {name} born?", [born]),
                  QAExample(f"{name}-buried", f"Where was {name} buried?", [buried])]
  path.write_text("".join(json.dumps(d) + "\n" for d in docs))
  return questions


def _params(module) -> list[np.ndarray]:
  return [np.array(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


def _finetune(tmp_path, name: str, questions: list[QAExample]) -> dict:
  """One fine-tuning run on its own copy of the corpus; metrics before and after."""
  build_corpus([str(tmp_path / "docs.jsonl")], Storage.open(str(tmp_path / name)), block_len=32)
  cfg = FinetuneConfig(
      model=get_preset("minilm", query_len=16, block_len=32, reader_len=48, reader_beam_size=READER_BEAM),
      init="minilm", retriever_beam_size=8, batch_size=8, max_answers=1, max_answer_tokens=4, learning_rate=5e-5,
      num_train_steps=48, warmup_steps=2, log_every=10, checkpoint_every=80, async_checkpointing=False)
  tuner = Finetuner(cfg, str(tmp_path / name), questions=questions, log_fn=lambda m: None)
  evaluator = Evaluator(tuner.model, cfg.model, tuner.tables, index_lib.load_index(tuner.storage).embeddings,
                        tuner.mesh, batch_size=16, recall_ks=(1, READER_BEAM))
  index_before = np.array(index_lib.load_index(tuner.storage).embeddings)
  _, before = evaluator.evaluate(questions, name)
  query_before = _params(tuner.model.retriever)
  tuner.model.train()
  tuner.run()
  _, after = evaluator.evaluate(questions, name)
  query_after = _params(tuner.model.retriever)
  change = np.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(query_after, query_before)))
  norm = np.sqrt(sum(float((b ** 2).sum()) for b in query_before))
  assert np.array_equal(np.array(index_lib.load_index(tuner.storage).embeddings), index_before)  # index fixed
  return {"before": before, "after": after, "query_change": change / norm}


def test_query_tower_learns_retrieval_with_a_reader_beam_of_three(tmp_path):
  questions = _corpus(tmp_path / "docs.jsonl")
  learned = _finetune(tmp_path, "learned", questions)
  b, a = learned["before"], learned["after"]
  print(f"recall@1 {b.recall[1]:.3f} -> {a.recall[1]:.3f}, recall@{READER_BEAM} {b.recall[READER_BEAM]:.3f} -> "
        f"{a.recall[READER_BEAM]:.3f}; query tower moved {learned['query_change']:.4f} (relative); EM "
        f"{b.exact_match:.3f} -> {a.exact_match:.3f}")
  assert learned["query_change"] >= QUERY_CHANGE
  assert a.recall[1] >= b.recall[1] + RECALL_GAIN and a.recall[1] >= 0.9
  assert b.exact_match <= 1 / 16 and a.exact_match >= LEARNED_EM
