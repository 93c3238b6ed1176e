"""Our NNX REALM modules against transformers 4.40.2 (the HuggingFace PyTorch port) as the oracle.

HF models are random-initialised on a tiny config, every weight (LayerNorms and biases too) is
perturbed so that a mis-mapped or mis-transposed tensor shows, then converted into our modules.
"""

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from realm_jax.config import get_preset
from realm_jax.convert import hf as hfconv
from realm_jax.convert.names import ConversionError
from realm_jax.models import (
  KnowledgeAugEncoder,
  Retriever,
  RetrieverEmbedder,
  SpanReader,
  marginal_log_likelihood,
  relevance_scores,
)
from realm_jax.models.bert import set_fused_attention
from realm_jax.models.reader import correct_spans, openqa_losses, predict_span

VOCAB = 512
CFG = get_preset("tiny", **{"bert.vocab_size": VOCAB}).replace(num_candidates=4, reader_beam_size=3)
# Tiny random models, float32, activations O(1): XLA:CPU and PyTorch (oneDNN) kernels of either ISA
# agree to ~1e-6 (summation order only); 1e-5 leaves room for that and still catches any wrong weight,
# transpose or op, which moves outputs by 1e-2 or more.
TOL = 1e-5


def _hf_config():
  return transformers.RealmConfig(**hfconv.hf_config_dict(CFG))


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=g) * 0.05)
  return model.eval()


def _sd(model: torch.nn.Module) -> dict:
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _inputs(rng, *shape, types=None):
  ids = rng.integers(5, VOCAB, size=shape).astype(np.int64)
  mask = np.ones(shape, np.int64)
  mask[..., -3:] = 0  # padding at the end of every row
  tt = np.zeros(shape, np.int64) if types is None else types
  if types is None:
    tt[..., shape[-1] // 2:] = 1
  return ids, mask, tt


def _t(*xs):
  return [torch.from_numpy(x) for x in xs]


@pytest.mark.parametrize("fused", [False, True])  # written-out attention, jax.nn.dot_product_attention
def test_embedder_matches_hf(fused):
  hf = _perturb(transformers.RealmEmbedder(_hf_config()), 0)
  ours = RetrieverEmbedder(CFG, rngs=nnx.Rngs(0))
  hfconv.load_state_dict(ours, _sd(hf), hfconv.embedder_rules(), skip=hfconv.SKIP_EMBEDDER, source="RealmEmbedder")
  ours.eval()
  set_fused_attention(ours, fused)
  ids, mask, tt = _inputs(np.random.default_rng(0), 3, 24)
  with torch.no_grad():
    want = hf(*_t(ids, mask, tt)).projected_score.numpy()
  got = np.asarray(ours(ids.astype(np.int32), mask.astype(np.int32), tt.astype(np.int32)))
  assert got.shape == (3, CFG.retriever_dim)
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_scorer_matches_hf():
  hf = _perturb(transformers.RealmScorer(_hf_config()), 1)
  ours = Retriever(CFG, rngs=nnx.Rngs(0))
  hfconv.load_state_dict(ours, _sd(hf), hfconv.retriever_rules(), skip=hfconv.retriever_skip(), source="RealmScorer")
  ours.eval()
  rng = np.random.default_rng(1)
  q = _inputs(rng, 2, 16)
  c = _inputs(rng, 2, CFG.num_candidates, 20)
  with torch.no_grad():
    out = hf(*_t(*q), candidate_input_ids=torch.from_numpy(c[0]),
             candidate_attention_mask=torch.from_numpy(c[1]), candidate_token_type_ids=torch.from_numpy(c[2]))
  qe = ours.embed_queries(*[x.astype(np.int32) for x in q])
  de = ours.embed_docs(*[x.astype(np.int32) for x in c])
  np.testing.assert_allclose(np.asarray(qe), out.query_score.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(de), out.candidate_score.numpy(), atol=TOL, rtol=0)
  # Scores are ~100 here (sum of 128 products): float32 resolution there is ~1e-5, so compare relatively.
  # The same 128-d dot products of the same float32 inputs: only the summation order differs (~1e-7).
  np.testing.assert_allclose(np.asarray(relevance_scores(qe, de)), out.relevance_score.numpy(), atol=0, rtol=1e-6)


@pytest.mark.parametrize("with_mask", [False, True])
def test_knowledge_aug_encoder_logits_and_marginal_loss_match_hf(with_mask):
  hf = _perturb(transformers.RealmKnowledgeAugEncoder(_hf_config()), 2)
  ours = KnowledgeAugEncoder(CFG, rngs=nnx.Rngs(0))
  sd = _sd(hf)
  hfconv.check_tied_decoder(sd)
  hfconv.load_state_dict(ours, sd, hfconv.encoder_rules(), skip=hfconv.SKIP_ENCODER, source="RealmKnowledgeAugEncoder")
  ours.eval()
  rng = np.random.default_rng(2)
  b, c, n = 2, CFG.num_candidates, 32
  ids, mask, tt = _inputs(rng, b, c, n)
  labels = rng.integers(5, VOCAB, size=(b, n)).astype(np.int64)
  mlm_mask = (rng.random((b, n)) < 0.3).astype(np.int64) if with_mask else None
  scores = rng.normal(size=(b, c)).astype(np.float32) * 3
  with torch.no_grad():
    out = hf(*_t(ids.reshape(b * c, n), mask.reshape(b * c, n), tt.reshape(b * c, n)),
             relevance_score=torch.from_numpy(scores), labels=torch.from_numpy(labels),
             mlm_mask=None if mlm_mask is None else torch.from_numpy(mlm_mask))
  logits = ours(ids.astype(np.int32), mask.astype(np.int32), tt.astype(np.int32))
  np.testing.assert_allclose(np.asarray(logits).reshape(b * c, n, VOCAB), out.logits.numpy(), atol=TOL, rtol=0)
  target_mask = np.ones((b, n), np.float32) if mlm_mask is None else mlm_mask.astype(np.float32)
  loss, aux = marginal_log_likelihood(logits, labels.astype(np.int32), target_mask, scores)
  np.testing.assert_allclose(float(loss), out.loss.item(), atol=TOL, rtol=1e-6)
  # Gathering the masked positions first gives the same logits as slicing the full ones.
  pos = np.stack([np.sort(rng.choice(n, 5, replace=False)) for _ in range(b * c)]).reshape(b, c, 5).astype(np.int32)
  gathered = ours(ids.astype(np.int32), mask.astype(np.int32), tt.astype(np.int32), mlm_positions=pos)
  np.testing.assert_allclose(np.asarray(gathered), np.take_along_axis(np.asarray(logits), pos[..., None], axis=2),
                             atol=TOL, rtol=0)


def test_per_span_marginal_is_the_joint_over_span_tokens():
  """The paper's per-span form: -log sum_z p(z|x) prod_t p(y_t|z,x), checked against numpy."""
  rng = np.random.default_rng(3)
  b, c, p, v = 3, 4, 5, 11
  logits = rng.normal(size=(b, c, p, v)).astype(np.float32)
  targets = rng.integers(0, v, size=(b, p)).astype(np.int32)
  mask = np.ones((b, p), np.float32)
  mask[0, 3:] = 0
  scores = rng.normal(size=(b, c)).astype(np.float32)
  loss, _ = marginal_log_likelihood(logits, targets, mask, scores, per_span=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  tok = np.take_along_axis(logp, np.broadcast_to(targets[:, None, :, None], (b, c, p, 1)), -1)[..., 0]
  span = (tok * mask[:, None]).sum(-1)
  lpz = scores - np.log(np.exp(scores).sum(-1, keepdims=True))
  want = -np.mean(np.log(np.exp(lpz + span).sum(-1)))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)  # float32 vs numpy float64 logsumexps
  token_loss, _ = marginal_log_likelihood(logits, targets, mask, scores, per_span=False)
  assert abs(float(token_loss) - float(loss)) > 1e-3  # the two forms really differ


@pytest.mark.parametrize("fused", [False, True])
def test_reader_matches_hf(fused):
  hf = _perturb(transformers.RealmReader(_hf_config()), 4)
  ours = SpanReader(CFG, rngs=nnx.Rngs(0))
  hfconv.load_state_dict(ours, _sd(hf), hfconv.reader_rules(), skip=hfconv.SKIP_READER, source="RealmReader")
  ours.eval()
  set_fused_attention(ours, fused)
  rng = np.random.default_rng(4)
  r, n = CFG.reader_beam_size, 40
  ids, mask, tt = _inputs(rng, r, n)
  block_mask = np.zeros((r, n), bool)
  block_mask[:, 12:n - 4] = True
  relevance = rng.normal(size=(r,)).astype(np.float32)
  starts_gold = np.array([[15, -1], [20, 22], [-1, -1]], np.int64)
  ends_gold = np.array([[17, -1], [20, 25], [-1, -1]], np.int64)
  has_answers = np.array([True, True, False])
  with torch.no_grad():
    out = hf(*_t(ids, mask, tt), relevance_score=torch.from_numpy(relevance),
             block_mask=torch.from_numpy(block_mask), start_positions=torch.from_numpy(starts_gold),
             end_positions=torch.from_numpy(ends_gold), has_answers=torch.from_numpy(has_answers))
    hf_logits, hf_starts, hf_ends = hf.qa_outputs(hf.realm(*_t(ids, mask, tt))[0], torch.from_numpy(block_mask))
  logits, starts, ends = ours(ids.astype(np.int32), mask.astype(np.int32), tt.astype(np.int32), block_mask)
  np.testing.assert_array_equal(np.asarray(starts), hf_starts.numpy())
  np.testing.assert_array_equal(np.asarray(ends), hf_ends.numpy())
  valid = np.asarray(logits) > -1e30
  np.testing.assert_array_equal(valid, hf_logits.numpy() > -1e30)
  np.testing.assert_allclose(np.asarray(logits)[valid], hf_logits.numpy()[valid], atol=TOL, rtol=0)
  with_retriever = np.asarray(logits) + relevance[:, None]
  pred = predict_span(with_retriever, starts, ends)
  assert int(pred["block"]) == out.block_idx.item()
  assert int(pred["start"]) == out.start_pos.item() and int(pred["end"]) == out.end_pos.item()
  correct = correct_spans(starts, ends, starts_gold.astype(np.int32), ends_gold.astype(np.int32))
  losses = openqa_losses(relevance[None], has_answers[None], with_retriever[None], np.asarray(correct)[None])
  np.testing.assert_allclose(float(losses["retriever_loss"][0]), out.retriever_loss.item(), atol=TOL, rtol=1e-6)
  # The reader loss is a logsumexp over ~1,000 span logits of magnitude ~10: 1e-5 relative per term.
  np.testing.assert_allclose(float(losses["reader_loss"][0]), out.reader_loss.item(), atol=1e-4, rtol=1e-6)


def test_strict_loading_names_the_problem():
  hf = transformers.RealmEmbedder(_hf_config())
  sd = _sd(hf)
  ours = RetrieverEmbedder(CFG, rngs=nnx.Rngs(0))
  extra = dict(sd, **{"realm.encoder.layer.0.mystery.weight": np.zeros(3)})
  with pytest.raises(ConversionError, match="mystery"):
    hfconv.load_state_dict(ours, extra, hfconv.embedder_rules(), skip=hfconv.SKIP_EMBEDDER)
  missing = {k: v for k, v in sd.items() if k != "cls.dense.weight"}
  with pytest.raises(ConversionError, match=r"cls\.dense\.weight"):
    hfconv.load_state_dict(ours, missing, hfconv.embedder_rules(), skip=hfconv.SKIP_EMBEDDER)
  wrong = dict(sd, **{"cls.LayerNorm.bias": np.zeros(7, np.float32)})
  with pytest.raises(ConversionError, match=r"cls\.LayerNorm\.bias: expected \(128,\), got \(7,\)"):
    hfconv.load_state_dict(ours, wrong, hfconv.embedder_rules(), skip=hfconv.SKIP_EMBEDDER)
