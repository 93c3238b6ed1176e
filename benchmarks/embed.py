"""Document-embedding throughput (blocks/s, 288-token blocks): ours against HF's RealmEmbedder.

One command: `python benchmarks/embed.py [--presets tiny minilm] [--blocks 512] [--batch 64]
[--corpus wikipedia|short]`.
For each preset, the same real Wikipedia blocks (the gensim excerpt, MiniLM vocabulary) are
embedded by
  - ours: `make_embed_fn` (jit, length-bucketed batches of fixed rows, sharded over this host's
    devices), and `embed_corpus` end to end (shard reads, features, embedding, .npy writes to
    memory://);
  - HF:   transformers 4.40.2 `RealmEmbedder` (PyTorch, eval, inference_mode), same weights,
          same batches;
timed in alternating rounds in the same run (the machine is shared: the best round counts), and
prints the ratio ours / HF plus the largest difference between the two embeddings, GFLOP/s
counted on the real (unpadded) tokens, and the 1-minute load average before and after.
`--corpus short` cuts the articles into blocks of <= 64 tokens (paragraph tails, glosses) that are
still padded to `--block-len` as in a 288-token index; `--padded` also times ours without length
bucketing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def _corpus(block_len: int, max_blocks: int, kind: str = "wikipedia"):
  from realm_jax.data import sources
  from realm_jax.data.corpus import CorpusReader, build_corpus
  from realm_jax.storage import Storage

  storage = Storage.open(f"memory://bench-embed-{os.getpid()}")
  build_corpus([str(sources.wikipedia_excerpt())], storage, block_len=64 if kind == "short" else block_len,
               shard_blocks=max(1, max_blocks // 2), tokenizer="minilm")
  return storage, CorpusReader(storage)


def _features(corpus, n: int, block_len: int):
  from realm_jax.data.features import blocks_doc_inputs

  blocks = []
  for b in corpus.iter_blocks():
    blocks.append(b)
    if len(blocks) == n:
      break
  while len(blocks) < n:  # a small corpus is cycled
    blocks += blocks[:n - len(blocks)]
  return blocks_doc_inputs(blocks, block_len, corpus.tokenizer())


def _models(preset: str, block_len: int, dtype: str = "float32"):
  import torch
  import transformers
  from flax import nnx

  from realm_jax.config import get_preset
  from realm_jax.convert import hf as hfconv
  from realm_jax.models.retriever import RetrieverEmbedder

  cfg = get_preset(preset, **{"bert.vocab_size": 30522, "block_len": block_len, "bert.dtype": dtype})
  torch.manual_seed(0)
  hf = transformers.RealmEmbedder(transformers.RealmConfig(**hfconv.hf_config_dict(cfg))).eval()
  ours = RetrieverEmbedder(cfg, rngs=nnx.Rngs(0))
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  hfconv.load_state_dict(ours, sd, hfconv.embedder_rules(), skip=hfconv.SKIP_EMBEDDER,
                         source="RealmEmbedder")
  return cfg, ours, hf


def _hf_embed(hf, feats, batch: int, dtype: str = "float32") -> np.ndarray:
  import torch

  out = []
  # bfloat16: PyTorch's CPU autocast (oneDNN bfloat16 matmuls, float32 accumulation) as the peer
  with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
    for s in range(0, len(feats["input_ids"]), batch):
      args = [torch.from_numpy(feats[k][s:s + batch].astype(np.int64))
              for k in ("input_ids", "attention_mask", "token_type_ids")]
      out.append(hf(*args).projected_score.float().numpy())
  return np.concatenate(out)


def real_token_flops(cfg, attention_mask: np.ndarray) -> float:
  """Forward FLOPs of the document tower over the real tokens only (matmuls and attention)."""
  h, inter, layers = cfg.bert.hidden_size, cfg.bert.intermediate_size, cfg.bert.num_layers
  lengths = np.asarray(attention_mask).sum(1).astype(np.float64)
  per_layer = 2 * lengths * (4 * h * h + 2 * h * inter) + 4 * lengths ** 2 * h
  return float(layers * per_layer.sum() + 2 * len(lengths) * (h * h + h * cfg.retriever_dim))


def _best(fn, rounds: int) -> tuple[float, object]:
  best, result = float("inf"), None
  for _ in range(rounds):
    t0 = time.perf_counter()
    result = fn()
    best = min(best, time.perf_counter() - t0)
  return best, result


def bench(preset: str, storage, corpus, n: int, batch: int, rounds: int, block_len: int,
          padded: bool = False, dtype: str = "float32") -> dict:
  import jax
  import torch

  from realm_jax.retrieval.embed import embed_corpus, make_embed_fn

  cfg, ours, hf = _models(preset, block_len, dtype)
  feats = _features(corpus, n, block_len)
  fn = make_embed_fn(ours, batch_size=batch)
  t0 = time.perf_counter()
  fn(feats)  # compile every padded length these blocks use
  compile_s = time.perf_counter() - t0
  fn_padded = make_embed_fn(ours, batch_size=batch, bucketing=False) if padded else None
  if fn_padded:
    fn_padded({k: v[:batch] for k, v in feats.items()})
  _hf_embed(hf, {k: v[:batch] for k, v in feats.items()}, batch, dtype)  # warm up

  ours_s = hf_s = padded_s = float("inf")
  for _ in range(rounds):  # alternate, so both see the same machine load
    s, got = _best(lambda: fn(feats), 1)
    ours_s = min(ours_s, s)
    s, want = _best(lambda: _hf_embed(hf, feats, batch, dtype), 1)
    hf_s = min(hf_s, s)
    if fn_padded:
      padded_s = min(padded_s, _best(lambda: fn_padded(feats), 1)[0])
  diff = float(np.abs(got - want).max())
  flops = real_token_flops(cfg, feats["attention_mask"])

  corpus_blocks = min(corpus.num_blocks, n)
  sub = _SubCorpus(corpus, corpus_blocks)
  corpus_s = float("inf")
  for r in range(rounds):
    res = embed_corpus(sub, fn, storage, f"bench/{preset}/{r}", progress=False)
    corpus_s = min(corpus_s, res.seconds)
  return dict(preset=preset, devices=jax.device_count(), torch_threads=torch.get_num_threads(),
              batch=fn.batch_size, blocks=n, ours=n / ours_s, hf=n / hf_s, diff=diff,
              compile_s=compile_s, corpus=corpus_blocks / corpus_s, corpus_blocks=corpus_blocks,
              ours_gflops=flops / ours_s / 1e9, hf_gflops=flops / hf_s / 1e9, padded=n / padded_s,
              mean_len=float(feats["attention_mask"].sum(1).mean()))


class _SubCorpus:
  """The first shards of a CorpusReader holding at most `max_blocks` blocks (same reader API)."""

  def __init__(self, corpus, max_blocks: int):
    self._c = corpus
    self.shards, total = [], 0
    for s in corpus.shards:
      if total + s["num_blocks"] > max_blocks and self.shards:
        break
      self.shards.append(s)
      total += s["num_blocks"]
    self.num_blocks, self.block_len = total, corpus.block_len
    self.num_shards = len(self.shards)

  def read_shard(self, i: int, text: bool = True):
    return self._c.read_shard(i, text=text)

  def tokenizer(self):
    return self._c.tokenizer()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--presets", nargs="+", default=["tiny", "minilm"])
  p.add_argument("--blocks", type=int, default=256,
                 help="blocks per timed round (keep it a multiple of 2 x batch: two full shards)")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--block-len", type=int, default=288)
  p.add_argument("--corpus", choices=("wikipedia", "short"), default="wikipedia",
                 help="short: blocks of <= 64 tokens, padded to --block-len")
  p.add_argument("--padded", action="store_true", help="also time ours without length bucketing")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype of both sides (bfloat16: ours `bert.dtype`, HF under torch.autocast)")
  args = p.parse_args(argv)
  if args.block_len < 64 and args.corpus == "short":
    p.error("--corpus short needs --block-len >= 64")

  import jax
  print(f"load average (1 min) before: {os.getloadavg()[0]:.2f}", flush=True)
  storage, corpus = _corpus(args.block_len, args.blocks, args.corpus)
  print(f"corpus: {corpus.num_blocks} blocks of <= {corpus.block_len} tokens ({args.corpus}, Wikipedia "
        f"excerpt), padded to {args.block_len}; jax {jax.__version__} on {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s)", flush=True)
  rows = []
  for preset in args.presets:
    r = bench(preset, storage, corpus, args.blocks, args.batch, args.rounds, args.block_len, args.padded,
              args.dtype)
    rows.append(r)
    print(f"{preset} ({args.dtype}): ours {r['ours']:.1f} blocks/s, HF RealmEmbedder {r['hf']:.1f} blocks/s, "
          f"ratio {r['ours'] / r['hf']:.2f}x; real-token GFLOP/s ours {r['ours_gflops']:.1f}, HF "
          f"{r['hf_gflops']:.1f} (mean {r['mean_len']:.0f} real tokens a block); embed_corpus "
          f"{r['corpus']:.1f} blocks/s ({r['corpus_blocks']} blocks incl. reads/features/writes); "
          f"compile {r['compile_s']:.1f} s; max |ours - HF| {r['diff']:.1e}"
          + (f"; ours unbucketed {r['padded']:.1f} blocks/s" if args.padded else ""), flush=True)
  print("\npreset   corpus     batch  ours blk/s  HF blk/s  ratio  embed_corpus blk/s  max|diff|")
  for r in rows:
    print(f"{r['preset']:<8} {args.corpus:<9} {r['batch']:>5}  {r['ours']:>10.1f}  {r['hf']:>8.1f}  "
          f"{r['ours'] / r['hf']:>5.2f}  {r['corpus']:>18.1f}  {r['diff']:.1e}")
  print(f"load average (1 min) after: {os.getloadavg()[0]:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
