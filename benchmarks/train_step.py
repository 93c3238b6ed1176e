"""REALM train step throughput: ours (jit, retrieval on device) vs the HF PyTorch pieces.

One command: `python benchmarks/train_step.py [--presets tiny minilm] [--batch 2] [--iters 5]`.
Ours: the full step of `realm_jax.train.realm_step.realm_loss` (query embed, exact MIPS over a
row-sharded index, candidate re-embedding, encoder, marginal loss) forward+backward + optimizer.
HF: `RealmScorer` (query + 8 candidates) + `RealmKnowledgeAugEncoder` with labels, forward+backward
+ AdamW, candidates given (HF has no in-step retrieval). Also a breakdown of our step into its
parts, each timed as its own jitted forward+backward.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from realm_jax.config import get_preset
from realm_jax.convert.hf import hf_config_dict
from realm_jax.data.masking import Specials
from realm_jax.models import RealmModel, marginal_log_likelihood, relevance_scores
from realm_jax.retrieval import mips
from realm_jax.train import device_corpus, realm_step
from realm_jax.train.optimizer import bert_adamw


def _time(fn, iters: int) -> float:
  for _ in range(2):  # compile; nnx.jit retraces once after the first optimizer update
    jax.block_until_ready(fn())
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def make_inputs(cfg, batch: int, num_blocks: int, rng):
  sp = Specials()
  lq, lb = cfg.query_len, cfg.block_len
  doc = np.zeros((num_blocks, lb), np.int32)
  body = np.zeros((num_blocks, lb), np.int32)
  for i in range(num_blocks):
    t, b = rng.integers(1000, 30000, 4), rng.integers(1000, 30000, lb - 8)
    d = np.concatenate([[sp.cls_id], t, [sp.sep_id], b, [sp.sep_id]])
    doc[i, :len(d)] = d
    body[i, :len(b) + 1] = np.concatenate([b, [sp.sep_id]])
  q = np.zeros((batch, lq), np.int32)
  q[:, 0], q[:, 1:lq - 1], q[:, lq - 1] = sp.cls_id, rng.integers(1000, 30000, (batch, lq - 2)), sp.sep_id
  q[:, 5:8] = sp.mask_id
  batch_d = dict(input_ids=q, attention_mask=np.ones_like(q), token_type_ids=np.zeros_like(q),
                 mlm_positions=np.tile(np.array([5, 6, 7] + [0] * 7, np.int32), (batch, 1)),
                 mlm_targets=rng.integers(1000, 30000, (batch, 10)).astype(np.int32),
                 mlm_weights=np.tile(np.array([1.0] * 3 + [0.0] * 7, np.float32), (batch, 1)),
                 block_id=np.zeros(batch, np.int32))
  return doc, body, batch_d, sp


def bench_ours(cfg, batch, num_blocks, iters, rng):
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  doc, body, b, sp = make_inputs(cfg, batch, num_blocks, rng)
  corpus = device_corpus.place_corpus(doc, body, mesh, sp)
  index = mips.shard_rows(rng.normal(size=(num_blocks, cfg.retriever_dim)).astype(np.float32), mesh)
  model = RealmModel(cfg, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, bert_adamw(1e-5), wrt=nnx.Param)
  b = {k: jnp.asarray(v) for k, v in b.items()}

  @nnx.jit
  def step(model, opt, b):
    (loss, _), grads = nnx.value_and_grad(lambda m: realm_step.realm_loss(m, b, corpus, index), has_aux=True)(model)
    opt.update(model, grads)
    return loss

  full = _time(lambda: step(model, opt, b), iters)

  # Breakdown: each part as its own jitted forward+backward (retrieval forward only).
  c = cfg.num_candidates
  q_emb = model.retriever.embed_queries(b["input_ids"], b["attention_mask"], b["token_type_ids"])
  ids = realm_step.retrieve_candidates(q_emb, index, b["block_id"], c, False)
  null_doc, null_body = realm_step.null_document(corpus, batch, cfg.block_len)
  cand = jnp.concatenate([null_doc, device_corpus.gather_rows(corpus.doc_tokens, ids)], 1)
  bodies = jnp.concatenate([null_body, device_corpus.gather_rows(corpus.body_tokens, ids)], 1)
  joint = device_corpus.joint_inputs(b["input_ids"], b["attention_mask"], bodies, sp.pad_id)
  pos = jnp.broadcast_to(b["mlm_positions"][:, None], (batch, c, 10))

  parts = {
      "query embed": nnx.jit(lambda m: nnx.grad(lambda m: m.retriever.embed_queries(
          b["input_ids"], b["attention_mask"], b["token_type_ids"]).sum())(m)),
      "retrieval": jax.jit(lambda q: realm_step.retrieve_candidates(q, index, b["block_id"], c, False)),
      "candidate embed": nnx.jit(lambda m: nnx.grad(lambda m: m.retriever.embed_docs(
          *device_corpus.doc_inputs_from_tokens(cand, sp.pad_id, sp.sep_id)).sum())(m)),
      "encoder": nnx.jit(lambda m: nnx.grad(lambda m: marginal_log_likelihood(
          m.encoder(*joint, mlm_positions=pos), b["mlm_targets"], b["mlm_weights"], jnp.zeros((batch, c)))[0])(m)),
  }
  breakdown = {}
  for name, fn in parts.items():
    arg = q_emb if name == "retrieval" else model
    breakdown[name] = _time(lambda fn=fn, arg=arg: fn(arg), iters)
  return batch / full, full, breakdown


def bench_hf(cfg, batch, iters, rng):
  import torch
  import transformers
  torch.set_num_threads(2)
  hc = transformers.RealmConfig(**hf_config_dict(cfg))
  scorer, encoder = transformers.RealmScorer(hc), transformers.RealmKnowledgeAugEncoder(hc)
  params = list(scorer.parameters()) + list(encoder.parameters())
  opt = torch.optim.AdamW(params, lr=1e-5)
  c, lq, lb = cfg.num_candidates, cfg.query_len, cfg.block_len
  q = torch.from_numpy(rng.integers(1000, 30000, (batch, lq)))
  cand = torch.from_numpy(rng.integers(1000, 30000, (batch, c, lb)))
  joint = torch.from_numpy(rng.integers(1000, 30000, (batch * c, lq + lb)))
  labels = torch.from_numpy(rng.integers(1000, 30000, (batch, lq + lb)))
  mlm_mask = torch.zeros(batch, lq + lb)
  mlm_mask[:, 5:8] = 1

  def step():
    opt.zero_grad()
    scores = scorer(q, candidate_input_ids=cand).relevance_score
    out = encoder(joint, relevance_score=scores, labels=labels, mlm_mask=mlm_mask)
    out.loss.backward()
    opt.step()

  step()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  full = statistics.median(times)
  return batch / full, full


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--presets", nargs="+", default=["tiny", "minilm"])
  ap.add_argument("--batch", type=int, default=2, help="queries per step (x 8 candidates)")
  ap.add_argument("--blocks", type=int, default=4096, help="blocks in the device index")
  ap.add_argument("--iters", type=int, default=5)
  args = ap.parse_args()
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; batch {args.batch} queries x 8 candidates, "
        f"96 + 288 tokens; index {args.blocks} blocks; median of {args.iters}")
  for preset in args.presets:
    cfg = get_preset(preset)
    rng = np.random.default_rng(0)
    ours, t_ours, parts = bench_ours(cfg, args.batch, args.blocks, args.iters, rng)
    hf, t_hf = bench_hf(cfg, args.batch, args.iters, rng)
    print(f"\n{preset}: ours {ours:.2f} ex/s ({t_ours * 1e3:.0f} ms/step) | HF PyTorch {hf:.2f} ex/s "
          f"({t_hf * 1e3:.0f} ms/step) | ratio ours/HF = {ours / hf:.2f}x")
    total = sum(parts.values())
    for name, t in parts.items():
      print(f"  {name:16s} {t * 1e3:8.1f} ms  ({100 * t / total:4.1f}% of the parts)")


if __name__ == "__main__":
  main()
