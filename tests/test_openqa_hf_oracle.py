"""Our batched retrieve-and-read against transformers 4.40.2 `RealmForOpenQA` as the oracle.

A random-initialised (and perturbed) tiny HF RealmForOpenQA is converted into our OpenQAModel;
both search the same block embeddings over the same blocks (HF through a `RealmRetriever` with
the block texts and a WordPiece tokenizer on the MiniLM vocab). For several questions, one HF
call per question against one batched call of ours: the same retrieved blocks, the same span
logits, the same predicted block/span/answer, and the same ORQA losses.
"""

import json

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from realm_jax.config import get_preset
from realm_jax.convert import hf as hfconv
from realm_jax.data import sources
from realm_jax.data.corpus import build_corpus
from realm_jax.data.qa import QAExample
from realm_jax.models import OpenQAModel
from realm_jax.openqa import features, loading
from realm_jax.openqa.evaluate import Evaluator
from realm_jax.openqa.step import finetune_loss, predict
from realm_jax.parallel import make_mesh
from realm_jax.storage import Storage

NAMES = ["Zorblat", "Quendry", "Mavrik", "Tellosa", "Brundig", "Ossiwen", "Pyrrhane", "Kelvaro", "Drusilde", "Vantrope"]
CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo"]
CFG = get_preset("tiny", query_len=24, block_len=48, reader_len=96, reader_beam_size=3)
QUESTIONS = [("where was zorblat born?", "paris"), ("who moved to the coast?", "mavrik"),
             ("what did tellosa do for many years?", "cartographer"), ("where is brundig from?", "madrid"),
             ("which city is the home of the harbour?", "oslo")]


class RecordingRetriever(transformers.RealmRetriever):
  """HF's retriever, remembering which block ids the model asked for."""

  def __call__(self, retrieved_block_ids, *args, **kwargs):
    self.last_ids = retrieved_block_ids.numpy().copy()
    return super().__call__(retrieved_block_ids, *args, **kwargs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("oracle")
  docs = [{"title": n, "text": f"{n} was born in {c}. {n} worked as a cartographer for many years. "
                               f"Later {n} moved to a small village near the coast of {CITIES[(i + 3) % 10]}."}
          for i, (n, c) in enumerate(zip(NAMES, CITIES))]
  (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  storage = Storage.open(str(root))
  build_corpus([str(root / "docs.jsonl")], storage, block_len=CFG.block_len)
  tables = loading.load_corpus(storage, "corpus", CFG)
  n = tables.num_blocks
  embeddings = np.random.default_rng(0).normal(size=(n, CFG.retriever_dim)).astype(np.float32)

  hf_cfg = transformers.RealmConfig(**hfconv.hf_config_dict(CFG), num_block_records=n, searcher_beam_size=n)
  tokenizer = transformers.BertTokenizerFast(vocab_file=str(sources.minilm_dir() / "vocab.txt"))
  records = np.array([b.text.encode() for b in tables.reader.iter_blocks()], dtype=object)
  torch.manual_seed(0)
  hf = transformers.RealmForOpenQA(hf_cfg, retriever=RecordingRetriever(records, tokenizer))
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(torch.randn(p.shape, generator=g) * 0.05)
    hf.block_emb.copy_(torch.from_numpy(embeddings))
  hf.eval()

  model = OpenQAModel(CFG, rngs=nnx.Rngs(1))
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  emb_sd = {k: v for k, v in sd.items() if k.startswith("embedder.")}
  hfconv.load_state_dict(model.retriever.query_embedder, emb_sd, hfconv.embedder_rules("embedder."),
                         skip=hfconv.SKIP_EMBEDDER, source="RealmForOpenQA.embedder")
  reader_sd = {k: v for k, v in sd.items() if k.startswith("reader.")}
  hfconv.load_state_dict(model.reader, reader_sd, hfconv.reader_rules("reader."), skip=hfconv.SKIP_READER,
                         source="RealmForOpenQA.reader")
  model.eval()
  mesh = make_mesh()
  return dict(hf=hf, tokenizer=tokenizer, model=model, tables=tables, embeddings=embeddings, mesh=mesh)


def _hf_run(s, question, answer=None):
  hf, tokenizer = s["hf"], s["tokenizer"]
  captured = {}

  def hook(module, inputs, output):
    captured["logits"], captured["starts"], captured["ends"] = (o.detach().clone() for o in output)

  handle = hf.reader.qa_outputs.register_forward_hook(hook)
  try:
    q = tokenizer([question], return_tensors="pt")
    answer_ids = None if answer is None else tokenizer([answer], add_special_tokens=False).input_ids
    with torch.no_grad():
      out = hf(**q, answer_ids=answer_ids, return_dict=True)
  finally:
    handle.remove()
  return out, captured, hf.retriever.last_ids


def test_retrieval_span_logits_and_answers_match_hf(setup):
  s = setup
  examples = [QAExample(f"q{i}", q, [a]) for i, (q, a) in enumerate(QUESTIONS)]
  corpus = loading.reader_corpus(s["tables"], s["embeddings"], CFG, s["mesh"])
  batch = features.encode_questions(examples, s["tables"].tok, CFG.query_len, with_answers=False)
  ours = predict(s["model"], batch, corpus, CFG.reader_beam_size, with_logits=True)
  evaluator = Evaluator(s["model"], CFG, s["tables"], s["embeddings"], s["mesh"], batch_size=8,
                        recall_ks=(CFG.reader_beam_size,))
  answered = evaluator.answer(examples)
  # HF and we must retrieve the same blocks in the same order. That is a fair demand on every CPU
  # only where no two of the top scores are closer than float32 rounding of 128-d dot products
  # (~1e-4 here): this fixture's questions have none, and a future fixture that has some fails here.
  q = s["model"].retriever.embed_queries(*(np.asarray(batch[k]) for k in ("input_ids", "attention_mask",
                                                                         "token_type_ids")))
  top = -np.sort(-(np.asarray(q, np.float64) @ s["embeddings"].T.astype(np.float64)), axis=1)
  assert np.min(-np.diff(top[:, :CFG.reader_beam_size + 1], axis=1)) > 1e-3, "near-tied retrieval scores"
  checked_spans = 0
  for i, ex in enumerate(examples):
    out, cap, hf_ids = _hf_run(s, ex.question)
    np.testing.assert_array_equal(np.asarray(ours["ids"][i]), hf_ids)  # same blocks, same order
    # HF's reader inputs are the same tokens (padded to the longest, ours to reader_len).
    hf_inputs = s["hf"].retriever(torch.from_numpy(hf_ids), s["tokenizer"]([ex.question]).input_ids, None,
                                  max_length=CFG.reader_len)[3]
    width = hf_inputs.input_ids.shape[1]
    ours_ids = np.asarray(ours["reader_input_ids"][i])
    np.testing.assert_array_equal(ours_ids[:, :width], hf_inputs.input_ids.numpy())
    assert not ours_ids[:, width:].any()
    # Span logits: ours carry the retriever logit; HF's reader adds it after the projection.
    ours_logits = np.asarray(ours["logits"][i]) - np.asarray(ours["scores"][i, :CFG.reader_beam_size])[:, None]
    ours_spans = {(int(a), int(b)): j for j, (a, b) in enumerate(zip(ours["starts"], ours["ends"]))}
    hf_logits = cap["logits"].numpy()
    valid = hf_logits > -1e30
    for j, (a, b) in enumerate(zip(cap["starts"].numpy(), cap["ends"].numpy())):
      k = ours_spans[(int(a), int(b))]
      assert np.array_equal(valid[:, j], np.asarray(ours["logits"][i])[:, k] > -1e30)
      if valid[:, j].any():  # span logits ~10 after 2 layers + projection: float32 rounding ~5e-6
        np.testing.assert_allclose(ours_logits[valid[:, j], k], hf_logits[valid[:, j], j], atol=2e-5, rtol=0)
        checked_spans += 1
    # The prediction: block, span and the answer's tokens.
    reader_out = out.reader_output
    assert int(ours["block"][i]) == reader_out.block_idx.item()
    offset = int(ours["offset"][i])
    assert int(ours["start"][i]) + offset == reader_out.start_pos.item()
    assert int(ours["end"][i]) + offset == reader_out.end_pos.item()
    block = s["tables"].block(answered[i]["block_id"])
    assert answered[i]["block_id"] == int(hf_ids[reader_out.block_idx.item()])
    span_ids = block.body_ids[answered[i]["span_tokens"][0]:answered[i]["span_tokens"][1] + 1]
    np.testing.assert_array_equal(span_ids, out.predicted_answer_ids.numpy())
    # Our text is cut from the block by character offsets; HF decodes word pieces (lowercased, "##").
    hf_text = s["tokenizer"].decode(out.predicted_answer_ids).replace("##", "")
    assert answered[i]["answer"].lower().replace(" ", "") == hf_text.lower().replace(" ", "")
  assert checked_spans > 100


def test_losses_match_hf(setup):
  """ORQA's retriever and reader losses over the read beam (HF eval mode searches reader_beam_size)."""
  s = setup
  corpus = loading.reader_corpus(s["tables"], s["embeddings"], CFG, s["mesh"])
  pairs = QUESTIONS + [("where did kelvaro move?", "near the coast")]
  examples = [QAExample(f"q{i}", q, [a]) for i, (q, a) in enumerate(pairs)]
  batch = features.encode_questions(examples, s["tables"].tok, CFG.query_len, max_answers=2, max_answer_tokens=6)
  _, metrics = finetune_loss(s["model"], batch, corpus, CFG.reader_beam_size)  # one batch, mean over questions
  hf = [_hf_run(s, q, a)[0].reader_output for q, a in pairs]
  hf_retriever = [r.retriever_loss.item() for r in hf]
  hf_reader = [r.reader_loss.item() for r in hf]
  # logsumexps over beams and ~1,000 spans, batched (ours) vs one question at a time (HF).
  np.testing.assert_allclose(float(metrics["retriever_loss"]), np.mean(hf_retriever), atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["reader_loss"]), np.mean(hf_reader), atol=1e-4, rtol=1e-5)
  assert sum(x > 0 for x in hf_reader) >= 2  # some questions really had an answer in the read blocks
