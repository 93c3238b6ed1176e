"""The REALM learning recipe at CPU scale, shared by `tests/test_realm_learning.py` and
`benchmarks/learning.py`: invented facts, an encoder taught to read, then the real `Trainer`.

48 invented people, one fact block each ("X was born in CITY. X worked as a JOB."); the masked
queries come from a separate corpus ("The hometown of X is [MASK]." / "X grew up in [MASK]."), so
the masked city can only be recovered by retrieving that person's block. The run starts from a
*random* retriever (tiny towers) and an encoder that can read (`tests/helpers/reading.py`, taught
on 300 other invented people), and measures what REALM pre-training does to recall@8 of the fact
block and to the top-1 retrieval utility over the null document (`top1_utility`: the target
log-likelihood given the best-scored retrieved block minus that given the null document).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from realm_jax import weights
from realm_jax.config import get_preset
from realm_jax.data.corpus import CorpusReader
from realm_jax.models.realm import RealmModel
from realm_jax.storage import Storage
from realm_jax.train import device_corpus
from realm_jax.train.config import TrainConfig
from realm_jax.train.trainer import Trainer
from tests.helpers.facts_corpus import build_fact_corpora, small_tokenizer
from tests.helpers.reading import fact_queries, reading_accuracy, teach_reading

PEOPLE, QUERY_LEN, BLOCK_LEN = 48, 24, 32


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What a learning run does; the defaults are the recipe the test asserts on."""

  seed: int = 0  # model init, reading data and the trainer's data order
  reading: bool = True  # False: the control, an encoder that cannot read
  copy_steps: int = 250
  hedge_steps: int = 200
  hedge_own: float = 0.15  # share of hedging examples that show the person's own block
  hedge_null: float = 0.2  # ... the null document (the rest: another person's block)
  copy_lr: float = 1e-3
  hedge_lr: float = 2e-4  # calibrates the copier's confidence without undoing the copying
  num_candidates: int = 24
  steps: int = 60
  batch_size: int = 32
  learning_rate: float = 3e-4
  encoder_lr_mult: float = 0.1
  refresh_every: int = 5


@dataclasses.dataclass
class Result:
  recipe: Recipe
  recall_before: float
  recall_after: float
  reading: dict[str, float]  # held-out reading accuracy with the own block / another / the null doc
  utility_first10: float
  utility_last10: float
  mlm_accuracy_first10: float
  mlm_accuracy_last10: float
  entropy_first: float
  entropy_last: float
  seconds: float
  history: list[dict]

  def line(self) -> str:
    return (f"recall@8 {self.recall_before:.3f} -> {self.recall_after:.3f}; retrieval utility first 10 steps "
            f"{self.utility_first10:+.3f}, last 10 {self.utility_last10:+.3f}; p(z|x) entropy "
            f"{self.entropy_first:.2f} -> {self.entropy_last:.2f}; MLM accuracy {self.mlm_accuracy_first10:.2f} "
            f"-> {self.mlm_accuracy_last10:.2f}; reading accuracy (own/other/null block) "
            f"{self.reading.get('own', float('nan')):.2f}/{self.reading.get('other', float('nan')):.2f}/"
            f"{self.reading.get('null', float('nan')):.2f}")


def recall_at(model, storage, people, k: int = 8) -> np.ndarray:
  """Per query of the query corpus: is its person's fact block among the top k by brute force?"""
  corpus = CorpusReader(storage, "corpus")
  tok = corpus.tokenizer()
  doc = device_corpus.host_token_rows(list(corpus.iter_blocks()), BLOCK_LEN, tok)
  queries = fact_queries(storage, QUERY_LEN)
  d = np.asarray(model.retriever.embed_docs(*device_corpus.doc_inputs_from_tokens(jnp.asarray(doc), tok.pad_id,
                                                                                  tok.sep_id)))
  q = np.asarray(model.retriever.embed_queries(jnp.asarray(queries["input_ids"]),
                                               jnp.asarray(queries["attention_mask"]),
                                               jnp.asarray(queries["token_type_ids"])))
  top = np.argsort(-(q @ d.T), axis=1)[:, :k]
  gold = np.empty(len(q), np.int64)
  for p in people:
    gold[p["query_block_ids"]] = p["block_id"]
  return np.array([g in t for g, t in zip(gold, top)])


def run(workdir: str | pathlib.Path, recipe: Recipe = Recipe()) -> Result:
  """Teaches the encoder to read (unless `recipe.reading` is False), then runs REALM pre-training
  with the real Trainer (synchronous re-index every `refresh_every` steps) in `workdir`."""
  t0 = time.perf_counter()
  workdir = pathlib.Path(workdir)
  tok = small_tokenizer()
  root = Storage.open(str(workdir / "root"))
  people = build_fact_corpora(root, n=PEOPLE, tokenizer=tok, block_len=BLOCK_LEN)
  model_cfg = get_preset("tiny", query_len=QUERY_LEN, block_len=BLOCK_LEN, num_candidates=recipe.num_candidates,
                         retrieval_dropout=0.0,
                         **{"bert.vocab_size": 256, "bert.dropout_rate": 0.0})
  model = RealmModel(model_cfg, rngs=nnx.Rngs(recipe.seed))
  reading = {}
  if recipe.reading:
    # Taught on 300 invented people, measured on 48 others; neither set is the test's people.
    others = Storage.open(str(workdir / "others"))
    build_fact_corpora(others, n=300, tokenizer=tok, block_len=BLOCK_LEN, first_name=2 * PEOPLE, seed=1)
    held_out = Storage.open(str(workdir / "held_out"))
    build_fact_corpora(held_out, n=PEOPLE, tokenizer=tok, block_len=BLOCK_LEN, first_name=PEOPLE, seed=2)
    teach_reading(model.encoder, others, query_len=QUERY_LEN, block_len=BLOCK_LEN, steps=recipe.copy_steps,
                  own_block=1.0, null_block=0.0, learning_rate=recipe.copy_lr, seed=2 * recipe.seed)
    teach_reading(model.encoder, others, query_len=QUERY_LEN, block_len=BLOCK_LEN, steps=recipe.hedge_steps,
                  own_block=recipe.hedge_own, null_block=recipe.hedge_null, learning_rate=recipe.hedge_lr,
                  seed=2 * recipe.seed + 1)
    reading = reading_accuracy(model.encoder, held_out, query_len=QUERY_LEN, block_len=BLOCK_LEN)
  weights.save_weights(str(workdir / "init"), model, model_cfg)

  cfg = TrainConfig(model=model_cfg, task="realm", query_corpus_prefix="queries", max_masks=1,
                    batch_size=recipe.batch_size, learning_rate=recipe.learning_rate,
                    lr_mults=(("^encoder/", recipe.encoder_lr_mult),), num_train_steps=recipe.steps,
                    warmup_steps=max(1, recipe.steps // 10), index_refresh="sync",
                    sync_refresh_every=recipe.refresh_every, log_every=1, checkpoint_every=10_000,
                    async_checkpointing=False, init=str(workdir / "init"), seed=recipe.seed)
  trainer = Trainer(cfg, str(workdir / "root"), log_fn=lambda m: None)
  before = recall_at(trainer.model, root, people)
  hist = trainer.run().history
  after = recall_at(trainer.model, root, people)
  utility = [h["top1_utility"] for h in hist]  # top-1 block vs null document, per example
  accuracy = [h["mlm_accuracy"] for h in hist]
  return Result(recipe, float(before.mean()), float(after.mean()), reading,
                float(np.mean(utility[:10])), float(np.mean(utility[-10:])),
                float(np.mean(accuracy[:10])), float(np.mean(accuracy[-10:])),
                hist[0]["p_z_entropy"], hist[-1]["p_z_entropy"], time.perf_counter() - t0, hist)
