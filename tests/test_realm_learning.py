"""REALM's retriever learns where to look from the masked-language-model signal alone.

48 invented people, each with one fact block ("X was born in CITY. X worked as a JOB."); the
masked queries come from a separate corpus ("The hometown of X is [MASK]." / "X grew up in
[MASK]."), so the masked city can only be recovered by retrieving that person's block.

Starting point, REALM's scaled down: a *random* retriever (tiny towers) and an encoder that can
read — it copies a city from a block put next to the query, hedged because it cannot tell whose
block it is (taught on 300 other invented people, never these; BERT's initialisation plays that
part in the paper). Then `Trainer` runs REALM pre-training with k = 24 candidates (23 retrieved
+ null) and a synchronous re-index every 5 steps. Only the marginal likelihood of the masked city
trains the retriever; the test asserts that the retrieval utility over the null document becomes
clearly positive and recall@8 of the fact block rises from its random start (~0.3-0.4) to >= 0.8;
and, as a control, that with an encoder that cannot read the same run leaves the retriever where it
was (so what moved it is what the encoder got out of the retrieved block).

What it took (tiny towers on CPU; each found by a run that did not learn):
- dropout off: the random towers' [CLS] embeddings differ by less than the dropout noise (cosine
  0.9999 between any two blocks), so neither ICT nor REALM learned anything with dropout 0.1;
- an encoder that hedges: one that copies every block with full confidence makes each wrong
  candidate far worse than the null document, and the retriever only learns to pick the null doc;
- a slow encoder (`lr_mults` 0.1): at the retriever's rate it memorises the 96 queries within ~50
  steps, after which the null document explains everything and the retriever collapses;
- enough candidates: with k = 8 the person's block is rarely among a random retriever's
  candidates (7 of 48) and learning is slow and seed-dependent; an ICT warm start (which finds
  "X grew up in" but not "The hometown of X is") gave scores too peaked to move in 150 steps.
"""

from __future__ import annotations

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
from tests.helpers.reading import fact_queries, teach_reading

PEOPLE, QUERY_LEN, BLOCK_LEN = 48, 24, 32


def recall_at(model, storage, people, k: int = 8) -> np.ndarray:
  """Per query of the query corpus: is its person's fact block among the top k by brute force?"""
  corpus = CorpusReader(storage, "corpus")
  tok = corpus.tokenizer()
  blocks = list(corpus.iter_blocks())
  doc, _ = device_corpus.host_token_tables(blocks, BLOCK_LEN, tok)
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


def realm_run(tmp_path, reading: bool) -> tuple[np.ndarray, np.ndarray, list[dict]]:
  """Recall@8 per query before and after 60 REALM steps, and the trainer's per-step metrics;
  `reading=False` skips teaching the encoder to read (the control)."""
  tok = small_tokenizer()
  root = Storage.open(str(tmp_path / "root"))
  people = build_fact_corpora(root, n=PEOPLE, tokenizer=tok, block_len=BLOCK_LEN)
  model_cfg = get_preset("tiny", query_len=QUERY_LEN, block_len=BLOCK_LEN, num_candidates=24,
                         **{"bert.vocab_size": 256, "bert.dropout_rate": 0.0})
  model = RealmModel(model_cfg, rngs=nnx.Rngs(0))
  if reading:
    others = Storage.open(str(tmp_path / "others"))
    build_fact_corpora(others, n=300, tokenizer=tok, block_len=BLOCK_LEN, first_name=PEOPLE, seed=1)
    copy = teach_reading(model.encoder, others, query_len=QUERY_LEN, block_len=BLOCK_LEN, steps=250, own_block=1.0,
                         null_block=0.0)
    hedge = teach_reading(model.encoder, others, query_len=QUERY_LEN, block_len=BLOCK_LEN, steps=200,
                          own_block=0.3, null_block=0.2, seed=1)
    assert copy[-1] < 0.5 and hedge[-1] < copy[0], (copy, hedge)  # it reads before REALM starts
  weights.save_weights(str(tmp_path / "init"), model, model_cfg)

  cfg = TrainConfig(model=model_cfg, task="realm", query_corpus_prefix="queries", max_masks=1, batch_size=16,
                    learning_rate=2e-4, lr_mults=(("^encoder/", 0.1),), num_train_steps=60, warmup_steps=6,
                    index_refresh="sync", sync_refresh_every=5, log_every=1, checkpoint_every=1000,
                    async_checkpointing=False, init=str(tmp_path / "init"))
  trainer = Trainer(cfg, str(tmp_path / "root"), log_fn=lambda m: None)
  before = recall_at(trainer.model, root, people)
  hist = trainer.run().history
  after = recall_at(trainer.model, root, people)
  util = [h["retrieval_utility"] for h in hist]
  print(f"reading={reading}: recall@8 {before.mean():.3f} -> {after.mean():.3f}; retrieval utility first 10 "
        f"steps {np.mean(util[:10]):+.3f}, last 10 {np.mean(util[-10:]):+.3f}; p(z|x) entropy "
        f"{hist[0]['p_z_entropy']:.2f} -> {hist[-1]['p_z_entropy']:.2f}; MLM accuracy "
        f"{np.mean([h['mlm_accuracy'] for h in hist[:10]]):.2f} -> {np.mean([h['mlm_accuracy'] for h in hist[-10:]]):.2f}")
  return before, after, hist


def test_retriever_learns_where_to_look_from_the_mlm_signal(tmp_path):
  before, after, hist = realm_run(tmp_path, reading=True)
  assert np.mean([h["retrieval_utility"] for h in hist[-10:]]) > 0.5
  assert after.mean() >= 0.8 and after.mean() >= before.mean() + 0.3


def test_control_an_encoder_that_cannot_read_teaches_the_retriever_nothing(tmp_path):
  """The same run with a random encoder: the person's block does not help it predict the city, so
  the marginal likelihood has no preference among candidates and the retriever stays where it was."""
  before, after, hist = realm_run(tmp_path, reading=False)
  assert abs(np.mean([h["retrieval_utility"] for h in hist[-10:]])) < 0.05
  assert after.mean() <= before.mean() + 0.1
