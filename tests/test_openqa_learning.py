"""Fine-tuning learns: on a corpus of invented facts, exact match on held-out people rises.

32 invented people, one block each ("X was born in CITY. ..."); the model (every tower from the
packaged MiniLM-L6 BERT, fresh span head) is fine-tuned on the questions about 16 of them
("Where was X born?" -> city) and evaluated on the other 16, whose names and cities it never saw.
The reader reads the top retrieved block (reader beam 1) and the query tower is frozen, so the
retrieval of held-out people stays the initial one (MiniLM: top-1 recall ~1 here) and what must be
learned is to find the answer span in a block: held-out exact match goes from 0 to near recall@1.
(A random-initialised tiny model retrieves these people at chance, and a reader that reads several
blocks memorises the 16 training blocks instead; both were tried.)
"""

import json

import numpy as np

from realm_jax.config import get_preset
from realm_jax.data.corpus import build_corpus
from realm_jax.data.qa import QAExample
from realm_jax.openqa.config import FinetuneConfig
from realm_jax.openqa.evaluate import Evaluator
from realm_jax.openqa.finetune import Finetuner
from realm_jax.retrieval import index as index_lib
from realm_jax.storage import Storage

CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo", "Athens",
          "Warsaw", "Budapest", "Brussels", "Helsinki", "Stockholm", "Tokyo", "Cairo", "Lima", "Moscow", "Delhi",
          "Sydney", "Toronto", "Chicago", "Boston", "Seoul", "Bangkok", "Nairobi", "Havana", "Manila", "Dakar", "Quito"]


def _names(n: int) -> list[str]:
  rng = np.random.default_rng(7)
  first, middle, last = ["Zor", "Quen", "Mav", "Tel", "Brun", "Oss", "Pyr", "Kel"], ["bla", "dri", "ro", "vi"], \
      ["t", "x", "ndel", "wick"]
  names = sorted({rng.choice(first) + rng.choice(middle) + rng.choice(last) for _ in range(200)})
  return [str(x) for x in rng.permutation(names)[:n]]


def test_finetuning_raises_held_out_exact_match(tmp_path):
  names = _names(len(CITIES))
  docs = [{"title": n, "text": f"{n} was born in {c}. {n} worked as a cartographer for many years. "
                               f"Later {n} moved to a small village near the coast."} for n, c in zip(names, CITIES)]
  (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  build_corpus([str(tmp_path / "docs.jsonl")], Storage.open(str(tmp_path / "root")), block_len=48)
  questions = [QAExample(f"{n}", f"Where was {n} born?", [c]) for n, c in zip(names, CITIES)]
  train, held = questions[:16], questions[16:]

  cfg = FinetuneConfig(
      model=get_preset("minilm", query_len=16, block_len=48, reader_len=40, reader_beam_size=1), init="minilm",
      retriever_beam_size=8, train_query_tower=False, batch_size=8, max_answers=1, max_answer_tokens=4,
      learning_rate=1e-4, num_train_steps=20, warmup_steps=2, log_every=2, checkpoint_every=20,
      async_checkpointing=False)
  tuner = Finetuner(cfg, str(tmp_path / "root"), questions=train, log_fn=lambda m: None)
  embeddings = index_lib.load_index(tuner.storage).embeddings
  evaluator = Evaluator(tuner.model, cfg.model, tuner.tables, embeddings, tuner.mesh, batch_size=16, recall_ks=(1,))
  _, before = evaluator.evaluate(held, "held-out")
  _, before_train = evaluator.evaluate(train, "train")
  tuner.model.train()
  result = tuner.run()
  assert result.history[-1]["reader_loss"] < 0.5 * result.history[0]["reader_loss"]
  preds, after = evaluator.evaluate(held, "held-out")
  _, after_train = evaluator.evaluate(train, "train")
  print(f"held-out EM {before.exact_match:.3f} -> {after.exact_match:.3f} (recall@1 {after.recall[1]:.3f}); "
        f"train EM {before_train.exact_match:.3f} -> {after_train.exact_match:.3f}")
  assert after.recall == before.recall  # retrieval untouched: the gain is the reader's
  assert before.exact_match <= 1 / 16 and after.recall[1] >= 0.75
  assert after.exact_match >= before.exact_match + 0.5
  # Where the top block holds the answer, the trained reader extracts it.
  top1_right = [p for p in preds if p["first_hit_rank"] == 1]
  assert np.mean([p["correct"] for p in top1_right]) >= 0.8
