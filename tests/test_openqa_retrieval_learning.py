"""Open-QA fine-tuning as ORQA does it: the query tower learns against a fixed index, the reader
reads several blocks, and it has to read the question.

16 invented people, two blocks each: a biography ("X was born in C. X worked as a J.") and a travel
note ("X travelled to C2 every summer. X often visited C3.", two other cities). Two questions per
person, "Where was X born?" -> C and "What was the occupation of X?" -> J, all 32 fine-tuned on and
evaluated. Every tower starts from the packaged MiniLM-L6, the span head is fresh; the index is
built once from the initial tower and stays fixed (ORQA), the query tower and the reader are
trained, and the reader reads the top 3 blocks.

Retrieval: the untrained query tower ranks X's travel note above the biography for half the
questions; fine-tuning moves the query tower (only it can change retrieval against the fixed
index) and recall@1 of the biography rises to ~1 (the test's 32 steps: 0.50 -> 1.00 in seed 0,
0.47 -> 0.97 in seed 1). With the query tower's gradient cut (`stop_gradient` on the question
embedding) the tower moves by less than 1e-4 (weight decay, 2e-5) and recall@1 stays at 0.50
(seed 0, 48 steps): the test fails.

Reading: both answers of a person are in the same biography, so a reader that ignores the question
scores that block's spans the same way for both questions and gets at most one of the two right:
exact match <= 0.5 and no person with both answers right. Measured with the question hidden from
the reader (every question replaced by the same `[CLS]` + six `[UNK]` + `[SEP]` in the reader's
input; retrieval unchanged), seed 0, 48 steps: exact match 0 -> 0.50, the same answer to both
questions for all 16 people, none with both right. Reading the question, 48 steps: exact match
0 -> 0.91 with 13 of 16 people both right (seed 1: 0.03 -> 0.97, 15 of 16); the test's 32 steps:
0.88 with 12 (seed 1: 0.94, 14). Hiding the question's words but not its length is not enough:
that reader told the longer question from the shorter one and got 9 people both right.
An earlier version asked "Where was X born / buried?" of a biography holding both cities; in 48-200
steps the reader never learned to tell birth from burial (exact match ~0.5, as the blind reader).
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
QUERY_CHANGE, RECALL_GAIN = 0.005, 0.05
# A reader that ignores the question reaches at most 0.5 and no person with both answers right.
LEARNED_EM, BOTH_RIGHT = 0.75, NUM_PEOPLE // 2


def _corpus(path, seed: int = 0) -> list[QAExample]:
  """Writes the documents JSONL; returns the questions (born, occupation) of every person."""
  rng = np.random.default_rng(seed)
  cities = [str(c) for c in ONE_PIECE_CITIES]
  docs, questions = [], []
  for i, name in enumerate(invented_names(NUM_PEOPLE, seed=seed)):
    born, job = str(rng.choice(cities)), JOBS[i % len(JOBS)]
    went, visited = rng.choice([c for c in cities if c != born], 2, replace=False)
    docs += [{"title": name, "text": f"{name} was born in {born}. {name} worked as a {job}."},
             {"title": f"{name} travels", "text": f"{name} travelled to {went} every summer. {name} often visited "
                                                  f"{visited}."}]
    questions += [QAExample(f"{name}-born", f"Where was {name} born?", [born]),
                  QAExample(f"{name}-job", f"What was the occupation of {name}?", [job])]
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
      num_train_steps=32, warmup_steps=2, log_every=10, checkpoint_every=80, async_checkpointing=False)
  tuner = Finetuner(cfg, str(tmp_path / name), questions=questions, log_fn=lambda m: None)
  evaluator = Evaluator(tuner.model, cfg.model, tuner.tables, index_lib.load_index(tuner.storage).embeddings,
                        tuner.mesh, batch_size=16, recall_ks=(1, READER_BEAM))
  index_before = np.array(index_lib.load_index(tuner.storage).embeddings)
  _, before = evaluator.evaluate(questions, name)
  query_before = _params(tuner.model.retriever)
  tuner.model.train()
  tuner.run()
  predictions, after = evaluator.evaluate(questions, name)
  query_after = _params(tuner.model.retriever)
  change = np.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(query_after, query_before)))
  norm = np.sqrt(sum(float((b ** 2).sum()) for b in query_before))
  assert np.array_equal(np.array(index_lib.load_index(tuner.storage).embeddings), index_before)  # index fixed
  return {"before": before, "after": after, "query_change": change / norm, "predictions": predictions}


def test_query_tower_learns_retrieval_and_the_reader_reads_the_question(tmp_path):
  questions = _corpus(tmp_path / "docs.jsonl")
  learned = _finetune(tmp_path, "learned", questions)
  b, a = learned["before"], learned["after"]
  print(f"recall@1 {b.recall[1]:.3f} -> {a.recall[1]:.3f}, recall@{READER_BEAM} {b.recall[READER_BEAM]:.3f} -> "
        f"{a.recall[READER_BEAM]:.3f}; query tower moved {learned['query_change']:.4f} (relative); EM "
        f"{b.exact_match:.3f} -> {a.exact_match:.3f}")
  right = [p["correct"] for p in learned["predictions"]]
  both = sum(born and job for born, job in zip(right[::2], right[1::2]))  # questions come in (born, job) pairs
  print(f"people with both answers right: {both} of {NUM_PEOPLE}")
  assert learned["query_change"] >= QUERY_CHANGE
  assert a.recall[1] >= b.recall[1] + RECALL_GAIN and a.recall[1] >= 0.9
  assert b.exact_match <= 1 / 16 and a.exact_match >= LEARNED_EM
  assert both >= BOTH_RIGHT
