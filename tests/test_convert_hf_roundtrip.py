"""realm-jax -> HF directory -> realm-jax is bit-identical, and transformers 4.40.2 loads the exported
directories (`from_pretrained`, no missing or unexpected keys) and computes what we compute."""

import json

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from realm_jax import weights
from realm_jax.cli.main import main
from realm_jax.config import get_preset
from realm_jax.convert import export_hf
from realm_jax.convert.names import ConversionError
from realm_jax.convert.tf import Towers
from realm_jax.models import OpenQAModel, RealmModel

VOCAB = 500
CFG = get_preset("tiny", **{"bert.vocab_size": VOCAB}).replace(num_candidates=3)
# Tiny random models, float32, activations O(1): XLA:CPU and PyTorch (oneDNN) kernels of either ISA
# agree to ~1e-6 (summation order only); 1e-5 leaves room for that and still catches any wrong weight,
# transpose or op, which moves outputs by 1e-2 or more.
TOL = 1e-5
L = 24  # one sequence length (and mostly 6 rows) everywhere: JAX compiles each op shape once


def _perturbed(cfg, parts, seed):
  """Random weights with every LayerNorm and bias perturbed, so mis-mapped tensors show."""
  model = Towers(cfg, parts, rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(seed)
  flat = [(p, v.replace(v.get_value() + 0.05 * rng.standard_normal(v.get_value().shape).astype(np.float32)))
          for p, v in nnx.to_flat_state(state)]
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def _flat(model, part):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(getattr(model, part), nnx.Param))}


def _inputs(rng, *shape):
  ids = rng.integers(5, VOCAB, size=shape).astype(np.int64)
  mask = np.ones(shape, np.int64)
  mask[..., -2:] = 0
  tt = np.zeros(shape, np.int64)
  tt[..., shape[-1] // 2:] = 1
  return ids, mask, tt


def _i32(*xs):
  return [x.astype(np.int32) for x in xs]


def _t(*xs):
  return [torch.from_numpy(x) for x in xs]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  d = tmp_path_factory.mktemp("src")
  model = _perturbed(CFG, ["retriever", "encoder", "reader"], seed=3)
  weights.save_weights(str(d / "w"), model, CFG)
  return str(d / "w"), model


@pytest.mark.parametrize("kind", ["scorer", "encoder", "orqa"])
def test_round_trip_is_bit_identical_and_hf_agrees(tmp_path, source, kind):
  uri, model = source
  out = tmp_path / "hf"
  export_hf.export_hf(uri, kind, str(out), log=lambda s: None)
  cls = getattr(transformers, export_hf.HF_CLASS[kind])
  hf, info = cls.from_pretrained(str(out), output_loading_info=True)
  assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
  hf.eval()
  back = tmp_path / "back"
  export_hf.convert_hf(str(out), str(back), log=lambda s: None)  # kind detected from config.json
  assert weights.read_config(str(back)).bert == CFG.bert
  parts = export_hf.PARTS[kind]
  again = Towers(weights.read_config(str(back)), parts, rngs=nnx.Rngs(9))
  assert sorted(weights.load_weights(str(back), again)) == sorted(parts)
  for part in parts:
    want, got = _flat(model, part), _flat(again, part)
    assert want.keys() == got.keys()
    for p in want:
      np.testing.assert_array_equal(got[p], want[p], err_msg=f"{part}/{p}")
  model.eval()
  rng = np.random.default_rng(0)
  with torch.no_grad():
    if kind == "scorer":
      q, c = _inputs(rng, 2, L), _inputs(rng, 2, CFG.num_candidates, L)
      out_hf = hf(*_t(*q), candidate_input_ids=torch.from_numpy(c[0]),
                  candidate_attention_mask=torch.from_numpy(c[1]), candidate_token_type_ids=torch.from_numpy(c[2]))
      np.testing.assert_allclose(np.asarray(model.retriever.embed_queries(*_i32(*q))), out_hf.query_score.numpy(),
                                 atol=TOL)
      np.testing.assert_allclose(np.asarray(model.retriever.embed_docs(*_i32(*c))), out_hf.candidate_score.numpy(),
                                 atol=TOL)
    elif kind == "encoder":
      ids, mask, tt = _inputs(rng, 6, L)
      want = hf(*_t(ids, mask, tt)).logits.numpy()
      np.testing.assert_allclose(np.asarray(model.encoder(*_i32(ids, mask, tt))), want, atol=TOL, rtol=0)
    else:
      ids, mask, tt = _inputs(rng, 6, L)
      block_mask = np.zeros((6, L), bool)
      block_mask[:, 8:22] = True
      want, _, _ = hf.reader.qa_outputs(hf.reader.realm(*_t(ids, mask, tt))[0], torch.from_numpy(block_mask))
      got, _, _ = model.reader(*_i32(ids, mask, tt), block_mask)
      valid = np.asarray(got) > -1e30
      np.testing.assert_allclose(np.asarray(got)[valid], want.numpy()[valid], atol=TOL, rtol=0)
      np.testing.assert_allclose(np.asarray(model.retriever.embed_queries(*_i32(ids, mask, tt))),
                                 hf.embedder(*_t(ids, mask, tt)).projected_score.numpy(), atol=TOL)


def test_export_realm_writes_scorer_and_encoder_and_refuses_to_overwrite(tmp_path, source):
  uri, _ = source
  assert main(["export", "hf", "--weights", uri, "--kind", "realm", "--out", str(tmp_path / "realm")]) == 0
  for sub, arch in (("scorer", "RealmScorer"), ("encoder", "RealmKnowledgeAugEncoder")):
    assert json.loads((tmp_path / "realm" / sub / "config.json").read_text())["architectures"] == [arch]
  with pytest.raises(ConversionError, match="not empty"):
    export_hf.export_hf(uri, "encoder", str(tmp_path / "realm"), log=lambda s: None)


def test_hf_reader_and_embedder_directories_convert(tmp_path):
  """RealmReader / RealmEmbedder directories written by transformers itself (pytorch_model.bin)."""
  torch.manual_seed(0)
  hf_cfg = transformers.RealmConfig(**export_hf.hfc.hf_config_dict(CFG))
  reader = transformers.RealmReader(hf_cfg).eval()
  reader.save_pretrained(str(tmp_path / "reader"), safe_serialization=False)
  assert main(["convert", "hf", "--path", str(tmp_path / "reader"), "--out", str(tmp_path / "w")]) == 0
  model = OpenQAModel(CFG, rngs=nnx.Rngs(1))
  assert weights.load_weights(str(tmp_path / "w"), model) == ["reader"]
  model.eval()
  ids, mask, tt = _inputs(np.random.default_rng(1), 6, L)
  bm = np.ones((6, L), bool)
  with torch.no_grad():
    want, _, _ = reader.qa_outputs(reader.realm(*_t(ids, mask, tt))[0], torch.from_numpy(bm))
  got, _, _ = model.reader(*_i32(ids, mask, tt), bm)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=TOL, rtol=0)
  emb = transformers.RealmEmbedder(hf_cfg)
  emb.save_pretrained(str(tmp_path / "emb"))
  with pytest.raises(ConversionError, match=r"says \['RealmEmbedder'\] \(embedder\), not encoder"):
    export_hf.convert_hf(str(tmp_path / "emb"), str(tmp_path / "w2"), kind="encoder", log=lambda s: None)


def test_plain_bert_initialises_every_tower(tmp_path):
  bert_cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=512, hidden_act="gelu")
  torch.manual_seed(1)
  bert = transformers.BertForPreTraining(bert_cfg).eval()  # pooler + MLM head + NSP head
  bert.save_pretrained(str(tmp_path / "bert"))
  cfg = export_hf.convert_hf(str(tmp_path / "bert"), str(tmp_path / "w"), log=lambda s: None)
  assert cfg.bert.hidden_act == "gelu"
  model = RealmModel(cfg, rngs=nnx.Rngs(1))
  weights.load_weights(str(tmp_path / "w"), model)
  model.eval()
  ids, mask, tt = _inputs(np.random.default_rng(2), 6, L)
  with torch.no_grad():
    want = bert(*_t(ids, mask, tt)).prediction_logits.numpy()
  np.testing.assert_allclose(np.asarray(model.encoder(*_i32(ids, mask, tt))), want, atol=TOL, rtol=0)
  np.testing.assert_array_equal(np.asarray(model.retriever.query_embedder.bert.layers[1].output.kernel[...]),
                                bert.bert.encoder.layer[1].output.dense.weight.detach().numpy().T)
