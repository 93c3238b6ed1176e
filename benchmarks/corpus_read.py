"""Reading a process's rows of the block corpus: our range-read token rows against TFDS.

One command: `python benchmarks/corpus_read.py [--blocks 20000] [--rows 5000] [--block-len 64]`

It builds a synthetic corpus (`benchmarks/scale.py`'s builder), prepares the same blocks as the
TFDS ArrayRecord dataset `realm_blocks` (`realm-jax corpus tfds`), and times reading the blocks
[N/4, N/4 + rows) -- one process's share -- both ways:
  - TFDS: `tfds.data_source(...)[i]` for each row, then `example_to_block` (the record as a Block);
  - ours: `CorpusReader.token_rows(lo, hi)`: one byte-range read per shard file, CRC32C-checked,
    `np.frombuffer`, no per-block Python.
It prints rows/s for both, the ratio, and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--blocks", type=int, default=20_000)
  p.add_argument("--rows", type=int, default=5_000)
  p.add_argument("--block-len", type=int, default=64)
  args = p.parse_args(argv)
  print(f"load average before: {os.getloadavg()}", flush=True)
  import numpy as np
  import tensorflow_datasets as tfds
  from scale import build_corpus

  from realm_jax.data.corpus_reader import CorpusReader
  from realm_jax.data.tfds_corpus import example_to_block

  with tempfile.TemporaryDirectory(prefix="realm-corpus-read-") as tmp:
    root, data_dir = pathlib.Path(tmp) / "run", pathlib.Path(tmp) / "tfds"
    root.mkdir()
    build_corpus(root, args.blocks, args.block_len, 10_000, seed=0)
    subprocess.run([sys.executable, "-m", "realm_jax", "corpus", "tfds", "--storage", str(root),
                    "--data-dir", str(data_dir)], check=True, capture_output=True)
    lo, hi = args.blocks // 4, args.blocks // 4 + args.rows
    source = tfds.data_source("realm_blocks", data_dir=str(data_dir))["train"]
    t0 = time.perf_counter()
    blocks = [example_to_block(source[i]) for i in range(lo, hi)]
    t_tfds = time.perf_counter() - t0
    corpus = CorpusReader(str(root), "corpus")
    t0 = time.perf_counter()
    rows = corpus.token_rows(lo, hi)
    t_ours = time.perf_counter() - t0
    # The same blocks both ways: the stored row holds [CLS] title [SEP] body [SEP].
    b = blocks[-1]
    n = len(b.title_ids) + len(b.body_ids) + 3
    assert np.array_equal(rows[-1, 1:n - 1][len(b.title_ids) + 1:], b.body_ids), "the two readers disagree"
  print(f"{args.rows} rows of a {args.blocks}-block corpus (block_len {args.block_len}):")
  print(f"  TFDS data_source + example_to_block: {t_tfds:.3f} s ({args.rows / t_tfds:,.0f} rows/s)")
  print(f"  CorpusReader.token_rows:             {t_ours:.4f} s ({args.rows / t_ours:,.0f} rows/s)")
  print(f"  ratio: {t_tfds / t_ours:,.0f}x")
  print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
  main()
