"""`realm-jax convert tf` against transformers 4.40.2's own `load_tf_weights_in_realm` as the oracle.

Tiny TF checkpoints are written with `tf.raw_ops.SaveV2` under the original REALM/ORQA variable
names (spelt out here, independently of our name tables), with Adam slots and `global_step`; our
converted weights and HF's TF loader must then give the same embedder scores, encoder logits and
reader span logits.
"""

import os

import numpy as np
import pytest
import tensorflow as tf
import torch
import transformers
from flax import nnx
from transformers.models.realm.modeling_realm import load_tf_weights_in_realm

from realm_jax import weights
from realm_jax.cli.main import main
from realm_jax.config import get_preset
from realm_jax.convert import hf as hfconv, tf as tfconv
from realm_jax.convert.names import ConversionError
from realm_jax.models import OpenQAModel, RealmModel

VOCAB = 500
CFG = get_preset("tiny", **{"bert.vocab_size": VOCAB})
H, FF, S = CFG.bert.hidden_size, CFG.bert.intermediate_size, CFG.span_hidden_size
# Tiny random models, float32, activations O(1): XLA:CPU and PyTorch (oneDNN) kernels of either ISA
# agree to ~1e-6 (summation order only); 1e-5 leaves room for that and still catches any wrong weight,
# transpose or op, which moves outputs by 1e-2 or more.
TOL = 1e-5
L = 24  # one sequence length (and mostly 6 rows) everywhere: JAX compiles each op shape once


def bert_vars(scope: str, pooler: bool = True) -> dict[str, tuple]:
  """The standard TF BERT variable names and shapes under `scope`."""
  out = {f"{scope}embeddings/word_embeddings": (VOCAB, H), f"{scope}embeddings/position_embeddings": (512, H),
         f"{scope}embeddings/token_type_embeddings": (2, H), f"{scope}embeddings/LayerNorm/gamma": (H,),
         f"{scope}embeddings/LayerNorm/beta": (H,)}
  for i in range(CFG.bert.num_layers):
    p = f"{scope}encoder/layer_{i}/"
    for d in ("attention/self/query", "attention/self/key", "attention/self/value", "attention/output/dense"):
      out[p + d + "/kernel"], out[p + d + "/bias"] = (H, H), (H,)
    out[p + "intermediate/dense/kernel"], out[p + "intermediate/dense/bias"] = (H, FF), (FF,)
    out[p + "output/dense/kernel"], out[p + "output/dense/bias"] = (FF, H), (H,)
    for ln in ("attention/output/LayerNorm", "output/LayerNorm"):
      out[p + ln + "/gamma"], out[p + ln + "/beta"] = (H,), (H,)
  if pooler:
    out[f"{scope}pooler/dense/kernel"], out[f"{scope}pooler/dense/bias"] = (H, H), (H,)
  return out


def mlm_vars(scope: str) -> dict[str, tuple]:
  return {f"{scope}cls/predictions/transform/dense/kernel": (H, H),
          f"{scope}cls/predictions/transform/dense/bias": (H,),
          f"{scope}cls/predictions/transform/LayerNorm/gamma": (H,),
          f"{scope}cls/predictions/transform/LayerNorm/beta": (H,), f"{scope}cls/predictions/output_bias": (VOCAB,)}


def embedder_vars(finetuned: bool) -> dict[str, tuple]:
  m = "module/module/module/" if finetuned else "module/module/"  # ORQA's is one module/ deeper
  out = {**bert_vars(m + "module/bert/"), **mlm_vars(m + "module/"),
         m + "dense/kernel": (H, 128), m + "dense/bias": (128,), m + "LayerNorm/gamma": (128,),
         m + "LayerNorm/beta": (128,)}
  return out


def encoder_vars() -> dict[str, tuple]:
  return {**bert_vars("bert/"), **mlm_vars("")}


def reader_vars() -> dict[str, tuple]:
  return {**bert_vars("reader/module/bert/"), **mlm_vars("reader/module/"),
          "reader/dense/kernel": (H, 2 * S), "reader/dense/bias": (2 * S,),
          "reader/layer_normalization/gamma": (S,), "reader/layer_normalization/beta": (S,),
          "reader/dense_1/kernel": (S, 1), "reader/dense_1/bias": (1,)}


def with_optimizer(variables: dict[str, tuple]) -> dict[str, tuple]:
  out = dict(variables)
  for name, shape in list(variables.items())[::3]:
    out[name + "/adam_m"] = shape
    out[name + "/adam_v"] = shape
  out["global_step"] = ()
  return out


def save_tf(prefix: str, variables: dict[str, tuple], seed: int, extra: dict | None = None) -> str:
  os.makedirs(os.path.dirname(prefix), exist_ok=True)
  rng = np.random.default_rng(seed)
  names, tensors = [], []
  for name, shape in sorted(variables.items()):
    names.append(name)
    if name == "global_step":
      tensors.append(tf.constant(1000, tf.int64))
    elif name.endswith("gamma"):
      tensors.append(tf.constant(1.0 + 0.1 * rng.standard_normal(shape), tf.float32))
    else:
      tensors.append(tf.constant(0.1 * rng.standard_normal(shape), tf.float32))
  for name, value in (extra or {}).items():
    names.append(name)
    tensors.append(tf.constant(value))
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)
  return prefix


def hf_config(**kw):
  return transformers.RealmConfig(**{**hfconv.hf_config_dict(CFG), **kw})


def hf_from_tf(cls, prefix, **kw):
  cfg = hf_config(**kw)
  model = cls(cfg)
  load_tf_weights_in_realm(model, cfg, prefix)
  return model.eval()


def inputs(rng, *shape):
  ids = rng.integers(5, VOCAB, size=shape).astype(np.int64)
  mask = np.ones(shape, np.int64)
  mask[..., -3:] = 0
  tt = np.zeros(shape, np.int64)
  tt[..., shape[-1] // 2:] = 1
  return ids, mask, tt


def i32(*xs):
  return [x.astype(np.int32) for x in xs]


def t(*xs):
  return [torch.from_numpy(x) for x in xs]


@pytest.mark.parametrize("finetuned", [False, True])
def test_embedder_scores_match_hf_tf_loader(tmp_path, finetuned):
  prefix = save_tf(str(tmp_path / "emb" / "variables"), with_optimizer(embedder_vars(finetuned)), seed=1)
  out = str(tmp_path / "out")
  cfg = tfconv.convert_tf([prefix], "embedder", out, log=lambda s: None)
  assert cfg.bert == CFG.bert and cfg.retriever_dim == 128  # inferred from the shapes alone
  model = RealmModel(cfg, rngs=nnx.Rngs(5))
  assert weights.load_weights(out, model, parts=["retriever"]) == ["retriever"]
  model.eval()
  hf = hf_from_tf(transformers.RealmEmbedder, prefix)
  ids, mask, tt = inputs(np.random.default_rng(0), 6, L)
  with torch.no_grad():
    want = hf(*t(ids, mask, tt)).projected_score.numpy()
  got = np.asarray(model.retriever.embed_docs(*i32(ids, mask, tt)))
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  assert np.abs(want).max() > 0.1  # a real signal, not two zero vectors


def test_realm_embedder_plus_encoder_logits_match_hf(tmp_path):
  emb = save_tf(str(tmp_path / "embedder" / "variables" / "variables"), embedder_vars(False), seed=2)
  enc = save_tf(str(tmp_path / "encoder" / "model.ckpt-7"), with_optimizer(encoder_vars()), seed=3)
  out = str(tmp_path / "out")
  # The embedder as a TF-Hub module directory, the encoder as an Estimator directory.
  (tmp_path / "encoder" / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-7"\n')
  tfconv.convert_tf([str(tmp_path / "embedder"), str(tmp_path / "encoder")], "realm", out,
                    config=CFG, log=lambda s: None)
  model = RealmModel(CFG, rngs=nnx.Rngs(5))
  assert weights.load_weights(out, model) == ["encoder", "retriever"]
  model.eval()
  hf = hf_from_tf(transformers.RealmKnowledgeAugEncoder, enc)
  rng = np.random.default_rng(1)
  ids, mask, tt = inputs(rng, 2, 3, L)
  with torch.no_grad():
    want = hf(*t(ids.reshape(6, L), mask.reshape(6, L), tt.reshape(6, L))).logits.numpy()
  got = np.asarray(model.encoder(*i32(ids, mask, tt))).reshape(6, L, VOCAB)
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  hf_scorer = hf_from_tf(transformers.RealmScorer, emb, num_candidates=3)
  q, c = inputs(rng, 2, L), inputs(rng, 2, 3, L)
  with torch.no_grad():
    s = hf_scorer(*t(*q), candidate_input_ids=torch.from_numpy(c[0]), candidate_attention_mask=torch.from_numpy(c[1]),
                  candidate_token_type_ids=torch.from_numpy(c[2]))
  np.testing.assert_allclose(np.asarray(model.retriever.embed_queries(*i32(*q))), s.query_score.numpy(), atol=TOL)
  np.testing.assert_allclose(np.asarray(model.retriever.embed_docs(*i32(*c))), s.candidate_score.numpy(), atol=TOL)


def test_orqa_reader_span_logits_and_embedder_match_hf(tmp_path):
  n_blocks = 6
  block_emb = np.random.default_rng(9).standard_normal((n_blocks, 128)).astype(np.float32)
  prefix = save_tf(str(tmp_path / "orqa" / "model.ckpt-300"), with_optimizer({**embedder_vars(True), **reader_vars()}),
                   seed=4, extra={"block_emb": block_emb})
  out = str(tmp_path / "out")
  logs = []
  cfg = tfconv.convert_tf([prefix], "orqa", out, log=logs.append)
  assert cfg.span_hidden_size == S and cfg.bert == CFG.bert
  assert any(line.startswith("skipped block_emb") for line in logs)
  assert any("adam_m (optimizer slot)" in line for line in logs)
  model = OpenQAModel(cfg, rngs=nnx.Rngs(5))
  assert weights.load_weights(out, model) == ["reader", "retriever"]
  model.eval()
  hf = hf_from_tf(transformers.RealmForOpenQA, prefix, num_block_records=n_blocks)
  np.testing.assert_array_equal(hf.block_emb.numpy(), block_emb)  # HF really read this checkpoint
  rng = np.random.default_rng(2)
  ids, mask, tt = inputs(rng, 6, L)
  block_mask = np.zeros((6, L), bool)
  block_mask[:, 8:22] = True
  with torch.no_grad():
    hidden = hf.reader.realm(*t(ids, mask, tt))[0]
    want, _, _ = hf.reader.qa_outputs(hidden, torch.from_numpy(block_mask))
    want_q = hf.embedder(*t(ids, mask, tt)).projected_score.numpy()
  got, _, _ = model.reader(*i32(ids, mask, tt), block_mask)
  valid = np.asarray(got) > -1e30
  np.testing.assert_array_equal(valid, want.numpy() > -1e30)
  np.testing.assert_allclose(np.asarray(got)[valid], want.numpy()[valid], atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(model.retriever.embed_queries(*i32(ids, mask, tt))), want_q, atol=TOL)


def test_unknown_missing_and_misshaped_variables_are_named(tmp_path):
  good = encoder_vars()
  unknown = save_tf(str(tmp_path / "a" / "ckpt"), {**good, "bert/encoder/layer_0/mystery/kernel": (3, 4)}, seed=0)
  with pytest.raises(ConversionError, match=r"unknown variables.*\n  bert/encoder/layer_0/mystery/kernel \(3, 4\)"):
    tfconv.convert_tf([unknown], "encoder", str(tmp_path / "o1"), config=CFG, log=lambda s: None)
  missing = save_tf(str(tmp_path / "b" / "ckpt"),
                    {k: v for k, v in good.items() if k != "bert/encoder/layer_1/output/dense/kernel"}, seed=0)
  with pytest.raises(ConversionError, match=r"missing variables:\n  bert/encoder/layer_1/output/dense/kernel "
                                            r"\(expected shape \(512, 128\)"):
    tfconv.convert_tf([missing], "encoder", str(tmp_path / "o2"), config=CFG, log=lambda s: None)
  wrong = save_tf(str(tmp_path / "c" / "ckpt"), {**good, "cls/predictions/transform/LayerNorm/beta": (7,)}, seed=0)
  with pytest.raises(ConversionError, match=r"cls/predictions/transform/LayerNorm/beta: expected shape \(128,\), "
                                            r"got \(7,\)"):
    tfconv.convert_tf([wrong], "encoder", str(tmp_path / "o3"), config=CFG, log=lambda s: None)
  for o in ("o1", "o2", "o3"):  # nothing half-written
    assert not (tmp_path / o).exists()


def test_cli_convert_tf_reports_errors_without_traceback(tmp_path, capsys):
  prefix = save_tf(str(tmp_path / "enc" / "ckpt"), {**encoder_vars(), "cls/unheard_of": (2,)}, seed=0)
  assert main(["convert", "tf", "--checkpoint", prefix, "--kind", "encoder", "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "cls/unheard_of (2,)" in err and "Traceback" not in err
  prefix = save_tf(str(tmp_path / "enc2" / "ckpt"), with_optimizer(encoder_vars()), seed=0)
  assert main(["convert", "tf", "--checkpoint", prefix, "--kind", "encoder", "--out", str(tmp_path / "out2")]) == 0
  assert weights.read_config(str(tmp_path / "out2")).bert == CFG.bert
  assert "skipped global_step (optimizer step / moments)" in capsys.readouterr().out


def test_convert_from_and_to_gcs(gcs_server, tmp_path):
  """Checkpoint read from gs:// (staged through realm_jax.storage), weights written to gs:// by orbax,
  exported to a gs:// HF directory and converted back from it."""
  from realm_jax.convert import export_hf
  from realm_jax.storage import Storage
  save_tf(str(tmp_path / "enc" / "model.ckpt-3"), with_optimizer(encoder_vars()), seed=6)
  (tmp_path / "enc" / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-3"\n')
  bucket = gcs_server.new_bucket()
  Storage.open(bucket).upload_dir(tmp_path / "enc", "ckpts/enc")
  tfconv.convert_tf([f"{bucket}/ckpts/enc"], "encoder", f"{bucket}/weights", config=CFG, log=lambda s: None)
  tfconv.convert_tf([str(tmp_path / "enc" / "model.ckpt-3")], "encoder", str(tmp_path / "local"), config=CFG,
                    log=lambda s: None)
  a, b = RealmModel(CFG, rngs=nnx.Rngs(1)), RealmModel(CFG, rngs=nnx.Rngs(2))
  weights.load_weights(f"{bucket}/weights", a, parts=["encoder"])
  weights.load_weights(str(tmp_path / "local"), b, parts=["encoder"])
  for (p, x), (_, y) in zip(nnx.to_flat_state(nnx.state(a.encoder, nnx.Param)),
                            nnx.to_flat_state(nnx.state(b.encoder, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(x.get_value()), np.asarray(y.get_value()), err_msg=str(p))
  export_hf.export_hf(f"{bucket}/weights", "encoder", f"{bucket}/hf", log=lambda s: None)
  assert sorted(Storage.open(f"{bucket}/hf").list("")) == ["config.json", "model.safetensors"]
  export_hf.convert_hf(f"{bucket}/hf", str(tmp_path / "back"), log=lambda s: None)
  c = RealmModel(CFG, rngs=nnx.Rngs(3))
  weights.load_weights(str(tmp_path / "back"), c, parts=["encoder"])
  np.testing.assert_array_equal(np.asarray(c.encoder.mlm.output_bias[...]), np.asarray(b.encoder.mlm.output_bias[...]))
