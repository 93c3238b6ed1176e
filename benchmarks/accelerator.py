"""One accelerator benchmark, one JSON file: REALM step, corpus embedding, exact MIPS, memory.

    pip install -e ".[cuda]" && python benchmarks/accelerator.py --out accelerator.json   # one GPU, < 8 min
    python benchmarks/accelerator.py --dry-run --out /tmp/dry.json                       # CPU, tiny sizes

On the first device (random weights, synthetic inputs; compile excluded, best of `--repeats`):
  - REALM train step at `base` (bfloat16 compute, float32 params and AdamW, per-layer remat,
    8 candidates, 96 query + 288 block tokens, exact top-7 MIPS over a device index of
    `--index-blocks` rows): examples/s and MFU (model FLOPs: 3x the forward matmuls and attention
    of the query tower, the 8 candidates' document tower and the 8 x 384-token encoder);
  - corpus embedding of 288-token blocks (bfloat16, `make_embed_fn`): blocks/s and MFU;
  - exact MIPS over 13,353,718 x 128 bfloat16 rows (the Wikipedia index), k=8: queries/s;
  - `memory_analysis()` of the compiled step against `realm_jax/train/memory.py`'s estimate.
MFU is against `--peak-tflops` (default: the device's dense bfloat16 peak from a small table;
on CPU and unknown devices a timed large bfloat16 matmul). `--dry-run` shrinks everything to the
tiny preset and small sizes, so CI can run it on CPU in about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0}
WIKI_BLOCKS = 13_353_718


def bert_forward_flops(b, seq_len: int, sequences: int) -> float:
  """Matmul + attention FLOPs of one BERT forward over `sequences` sequences of `seq_len` tokens."""
  h, i = b.hidden_size, b.intermediate_size
  per_layer = 2 * seq_len * (4 * h * h + 2 * h * i) + 4 * seq_len * seq_len * h
  return float(sequences * b.num_layers * per_layer)


def realm_step_flops(cfg, batch: int) -> float:
  """Model FLOPs of one REALM train step: 3x forward (remat's recomputation not counted)."""
  c, b = cfg.num_candidates, cfg.bert
  fwd = (bert_forward_flops(b, cfg.query_len, batch) + bert_forward_flops(b, cfg.block_len, batch * c)
         + bert_forward_flops(b, cfg.query_len + cfg.block_len, batch * c))
  return 3 * fwd


def _best(fn, repeats: int) -> float:
  import jax
  jax.block_until_ready(fn())  # compile / warm up
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
  return best


def peak_tflops(given: float | None) -> tuple[float, str]:
  import jax
  import jax.numpy as jnp
  if given:
    return given, "given"
  kind = jax.devices()[0].device_kind
  for name, tf in PEAK_BF16_TFLOPS.items():
    if name.lower() in kind.lower():
      return tf, f"table ({kind})"
  n = 2048
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda x: x @ x)
  return 2 * n ** 3 / _best(lambda: f(a), 3) / 1e12, f"timed {n}^3 bfloat16 matmul ({kind})"


def bench_step(cfg, batch: int, index_blocks: int, repeats: int) -> dict:
  from benchmarks.train_step import ours_step
  rng = np.random.default_rng(0)
  run, _ = ours_step(cfg, batch, index_blocks, rng)
  s = _best(run, repeats)
  return {"batch": batch, "seconds": s, "examples_per_s": batch / s, "flops": realm_step_flops(cfg, batch)}


def bench_embed(cfg, blocks: int, batch: int, repeats: int) -> dict:
  from flax import nnx

  from realm_jax.models.retriever import RetrieverEmbedder
  from realm_jax.retrieval.embed import make_embed_fn
  rng = np.random.default_rng(0)
  n = cfg.block_len
  feats = {"input_ids": rng.integers(1000, 30000, (blocks, n)).astype(np.int32),
           "attention_mask": np.ones((blocks, n), np.int32), "token_type_ids": np.zeros((blocks, n), np.int32)}
  fn = make_embed_fn(RetrieverEmbedder(cfg, rngs=nnx.Rngs(0)), batch_size=batch)
  s = _best(lambda: fn(feats), repeats)
  return {"blocks": blocks, "seconds": s, "blocks_per_s": blocks / s, "flops": bert_forward_flops(cfg.bert, n, blocks)}


def bench_mips(rows: int, dim: int, queries: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp

  from realm_jax.retrieval import mips
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,))
  index = mips.place_rows(rows, dim, lambda a, b: np.random.default_rng(a).random((b - a, dim), dtype=np.float32) - 0.5,
                          mesh, dtype=jnp.bfloat16)
  q = jnp.asarray(np.random.default_rng(1).random((queries, dim), dtype=np.float32) - 0.5, jnp.bfloat16)
  s = _best(lambda: mips.search(q, index, 8).ids, repeats)
  return {"rows": rows, "dim": dim, "queries": queries, "seconds": s, "queries_per_s": queries / s}


def bench_memory(cfg, batch: int, index_blocks: int) -> dict:
  """XLA's per-device sizes of the compiled step against train/memory.py's estimate."""
  import jax

  from benchmarks.train_step import step_parts
  from realm_jax.train import memory
  from realm_jax.train.config import TrainConfig
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,))
  _, state, b, _, _, step = step_parts(cfg, batch, index_blocks, np.random.default_rng(0), mesh)
  stats = jax.jit(step, donate_argnums=0).lower(state, b).compile().memory_analysis()
  tcfg = TrainConfig(model=cfg, batch_size=batch, index_refresh="none", async_checkpointing=False,
                     num_train_steps=10)
  est = memory.estimate(tcfg, 1, index_blocks, remat=cfg.bert.remat != "none",
                        accelerator=jax.devices()[0].platform != "cpu")
  got = {"arguments": int(stats.argument_size_in_bytes), "temporaries": int(stats.temp_size_in_bytes)}
  return {"measured": got, "estimate": {"arguments": est.arguments, "temporaries": est.temporaries},
          "temporaries_estimate_over_measured": est.temporaries / max(got["temporaries"], 1)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="the JSON file to write")
  p.add_argument("--dry-run", action="store_true", help="tiny preset and small sizes (CPU, CI)")
  p.add_argument("--batch", type=int, default=8, help="REALM step queries per step")
  p.add_argument("--index-blocks", type=int, default=65536, help="rows of the step's device index")
  p.add_argument("--embed-blocks", type=int, default=2048)
  p.add_argument("--mips-rows", type=int, default=WIKI_BLOCKS)
  p.add_argument("--mips-queries", type=int, default=1024)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--peak-tflops", type=float, default=None, help="dense bfloat16 peak of the device")
  args = p.parse_args(argv)
  if args.batch < 1 or args.index_blocks < 8 or args.repeats < 1:
    p.error("--batch and --repeats must be >= 1 and --index-blocks >= 8")

  import jax

  from realm_jax.config import get_preset
  preset = "tiny" if args.dry_run else "base"
  cfg = get_preset(preset, **{"bert.dtype": "bfloat16", "bert.remat": "full"})
  if args.dry_run:
    args.batch, args.index_blocks, args.embed_blocks = 2, 256, 64
    args.mips_rows, args.mips_queries, args.repeats = 20_000, 64, 1
  t0 = time.perf_counter()
  peak, peak_source = peak_tflops(args.peak_tflops)
  result = {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
            "jax": jax.__version__, "preset": preset, "dry_run": args.dry_run, "dtype": "bfloat16",
            "remat": "full", "candidates": cfg.num_candidates, "query_len": cfg.query_len,
            "block_len": cfg.block_len, "peak_tflops": peak, "peak_source": peak_source}
  step = bench_step(cfg, args.batch, args.index_blocks, args.repeats)
  step["mfu"] = step["flops"] / step["seconds"] / (peak * 1e12)
  result["realm_step"] = step
  print(f"REALM step: {step['examples_per_s']:.2f} examples/s, MFU {step['mfu']:.1%}", flush=True)
  emb = bench_embed(cfg, args.embed_blocks, 256 if not args.dry_run else 32, args.repeats)
  emb["mfu"] = emb["flops"] / emb["seconds"] / (peak * 1e12)
  result["embedding"] = emb
  print(f"embedding: {emb['blocks_per_s']:.1f} blocks/s, MFU {emb['mfu']:.1%}", flush=True)
  result["mips"] = bench_mips(args.mips_rows, cfg.retriever_dim, args.mips_queries, args.repeats)
  print(f"MIPS {args.mips_rows:,} x {cfg.retriever_dim} bfloat16: {result['mips']['queries_per_s']:.0f} queries/s",
        flush=True)
  result["memory"] = bench_memory(cfg, args.batch, args.index_blocks)
  print(f"memory: {json.dumps(result['memory'])}", flush=True)
  result["seconds"] = time.perf_counter() - t0
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out} ({result['seconds']:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
