"""Per-device memory of the REALM train step: our estimate (realm_jax/train/memory.py) against XLA.

One command: `python benchmarks/memory.py [--configs tiny:1:16 tiny:8:16 minilm:1:4 minilm:8:8]`
(preset:devices:global batch); `--table` prints the estimate table of tpu/README.md instead. For
each, a child process with that many emulated CPU devices builds a small synthetic corpus, the
real `Trainer` (its `train_step`, not a copy), a random index
of the corpus' size, lowers and compiles the step for one batch, and reads
`compiled.memory_analysis()`: arguments (state, corpus tables, index, batch; per device) and
temporaries (activations, gradients, search tiles). It prints estimate / measured per part.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DEFAULT_CONFIGS = ("tiny:1:16", "tiny:8:16", "minilm:1:4", "minilm:8:8")


def write_corpus(root: str, num_docs: int = 40, seed: int = 0) -> None:
  """A synthetic corpus under `root`: `num_docs` documents of random words (~9 blocks each)."""
  import numpy as np

  from realm_jax.data.corpus import build_corpus
  from realm_jax.storage import Storage

  rng = np.random.default_rng(seed)
  words = [f"w{i}" for i in range(3000)]
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "docs.jsonl"), "w") as f:
    for d in range(num_docs):
      text = " ".join(" ".join(rng.choice(words, 12)) + "." for _ in range(60))
      f.write(json.dumps({"title": f"Doc {d}", "text": text}) + "\n")
  build_corpus([os.path.join(root, "docs.jsonl")], Storage.open(root), block_len=288)


def train_config(preset: str, batch: int, remat: str = "none"):
  """The measured config: a preset's towers with the paper's lengths and 8 candidates."""
  from realm_jax.config import get_preset
  from realm_jax.train.config import TrainConfig

  return TrainConfig(model=get_preset(preset, **{"bert.remat": remat}), batch_size=batch, masking="random_token",
                     index_refresh="none", async_checkpointing=False, num_train_steps=10)


def measure(preset: str, batch: int, root: str, remat: str = "none") -> dict:
  """Compiles the trainer's step in this process; returns XLA's per-device sizes and our estimate."""
  import jax
  import numpy as np
  from flax import nnx

  from realm_jax.retrieval import mips
  from realm_jax.train import inputs, memory
  from realm_jax.train.trainer import Trainer

  cfg = train_config(preset, batch, remat)
  trainer = Trainer(cfg, root, log_fn=lambda m: None, write_done=False)
  n = trainer.dev_corpus.num_blocks
  rng = np.random.default_rng(0)
  index = mips.shard_rows(rng.standard_normal((n, cfg.model.retriever_dim)).astype(np.float32), trainer.mesh)
  batch_arrays = inputs.global_batch(next(iter(trainer.loader)), trainer.batch_sharding, trainer.same_corpus)
  state = nnx.state((trainer.model, trainer.optimizer))
  t0 = time.perf_counter()
  compiled = trainer._train_step.lower(state, batch_arrays, trainer.dev_corpus, index).compile()
  compile_s = time.perf_counter() - t0
  stats = compiled.memory_analysis()
  trainer.loader.close()
  est = memory.estimate(cfg, jax.device_count(), n, accelerator=False)
  return {
      "preset": preset, "devices": jax.device_count(), "batch": batch, "remat": remat, "num_blocks": n,
      "compile_seconds": round(compile_s, 1),
      "measured": {"arguments": int(stats.argument_size_in_bytes), "temporaries": int(stats.temp_size_in_bytes),
                   "outputs": int(stats.output_size_in_bytes), "aliased": int(stats.alias_size_in_bytes)},
      "estimate": {"arguments": est.arguments, "temporaries": est.temporaries, **dict(est.rows())},
  }


def run_child(preset: str, devices: int, batch: int, root: str, timeout: int = 1200, remat: str = "none") -> dict:
  """`measure` in a fresh process with `devices` emulated CPU devices (fixed at JAX import)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices), "TF_CPP_MIN_LOG_LEVEL": "2"}
  cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{preset}:{devices}:{batch}:{remat}", "--root", root]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  if out.returncode != 0:
    raise RuntimeError(f"measuring {preset}:{devices}:{batch} failed:\n{out.stderr[-3000:]}")
  line = next(line for line in out.stdout.splitlines() if line.startswith("MEMORY="))
  return json.loads(line[len("MEMORY="):])


SLICES = (("v4-32", 16, 32 * 2**30), ("v4-64", 32, 32 * 2**30), ("v5e-64", 64, 16 * 2**30),
          ("8x H100 80GB", 8, 80 * 10**9))
WIKI_BLOCKS = 13_353_718


def fitting_accum(cfg, devices: int, hbm: int, remat: bool, index_dtype: str, headroom: float = 0.9):
  """The smallest grad_accum_steps whose micro-batch fits `headroom x hbm` (None: not even 1/device)."""
  from realm_jax.train import memory

  accum = 1
  while cfg.batch_size % accum == 0 and cfg.batch_size // accum >= devices:
    c = cfg.replace(grad_accum_steps=accum)
    if (cfg.batch_size // accum) % devices == 0:
      est = memory.estimate(c, devices, WIKI_BLOCKS, index_dtype=index_dtype, remat=remat)
      if est.total <= headroom * hbm:
        return accum, est
    accum *= 2
  return None, None


def print_table(experiment: str = "realm_wiki_base") -> None:
  """Markdown table of the estimate for the paper's REALM run on the slices of tpu/README.md."""
  from realm_jax.train import memory
  from realm_jax.train.config import load_config

  cfg = load_config(experiment)
  def gb(x):
    return f"{x / 2**30:.2f}"
  print(f"Estimate ({experiment}: {cfg.model.bert.num_layers}-layer towers, batch {cfg.batch_size}, "
        f"k={cfg.model.num_candidates}, query {cfg.model.query_len}, block {cfg.model.block_len}, "
        f"{cfg.model.bert.dtype} compute; {WIKI_BLOCKS:,} blocks x {cfg.model.retriever_dim}); GiB per device")
  print("| slice | devices | HBM/device | params | AdamW (mu, nu) | grads | index f32 / bf16 | block tokens "
        "| activations / example (no remat / remat) | whole batch in one step (no remat) "
        "| fits, no remat: per device x grad_accum, total | fits, remat: per device x grad_accum, total |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for name, devices, hbm in SLICES:
    f32 = memory.estimate(cfg, devices, WIKI_BLOCKS)
    bf = memory.estimate(cfg, devices, WIKI_BLOCKS, index_dtype="bfloat16")
    rm = memory.estimate(cfg, devices, WIKI_BLOCKS, remat=True)
    cells = []
    for remat in (False, True):
      accum, est = fitting_accum(cfg, devices, hbm, remat, "float32")
      cells.append("does not fit" if est is None else f"{est.per_device_batch} x {accum}, {gb(est.total)}")
    print(f"| {name} | {devices} | {gb(hbm)} | {gb(f32.params)} | {gb(f32.optimizer)} | {gb(f32.gradients)} "
          f"| {gb(f32.index)} / {gb(bf.index)} | {gb(f32.block_tokens)} "
          f"| {gb(f32.per_example_activations)} / {gb(rm.per_example_activations)} "
          f"| {f32.per_device_batch}/device: {gb(f32.total)} | {cells[0]} | {cells[1]} |")


def _parse(spec: str) -> tuple[str, int, int, str]:
  """`preset:devices:batch[:remat]` (remat: none, full or dots; default none)."""
  parts = spec.split(":")
  if len(parts) not in (3, 4):
    raise SystemExit(f"memory.py: config {spec!r} is not preset:devices:batch[:remat]")
  return parts[0], int(parts[1]), int(parts[2]), parts[3] if len(parts) == 4 else "none"


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="preset:devices:global_batch[:remat]")
  ap.add_argument("--root", default=None, help="where the synthetic corpus is built (default: a temp dir)")
  ap.add_argument("--table", action="store_true", help="print the estimate table of tpu/README.md and exit")
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.table:
    print_table()
    return
  if args.child:
    preset, _, batch, remat = _parse(args.child)
    print("MEMORY=" + json.dumps(measure(preset, batch, args.root, remat)), flush=True)
    return
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    root = args.root or os.path.join(tmp, "root")
    write_corpus(root)
    print(f"{'config':<16} {'part':<12} {'estimate MB':>12} {'XLA MB':>10} {'est/XLA':>8}")
    for spec in args.configs:
      preset, devices, batch, remat = _parse(spec)
      r = run_child(preset, devices, batch, root, remat=remat)
      for part in ("arguments", "temporaries"):
        e, m = r["estimate"][part], r["measured"][part]
        print(f"{spec:<16} {part:<12} {e / 1e6:>12.1f} {m / 1e6:>10.1f} {e / m:>8.3f}")
      e = r["estimate"]["arguments"] + r["estimate"]["temporaries"]
      m = r["measured"]["arguments"] + r["measured"]["temporaries"]
      print(f"{spec:<16} {'total':<12} {e / 1e6:>12.1f} {m / 1e6:>10.1f} {e / m:>8.3f}"
            f"   ({r['num_blocks']} blocks, compile {r['compile_seconds']}s)", flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
