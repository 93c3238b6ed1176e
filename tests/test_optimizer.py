"""BERT's optimiser against a numpy transcription of the original AdamWeightDecayOptimizer."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from realm_jax.config import ConfigError
from realm_jax.train.config import TrainConfig, apply_overrides
from realm_jax.train.optimizer import bert_adamw, bert_warmup_steps, decay_mask, warmup_linear_decay


def _numpy_bert_adamw(params, grads_seq, lr_fn, wd=0.01, clip=1.0, b1=0.9, b2=0.999, eps=1e-6):
  """optimization.py of google-research/bert: clip by global norm, Adam without bias
  correction, decoupled weight decay except for LayerNorm and bias, lr schedule."""
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in params.items()}
  p = {k: x.copy() for k, x in params.items()}
  for step, grads in enumerate(grads_seq):
    norm = np.sqrt(sum((g ** 2).sum() for g in grads.values()))
    scale = clip / max(norm, clip)
    for k in p:
      g = grads[k] * scale
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      update = m[k] / (np.sqrt(v[k]) + eps)
      if not (k.endswith("bias") or "norm" in k):
        update = update + wd * p[k]
      p[k] = p[k] - lr_fn(step) * update
  return p


def test_bert_adamw_matches_the_original_update_rule():
  rng = np.random.default_rng(0)
  params = {"dense/kernel": rng.normal(size=(4, 3)).astype(np.float32),
            "dense/bias": rng.normal(size=(3,)).astype(np.float32),
            "layer_norm/scale": rng.normal(size=(3,)).astype(np.float32)}
  grads_seq = [{k: rng.normal(size=x.shape).astype(np.float32) * 3 for k, x in params.items()} for _ in range(5)]
  schedule = warmup_linear_decay(1e-2, total_steps=10, warmup_steps=2)
  tx = bert_adamw(schedule, weight_decay=0.01, clip_norm=1.0)
  nested = {"dense": {"kernel": params["dense/kernel"], "bias": params["dense/bias"]},
            "layer_norm": {"scale": params["layer_norm/scale"]}}
  state = tx.init(nested)
  p = nested
  for grads in grads_seq:
    g = {"dense": {"kernel": grads["dense/kernel"], "bias": grads["dense/bias"]},
         "layer_norm": {"scale": grads["layer_norm/scale"]}}
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  want = _numpy_bert_adamw(params, grads_seq, lambda s: float(schedule(s)))
  # optax in float32 vs the numpy float64 reference over a few steps: ~1e-7 relative per step.
  np.testing.assert_allclose(np.asarray(p["dense"]["kernel"]), want["dense/kernel"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(p["dense"]["bias"]), want["dense/bias"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(p["layer_norm"]["scale"]), want["layer_norm/scale"], rtol=1e-5, atol=1e-6)


def test_schedule_and_decay_mask():
  assert bert_warmup_steps(200_000) == 10_000 and bert_warmup_steps(500) == 100
  s = warmup_linear_decay(1.0, 100, 10)  # float32 schedule values: approx's 1e-6 covers the rounding of 0.5, 0.9
  assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5) and float(s(10)) == pytest.approx(0.9)
  assert float(s(100)) == pytest.approx(0.0)
  mask = decay_mask({"layers": {"attention_norm": {"scale": jnp.ones(2)}, "query": {"kernel": jnp.ones(2),
                                                                                   "bias": jnp.ones(2)}}})
  assert mask == {"layers": {"attention_norm": {"scale": False}, "query": {"kernel": True, "bias": False}}}


def test_train_config_overrides_and_validation():
  cfg = apply_overrides(TrainConfig(), ["batch_size=64", "model.marginal=span", "model.bert.dtype=bfloat16",
                                        "init=minilm", "max_index_staleness=null"])
  assert cfg.batch_size == 64 and cfg.model.marginal == "span" and cfg.model.bert.dtype == "bfloat16"
  assert cfg.init == "minilm" and cfg.max_index_staleness is None
  with pytest.raises(ConfigError, match="unknown config key 'batchsize'"):
    apply_overrides(cfg, ["batchsize=3"])
  with pytest.raises(ConfigError, match="divisible by grad_accum_steps"):
    apply_overrides(cfg, ["grad_accum_steps=5"])
  with pytest.raises(ConfigError, match="retrieval must be one of"):
    apply_overrides(cfg, ["retrieval=faiss"])


def test_lr_mults_scale_the_update_of_matched_parameters_only():
  """A rule's multiplier scales the update of the parameters whose path it matches (first rule
  wins, 0 freezes); the Adam moments are those of the unscaled rule."""
  rng = np.random.default_rng(1)
  params = {"encoder": {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
                        "norm": {"scale": rng.normal(size=(3,)).astype(np.float32)}},
            "retriever": {"kernel": rng.normal(size=(3, 2)).astype(np.float32)},
            "reader": {"kernel": rng.normal(size=(2, 2)).astype(np.float32)}}
  grads_seq = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params) for _ in range(4)]
  schedule = warmup_linear_decay(1e-2, total_steps=10, warmup_steps=2)

  def train(tx):
    state, p = tx.init(params), params
    for g in grads_seq:
      updates, state = tx.update(g, state, p)
      p = optax.apply_updates(p, updates)
    return p

  # No weight decay here: it reads the (now different) parameters, so later updates would not be
  # exact multiples of each other.
  plain = train(bert_adamw(schedule, weight_decay=0.0))
  mults = (("^encoder/norm", 0.0), ("^encoder/", 0.25), ("kernel", 2.0))
  scaled = train(bert_adamw(schedule, weight_decay=0.0, lr_mults=mults))
  def delta(p, *keys):
    return np.asarray(_get(p, keys)) - _get(params, keys)
  np.testing.assert_array_equal(scaled["encoder"]["norm"]["scale"], params["encoder"]["norm"]["scale"])
  # Two float32 runs whose updates differ by an exact factor: rounding of the parameter sums only.
  for part, mult in (("encoder", 0.25), ("retriever", 2.0), ("reader", 2.0)):
    np.testing.assert_allclose(delta(scaled, part, "kernel"), mult * delta(plain, part, "kernel"), rtol=1e-4, atol=1e-6)
  assert np.abs(delta(plain, "encoder", "norm", "scale")).max() > 1e-4  # the freeze did something


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


def test_lr_mults_config_parsing_and_validation():
  cfg = apply_overrides(TrainConfig(), ['lr_mults=[["^encoder/", 0.1]]', 'param_sharding=[[".*", "fsdp"]]'])
  assert cfg.lr_mults == (("^encoder/", 0.1),) and cfg.param_sharding == ((".*", "fsdp"),)
  hash(cfg)  # tuples, not the lists JSON gave
  assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  from realm_jax.openqa.config import FinetuneConfig, apply_overrides as finetune_overrides
  ft = finetune_overrides(FinetuneConfig(), ['param_sharding=[[".*", "fsdp"]]', 'lr_mults=[["^reader/span", 20]]'])
  assert ft.param_sharding == ((".*", "fsdp"),) and ft.lr_mults == (("^reader/span", 20.0),) and hash(ft)
  with pytest.raises(ConfigError, match="lr_mults rules are"):
    finetune_overrides(ft, ['lr_mults=[["^reader/"]]'])
  with pytest.raises(ConfigError, match="lr_mults rules are"):
    apply_overrides(cfg, ['lr_mults=[["^encoder/", -1]]'])
  with pytest.raises(ConfigError, match="bad regex"):
    apply_overrides(cfg, ['lr_mults=[["(encoder", 0.5]]'])


def test_lr_mults_scale_the_finetuners_updates(tmp_path):
  """Open-QA fine-tuning honours `lr_mults` like pre-training: a reader scaled by 0 keeps its
  weights (weight decay included) while the query tower trains."""
  from flax import nnx

  from realm_jax.config import get_preset
  from realm_jax.data.corpus import build_corpus
  from realm_jax.data.qa import QAExample
  from realm_jax.openqa.config import FinetuneConfig
  from realm_jax.openqa.finetune import Finetuner
  from realm_jax.storage import Storage
  from tests.helpers.facts_corpus import write_documents

  docs = write_documents(tmp_path / "docs.jsonl", n=8)
  build_corpus([str(tmp_path / "docs.jsonl")], Storage.open(str(tmp_path / "root")), block_len=64)
  questions = [QAExample(d["title"], f"Where was {d['title']} born?", [d["city"]]) for d in docs]
  cfg = FinetuneConfig(
      model=get_preset("tiny", query_len=16, block_len=64, reader_len=80, reader_beam_size=2),
      retriever_beam_size=4, max_answers=1, max_answer_tokens=4, batch_size=8, learning_rate=1e-3,
      num_train_steps=2, warmup_steps=1, log_every=1, checkpoint_every=100, async_checkpointing=False,
      lr_mults=(("^reader/", 0.0),))
  tuner = Finetuner(cfg, str(tmp_path / "root"), questions=questions, log_fn=lambda m: None)

  def params(module):
    return [np.array(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]

  reader, retriever = params(tuner.model.reader), params(tuner.model.retriever)
  tuner.run()
  assert all(np.array_equal(a, b) for a, b in zip(params(tuner.model.reader), reader))
  assert any(not np.array_equal(a, b) for a, b in zip(params(tuner.model.retriever), retriever))
