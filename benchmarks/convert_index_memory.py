"""Peak memory of `realm-jax convert index` streaming a block_emb out of a TF checkpoint.

One command: `python benchmarks/convert_index_memory.py [--rows 2000000] [--dim 128]`. Writes a
checkpoint with TensorFlow in a child process, then measures with `/usr/bin/time -v` (maximum
resident set size) three children: the conversion (embedding shards only, `--no-scann` path),
the same imports doing nothing (baseline), and TensorFlow's whole-array `get_tensor` (the naive
way). Prints each peak and its ratio to the array's size (the goal: conversion < 2x).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

WRITE = """
import sys, numpy as np, tensorflow as tf
n, d = int(sys.argv[2]), int(sys.argv[3])
arr = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
tf.raw_ops.SaveV2(prefix=sys.argv[1], tensor_names=["block_emb", "global_step"], shape_and_slices=["", ""],
                  tensors=[tf.constant(arr), tf.constant(1, tf.int64)])
"""
CONVERT = "from realm_jax.cli.main import main; import sys; sys.exit(main(sys.argv[1:]))"
BASELINE = "import realm_jax.cli.main, realm_jax.convert.index, realm_jax.retrieval.index, realm_jax.retrieval.embed"
NAIVE = ("import sys, tensorflow as tf; x = tf.train.load_checkpoint(sys.argv[1]).get_tensor('block_emb'); "
         "print(x.shape)")


def peak_rss(code: str, *args: str) -> tuple[int, float]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  res = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code, *args], capture_output=True,
                       text=True, env=env)
  if res.returncode:
    raise SystemExit(f"child failed:\n{res.stdout}\n{res.stderr}")
  kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
  wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", res.stderr).group(1)
  m, s = wall.split(":")[-2:]
  return kb * 1024, int(m) * 60 + float(s)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", type=int, default=2_000_000)
  p.add_argument("--dim", type=int, default=128)
  args = p.parse_args()
  size = args.rows * args.dim * 4
  with tempfile.TemporaryDirectory(prefix="realm-bench-") as tmp:
    prefix = os.path.join(tmp, "ckpt", "model.ckpt-1")
    subprocess.run([sys.executable, "-c", WRITE, prefix, str(args.rows), str(args.dim)], check=True,
                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    base, _ = peak_rss(BASELINE)
    conv, secs = peak_rss(CONVERT, "convert", "index", "--checkpoint", prefix, "--storage", os.path.join(tmp, "root"),
                          "--rows-per-shard", "500000", "--no-scann")
    naive, _ = peak_rss(NAIVE, prefix)
  def mb(b):
    return f"{b / 2**20:,.0f} MB"
  print(f"block_emb {args.rows:,} x {args.dim} float32 = {mb(size)}")
  print(f"  imports only (baseline)        peak RSS {mb(base)}  = {base / size:.2f}x the array")
  print(f"  realm-jax convert index        peak RSS {mb(conv)}  = {conv / size:.2f}x the array "
        f"({(conv - base) / size:.2f}x above baseline), {secs:.1f} s")
  print(f"  TF get_tensor (whole array)    peak RSS {mb(naive)}  = {naive / size:.2f}x the array")
  print(f"ratio conversion / array size: {conv / size:.2f} (goal < 2)")


if __name__ == "__main__":
  main()
