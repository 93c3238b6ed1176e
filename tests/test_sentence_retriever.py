"""A retriever that keeps a pre-trained sentence embedder's quality: mean pooling over the tokens
(`RealmConfig.retriever_pooling="mean"`) and the head `init_sentence_head` gives it, checked
against transformers' BertModel reading the packaged MiniLM (mean-pooled in numpy)."""

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from realm_jax.config import RealmConfig, get_preset
from realm_jax.convert import hf as hfconv
from realm_jax.convert.export_hf import hf_state_dict
from realm_jax.convert.names import ConversionError
from realm_jax.data import sources
from realm_jax.errors import ConfigError
from realm_jax.models import OpenQAModel, RealmModel
from realm_jax.models.retriever import SENTENCE_SCORE_SCALE

TEXTS = ["Alan Turing was born in Maida Vale, London, on 23 June 1912.",
         "The Eiffel Tower is in Paris.",
         "Who proposed the Turing test?",
         "Paris is the capital and most populous city of France, on the Seine."]


def _hf_mean_pooled() -> tuple[dict, np.ndarray]:
  model_dir = sources.minilm_dir()
  tok = transformers.BertTokenizerFast(vocab_file=str(model_dir / "vocab.txt"))
  batch = tok(TEXTS, padding=True, return_tensors="np")
  hf = transformers.BertModel.from_pretrained(str(model_dir)).eval()
  with torch.no_grad():
    hidden = hf(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state.numpy()
  m = batch["attention_mask"][..., None].astype(np.float64)
  return batch, (hidden * m).sum(1) / m.sum(1)


def _layer_norm(x: np.ndarray, scale: float, eps: float) -> np.ndarray:
  x = x - x.mean(-1, keepdims=True)
  return scale * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


@pytest.mark.parametrize("dim", [384, 128])
def test_mean_pooled_retriever_equals_transformers(dim):
  cfg = get_preset("minilm", retriever_pooling="mean", retriever_dim=dim, retrieval_dropout=0.0)
  model = RealmModel(cfg, rngs=nnx.Rngs(0))
  done = hfconv.init_from_minilm(model)
  assert "mean pooling, sentence head" in done
  assert model.retriever.query_embedder.bert.pooler is None  # no unused pooler weights
  model.eval()
  batch, pooled = _hf_mean_pooled()
  ours = np.asarray(model.retriever.embed_docs(batch["input_ids"].astype(np.int32),
                                               batch["attention_mask"].astype(np.int32),
                                               batch["token_type_ids"].astype(np.int32)))
  w = np.asarray(model.retriever.doc_embedder.projection.kernel[...], np.float64)
  if dim == 384:
    np.testing.assert_array_equal(w, np.eye(384))
  else:
    np.testing.assert_allclose(w.T @ w, np.eye(dim), atol=1e-5)  # orthonormal columns
  want = _layer_norm(pooled @ w, np.sqrt(SENTENCE_SCORE_SCALE / dim), cfg.bert.layer_norm_eps)
  # The real 6-layer MiniLM: 1e-4 as tests/test_minilm_weights.py (a wrong pooling moves it by > 1e-2).
  np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)
  if dim == 384:  # the identity head: scores are 20 x the cosine of the centred mean-pooled vectors
    c = pooled - pooled.mean(-1, keepdims=True)
    c /= np.linalg.norm(c, axis=-1, keepdims=True)
    np.testing.assert_allclose(ours @ ours.T, SENTENCE_SCORE_SCALE * c @ c.T, atol=1e-3)
    scores = ours[2] @ ours[[0, 1, 3]].T  # the question about Turing ranks the Turing sentence first
    assert int(np.argmax(scores)) == 0


def test_cls_pooling_keeps_the_papers_retriever_and_its_fingerprint():
  cls = get_preset("tiny")
  assert cls.retriever_pooling == "cls"
  old = cls.to_dict()
  old.pop("retriever_pooling")  # a config written before the field existed
  assert RealmConfig.from_dict(old).fingerprint() == cls.fingerprint()
  assert cls.replace(retriever_pooling="mean").fingerprint() != cls.fingerprint()
  model = RealmModel(cls, rngs=nnx.Rngs(0))
  assert model.retriever.query_embedder.bert.pooler is not None


def test_bad_pooling_is_a_one_line_error():
  with pytest.raises(ConfigError, match="retriever_pooling"):
    get_preset("tiny", retriever_pooling="max")


def test_init_retriever_minilm_loads_the_retriever_only():
  cfg = get_preset("minilm", **{"bert.num_layers": 2})
  model = RealmModel(cfg, rngs=nnx.Rngs(0))
  before = np.asarray(model.encoder.bert.layers[1].output.kernel[...]).copy()
  line = hfconv.init_from_minilm(model, 2, parts=("retriever",))
  assert "retriever.query_embedder" in line and "encoder" not in line
  want = hfconv.read_state_dict(sources.minilm_dir())["encoder.layer.1.output.dense.weight"].T
  np.testing.assert_array_equal(np.asarray(model.retriever.query_embedder.bert.layers[1].output.kernel[...]), want)
  np.testing.assert_array_equal(np.asarray(model.encoder.bert.layers[1].output.kernel[...]), before)
  with pytest.raises(ConversionError, match="no BERT tower"):
    hfconv.init_from_bert(model.retriever, {}, parts=("retriever",))


def test_hf_export_refuses_a_mean_pooled_retriever():
  cfg = get_preset("tiny", retriever_pooling="mean")
  model = OpenQAModel(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ConversionError, match="retriever_pooling='mean'"):
    hf_state_dict(model, "orqa", cfg)
