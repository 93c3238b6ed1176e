"""The training pipeline end to end, each stage starting from the previous one's output, with the
README's commands and the smoke configs: BERT weights -> ICT -> REALM pre-training (encoder from
BERT, retriever from ICT) -> Open-QA fine-tuning (from REALM) -> evaluate.

What each stage loaded is checked from the weights, not only the logs: ICT leaves the encoder as
BERT's; REALM's bootstrap index is the ICT run's final retriever's embedding of the corpus (and not
BERT's); REALM's encoder is BERT's moved by at most its few AdamW steps; the fine-tuning run's
frozen index is REALM's final retriever's embedding; its reader's BERT is REALM's encoder moved by
at most its few steps; and `evaluate` retrieves with the fine-tuned query tower over that index.
"""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
from flax import nnx

from realm_jax import weights
from realm_jax.cli.main import main
from realm_jax.config import get_preset
from realm_jax.data import features
from realm_jax.data.corpus import CorpusReader
from realm_jax.data.qa import QAExample
from realm_jax.models import OpenQAModel, RealmModel
from realm_jax.openqa import features as qa_features
from realm_jax.retrieval import index as index_lib
from realm_jax.retrieval.embed import make_embed_fn
from realm_jax.storage import Storage
from realm_jax.train.trainer import load_parts
from tests.helpers.facts_corpus import write_documents

STEPS, LR = 2, 1e-3
# BERT's AdamW has no bias correction: one update moves a weight by at most lr * m/sqrt(v) <=
# lr * 0.1 / sqrt(0.001) ~ 3.2 lr (the first step; less later), plus the decay lr * 0.01 * |w|.
MAX_MOVE = STEPS * LR * 3.3
COMMON = [f"num_train_steps={STEPS}", f"checkpoint_every={STEPS}", "log_every=1", "async_checkpointing=false",
          f"learning_rate={LR}", "warmup_steps=1"]


def _params(module) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


def _max_diff(a, b) -> float:
  return max(float(np.abs(x - y).max()) for x, y in zip(_params(a), _params(b), strict=True))


def _doc_embeddings(embedder, corpus_root: str, block_len: int) -> np.ndarray:
  reader = CorpusReader(Storage.open(corpus_root))
  blocks = list(reader.iter_blocks())
  inputs = features.blocks_doc_inputs(blocks, block_len, reader.tokenizer())
  return make_embed_fn(embedder, batch_size=64)(inputs)


def _model(root_or_weights: str, kind=RealmModel, parts=None) -> nnx.Module:
  cfg = get_preset("tiny", block_len=64)
  model = kind(cfg, rngs=nnx.Rngs(99))
  load_parts(root_or_weights, model, parts)
  return model


def test_bert_ict_realm_finetune_evaluate_each_from_the_previous(tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="realm_jax")
  docs = write_documents(tmp_path / "facts.jsonl")
  questions = tmp_path / "questions.jsonl"
  questions.write_text("".join(json.dumps({"question": f"Where was {d['title']} born?", "answers": [d["city"]]})
                               + "\n" for d in docs))
  corpus = str(tmp_path / "corpus-root")
  assert main(["corpus", "build", "--input", str(tmp_path / "facts.jsonl"), "--storage", corpus, "--block-len", "64",
               "--quiet"]) == 0
  # BERT: tiny random weights stand in for `realm-jax convert hf --kind bert`'s output.
  bert_dir = str(tmp_path / "bert")
  cfg = get_preset("tiny", block_len=64)
  bert = RealmModel(cfg, rngs=nnx.Rngs(1))
  weights.save_weights(bert_dir, bert, cfg)

  corpus_uri = f"{corpus}/corpus"  # what `--corpus` names: the corpus itself (`<storage>/<prefix>`)
  ict, realm, qa = (str(tmp_path / name) for name in ("ict-run", "realm-run", "qa-run"))
  assert main(["ict", "--config", "ict_smoke", "--storage", ict, "--corpus", corpus_uri, "--init", bert_dir,
               "--set", *COMMON]) == 0
  assert main(["pretrain", "--config", "smoke", "--storage", realm, "--corpus", corpus_uri, "--init", bert_dir,
               "--synchronous-refresh", "--set", f"init_retriever={ict}", *COMMON]) == 0
  assert main(["finetune", "--config", "openqa_smoke", "--storage", qa, "--set", f"corpus={corpus_uri}",
               f"init={realm}", f"train_questions={questions}", "batch_size=8", "max_answers=2",
               "max_answer_tokens=4", *COMMON]) == 0
  preds = tmp_path / "preds.jsonl"
  assert main(["evaluate", "--storage", qa, "--questions", str(questions), "--limit", "8", "--out", str(preds),
               "--batch-size", "8"]) == 0
  log = "\n".join(r.getMessage() for r in caplog.records)
  assert f"initialised encoder, retriever from {bert_dir}" in log, log
  assert f"retriever from checkpoint step {STEPS} of {ict}" in log, log

  # ICT: trains the retriever only; its encoder is BERT's, its retriever moved from BERT's.
  ict_model = _model(ict)
  assert _max_diff(ict_model.encoder, bert.encoder) == 0.0
  assert 0 < _max_diff(ict_model.retriever, bert.retriever) <= MAX_MOVE

  # REALM: its bootstrap index (step 0) is the ICT retriever's embedding of the corpus, not BERT's.
  realm_index = index_lib.load_index(Storage.open(realm))
  assert realm_index.info.step == 0
  from_ict = _doc_embeddings(ict_model.retriever.doc_embedder, corpus, 64)
  np.testing.assert_allclose(realm_index.embeddings, from_ict, atol=2e-4)
  from_bert = _doc_embeddings(bert.retriever.doc_embedder, corpus, 64)
  assert np.abs(realm_index.embeddings - from_bert).max() > 1e-2
  realm_model = _model(realm)
  assert 0 < _max_diff(realm_model.encoder, bert.encoder) <= MAX_MOVE  # the encoder from BERT ...
  assert _max_diff(realm_model.encoder, RealmModel(cfg, rngs=nnx.Rngs(2)).encoder) > 10 * MAX_MOVE  # ... not another

  # Fine-tuning: the frozen index is REALM's final retriever's; the reader's BERT is REALM's encoder's.
  qa_index = index_lib.load_index(Storage.open(qa))
  from_realm = _doc_embeddings(realm_model.retriever.doc_embedder, corpus, 64)
  np.testing.assert_allclose(qa_index.embeddings, from_realm, atol=2e-4)
  assert np.abs(from_realm - from_ict).max() > 1e-3  # REALM moved the retriever: the check can tell
  qa_model = _model(qa, OpenQAModel)
  assert 0 < _max_diff(qa_model.reader.bert, realm_model.encoder.bert) <= MAX_MOVE

  # evaluate: the fine-tuned query tower's top blocks over that index.
  rows = [json.loads(line) for line in preds.read_text().splitlines()]
  assert len(rows) == 8
  tok = CorpusReader(Storage.open(corpus)).tokenizer()
  q = qa_features.encode_questions([QAExample(str(i), r["question"], []) for i, r in enumerate(rows)],
                                   tok, 16, with_answers=False)
  qa_model.eval()
  emb = np.asarray(qa_model.retriever.embed_queries(q["input_ids"], q["attention_mask"], q["token_type_ids"]))
  for r, e in zip(rows, emb):
    scores = qa_index.embeddings @ e
    k = len(r["retrieved"])
    assert k > 0 and set(r["retrieved"]) == set(np.argsort(-scores)[:k].tolist()), r
