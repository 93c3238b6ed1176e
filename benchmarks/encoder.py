"""Knowledge-augmented encoder training-step throughput (forward + backward): ours against HF.

One command: `python benchmarks/encoder.py [--presets tiny minilm] [--queries 1] [--iters 5]`.
For each preset, one batch of `queries` x `candidates` sequences of `query_len + block_len`
tokens (96 + 288 = 384), ~10 masked query tokens each and random relevance scores, runs
  - ours "gathered": `KnowledgeAugEncoder` with the logits gathered at the masked positions
    (what our trainer does) + `marginal_log_likelihood`, `jax.jit(jax.value_and_grad)` over the
    `nnx.Param` state;
  - ours "all positions": the same but logits at every position (what HF computes), the
    apples-to-apples comparison;
  - HF: transformers 4.40.2 `RealmKnowledgeAugEncoder` (PyTorch) with `labels`,
    `relevance_score` and `mlm_mask`, so it computes its marginal loss, then `.backward()`;
all from the same random weights (HF's init, converted into ours). Compile and warm-up steps are
excluded; the variants are timed in alternating rounds (the machine is shared, so each sees the
same load) and the median step counts. Prints examples/s (one example = a query with all its
candidates) and the ratios ours / HF, plus |loss ours - loss HF| as a check that both computed
the same thing. Dropout is off by default (deterministic, no RNG cost on either side);
`--dropout` puts both models in training mode.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import numpy as np


def _inputs(cfg, queries: int, masked: int, seed: int) -> dict[str, np.ndarray]:
  """`[CLS] query [SEP] block [SEP]` shaped ids (int64), masked query positions, labels, scores."""
  rng = np.random.default_rng(seed)
  c, ql, bl, v = cfg.num_candidates, cfg.query_len, cfg.block_len, cfg.bert.vocab_size
  length = ql + bl
  ids = rng.integers(1000, v, size=(queries, c, length)).astype(np.int64)
  ids[..., 0], ids[..., ql - 1], ids[..., -1] = 101, 102, 102
  mask = np.ones_like(ids)
  types = np.zeros_like(ids)
  types[..., ql:] = 1
  # The same masked positions for every candidate of a query, inside the query segment.
  positions = np.stack([np.sort(rng.choice(np.arange(1, ql - 1), masked, replace=False))
                        for _ in range(queries)]).astype(np.int64)  # [B, P]
  ids[np.arange(queries)[:, None, None], np.arange(c)[None, :, None], positions[:, None, :]] = 103
  labels = rng.integers(1000, v, size=(queries, length)).astype(np.int64)  # [B, L]
  mlm_mask = np.zeros((queries, length), np.int64)
  np.put_along_axis(mlm_mask, positions, 1, axis=1)
  scores = (rng.normal(size=(queries, c)) * 3).astype(np.float32)
  return dict(ids=ids, mask=mask, types=types, positions=positions, labels=labels,
              mlm_mask=mlm_mask, scores=scores)


def _models(preset: str, dropout: bool, seed: int):
  """HF `RealmKnowledgeAugEncoder` with random init and our `KnowledgeAugEncoder` holding its weights."""
  import torch
  import transformers
  from flax import nnx

  from realm_jax.config import get_preset
  from realm_jax.convert import hf as hfconv
  from realm_jax.models import KnowledgeAugEncoder

  cfg = get_preset(preset)
  torch.manual_seed(seed)
  hf = transformers.RealmKnowledgeAugEncoder(transformers.RealmConfig(**hfconv.hf_config_dict(cfg)))
  ours = KnowledgeAugEncoder(cfg, rngs=nnx.Rngs(seed))
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  hfconv.load_state_dict(ours, sd, hfconv.encoder_rules(), skip=hfconv.SKIP_ENCODER,
                         source="RealmKnowledgeAugEncoder")
  if dropout:
    hf.train()
    ours.train()
  else:
    hf.eval()
    ours.eval()
  return cfg, ours, hf


def _ours_step(model, batch: dict[str, np.ndarray], gathered: bool) -> Callable[[], float]:
  """A jitted value_and_grad over the Params; returns a thunk running one step, giving the loss."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from realm_jax.models import marginal_log_likelihood

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  c = batch["ids"].shape[1]
  inputs = {k: jnp.asarray(batch[k], jnp.int32) for k in ("ids", "mask", "types")}
  inputs["scores"] = jnp.asarray(batch["scores"])
  if gathered:
    positions = jnp.asarray(batch["positions"], jnp.int32)  # [B, P]
    inputs["positions"] = jnp.broadcast_to(positions[:, None, :], (positions.shape[0], c, positions.shape[1]))
    inputs["targets"] = jnp.take_along_axis(jnp.asarray(batch["labels"], jnp.int32), positions, axis=1)
    inputs["target_mask"] = jnp.ones(inputs["targets"].shape, jnp.float32)
  else:
    inputs["targets"] = jnp.asarray(batch["labels"], jnp.int32)
    inputs["target_mask"] = jnp.asarray(batch["mlm_mask"], jnp.float32)

  def loss_fn(m, x):
    logits = m(x["ids"], x["mask"], x["types"], mlm_positions=x.get("positions"))
    return marginal_log_likelihood(logits, x["targets"], x["target_mask"], x["scores"])[0]

  @jax.jit
  def step(params, rest, x):
    m = nnx.merge(graphdef, params, rest)
    loss, grads = nnx.value_and_grad(loss_fn)(m, x)  # grads over nnx.Param only
    return loss, grads, nnx.state(m, nnx.Not(nnx.Param))  # carries the dropout RNG count forward

  state = {"rest": rest}

  def run() -> float:
    loss, grads, state["rest"] = step(params, state["rest"], inputs)
    jax.block_until_ready(grads)
    return float(loss)

  return run


def _hf_step(model, batch: dict[str, np.ndarray]) -> Callable[[], float]:
  """One forward with labels/relevance_score/mlm_mask (HF's marginal loss) and `.backward()`."""
  import torch

  b, c, n = batch["ids"].shape
  ids, mask, types = (torch.from_numpy(batch[k].reshape(b * c, n)) for k in ("ids", "mask", "types"))
  scores = torch.from_numpy(batch["scores"])
  labels, mlm_mask = torch.from_numpy(batch["labels"]), torch.from_numpy(batch["mlm_mask"])

  def run() -> float:
    model.zero_grad(set_to_none=True)
    out = model(ids, mask, types, relevance_score=scores, labels=labels, mlm_mask=mlm_mask)
    out.loss.backward()
    return out.loss.item()

  return run


def bench(preset: str, queries: int, masked: int, iters: int, warmup: int, dropout: bool,
          seed: int) -> dict:
  """Times the three variants of one preset in alternating rounds; medians in seconds per step."""
  cfg, ours, hf = _models(preset, dropout, seed)
  batch = _inputs(cfg, queries, masked, seed)
  runs = {"gathered": _ours_step(ours, batch, gathered=True),
          "all": _ours_step(ours, batch, gathered=False),
          "hf": _hf_step(hf, batch)}
  first, compile_s = {}, {}
  for name, run in runs.items():  # compile (ours) and warm up; not timed
    t0 = time.perf_counter()
    first[name] = run()
    compile_s[name] = time.perf_counter() - t0
    for _ in range(warmup - 1):
      run()
  times = {name: [] for name in runs}
  for _ in range(iters):
    for name, run in runs.items():
      t0 = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t0)
  med = {name: statistics.median(t) for name, t in times.items()}
  return dict(preset=preset, queries=queries, seqs=queries * cfg.num_candidates,
              length=cfg.query_len + cfg.block_len, masked=masked, median=med,
              eps={k: queries / v for k, v in med.items()}, compile_s=compile_s,
              loss_diff={k: abs(first[k] - first["hf"]) for k in ("gathered", "all")}, loss=first["hf"])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--presets", nargs="+", default=["tiny", "minilm"])
  p.add_argument("--queries", type=int, default=1, help="queries per batch (each with all candidates)")
  p.add_argument("--masked", type=int, default=10, help="masked query tokens per example")
  p.add_argument("--iters", type=int, default=5, help="timed steps per variant (median reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant (>= 1: compile)")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
  p.add_argument("--dropout", action="store_true", help="training mode (dropout on) for both models")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.warmup < 1 or args.iters < 1 or args.queries < 1 or args.masked < 1:
    p.error("--warmup, --iters, --queries and --masked must be >= 1")

  import jax
  import torch
  import transformers

  torch.set_num_threads(args.threads)
  print(f"jax {jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads; transformers "
        f"{transformers.__version__}; {os.cpu_count()} CPU cores; dropout {'on' if args.dropout else 'off'}",
        flush=True)
  rows = []
  for preset in args.presets:
    r = bench(preset, args.queries, args.masked, args.iters, args.warmup, args.dropout, args.seed)
    rows.append(r)
    m, cs = r["median"], r["compile_s"]
    print(f"{preset}: {r['queries']} x {r['seqs'] // r['queries']} x {r['length']} tokens, "
          f"{r['masked']} masked; median step ours gathered {m['gathered']:.3f} s, ours all "
          f"{m['all']:.3f} s, HF {m['hf']:.3f} s; first step (compile) {cs['gathered']:.1f} / "
          f"{cs['all']:.1f} / {cs['hf']:.1f} s; HF loss {r['loss']:.6f}, |ours - HF| gathered "
          f"{r['loss_diff']['gathered']:.1e}, all {r['loss_diff']['all']:.1e}",
          flush=True)
  if args.dropout:
    print("(dropout on: the two sides draw different masks, so their losses differ)")
  print("\nexamples/s (1 example = 1 query x its candidates), median of timed steps")
  print("preset   batch(seqs)  ours-gathered  ours-all  HF-torch  gathered/HF  all/HF")
  for r in rows:
    e = r["eps"]
    print(f"{r['preset']:<8} {r['queries']:>3} ({r['seqs']:>3})    {e['gathered']:>11.3f}  "
          f"{e['all']:>8.3f}  {e['hf']:>8.3f}  {e['gathered'] / e['hf']:>11.2f}  "
          f"{e['all'] / e['hf']:>6.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
