"""ScaNN recall@k and queries/s: one searcher over every row against P partitions merged at query time.

One command: `python benchmarks/scann_recall.py [--rows 1000000] [--dim 128] [--queries 1000]
[--k 10] [--partitions 4]` (`--rows 100000` for a quick run). On the clustered float32 corpus and
queries of `benchmarks/mips.py` it builds, with the default `ScannConfig`,
  (a) one searcher over all rows (`scann_index.build_searcher`);
  (b) what a `--partitions`-process refresher publishes by default: each process's consecutive
      rows (`index.process_shards` over `--shards` equal corpus shards) split into searchers of at
      most `ScannConfig.partition_rows` rows, all merged at query time by
      `scann_index.PartitionedSearcher`;
each saved and loaded back the way a published version is read, and prints build seconds,
recall@k against an exact numpy top-k (float64 rescoring) and queries/s (best of `--repeats`
passes, single-threaded search and with ScaNN's thread pool). The load average is printed
before and after: the machine may be shared, and queries/s only compare within one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from mips import clustered  # noqa: E402

from realm_jax.retrieval import index as index_lib, scann_index  # noqa: E402


def exact_top_k(db: np.ndarray, q: np.ndarray, k: int, batch: int | None = None) -> np.ndarray:
  """Exact top-k ids, best first: the top 4k by a float32 matmul (in query batches of at most
  2^26 scores: bounded memory), rescored in float64: float32 rounding only picks the 4k
  candidates, not their order."""
  wide = min(4 * k, len(db))
  batch = batch or max(1, min(128, (1 << 26) // len(db)))
  out = np.empty((len(q), k), np.int64)
  for s in range(0, len(q), batch):
    qb = q[s:s + batch]
    cand = np.argpartition(-(qb @ db.T), wide - 1, axis=1)[:, :wide]
    scores = np.einsum("qd,qkd->qk", qb.astype(np.float64), db[cand].astype(np.float64))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out[s:s + batch] = np.take_along_axis(cand, order, axis=1)
  return out


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
  """Fraction of the exact top-k found (order ignored)."""
  return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, truth)) / truth.size


def saved_and_loaded(index: scann_index.ScannIndex, tmp: pathlib.Path, name: str) -> scann_index.ScannIndex:
  return scann_index.load_searcher(scann_index.save_searcher(index, tmp / name))


def partition_bounds(rows: int, shards: int, partitions: int) -> list[tuple[int, int]]:
  """The refresher's row ranges: `shards` equal corpus shards, a contiguous run per process."""
  first = [rows * s // shards for s in range(shards + 1)]
  out = []
  for p in range(partitions):
    run = index_lib.process_shards(shards, p, partitions)
    out.append((first[run.start], first[run.stop]))
  return out


def timed_search(searcher, q: np.ndarray, k: int, parallel: bool, repeats: int) -> tuple[float, np.ndarray]:
  """Best wall time of `repeats` searches of every query (one batch), and the ids."""
  best, ids = float("inf"), None
  for _ in range(repeats):
    t0 = time.perf_counter()
    ids = searcher.search(q, k, parallel=parallel).ids
    best = min(best, time.perf_counter() - t0)
  return best, ids


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", type=int, default=1_000_000)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--clusters", type=int, default=1000)
  p.add_argument("--partitions", type=int, default=4)
  p.add_argument("--shards", type=int, default=64, help="corpus shards the refresher's processes split")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  if args.rows < args.partitions or args.shards < args.partitions or min(args.k, args.queries) < 1:
    p.error("need --rows and --shards >= --partitions, and --k, --queries >= 1")

  n, d, nq, k = args.rows, args.dim, args.queries, args.k
  print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
  print(f"ScaNN recall benchmark: {n:,} x {d} float32 clustered rows, {nq:,} queries, recall@{k}, "
        f"default ScannConfig (reorder {scann_index.ScannConfig().reorder}, partition_rows "
        f"{scann_index.ScannConfig().partition_rows:,})")
  t0 = time.perf_counter()
  db = clustered(n, d, args.clusters, draw_seed=1)
  q = clustered(nq, d, args.clusters, draw_seed=2)
  print(f"data generated in {time.perf_counter() - t0:.1f} s")
  t0 = time.perf_counter()
  truth = exact_top_k(db, q, k)
  print(f"exact numpy top-{k} in {time.perf_counter() - t0:.1f} s")

  config = scann_index.ScannConfig()
  results = []
  with tempfile.TemporaryDirectory(prefix="scann-recall-") as tmp_name:
    tmp = pathlib.Path(tmp_name)
    t0 = time.perf_counter()
    one = saved_and_loaded(scann_index.build_searcher(db, dataclasses.replace(config, partition_rows=n)), tmp, "one")
    built = time.perf_counter() - t0
    info = one.info
    results.append((f"(a) 1 searcher, {info.kind} leaves {info.num_leaves} search {info.leaves_to_search}",
                    built, scann_index.PartitionedSearcher([(one, 0)])))
    bounds = partition_bounds(n, args.shards, args.partitions)
    t0 = time.perf_counter()
    parts = []
    for i, (a, b) in enumerate(bounds):  # one refresher process's rows ...
      for j, (c, d) in enumerate(scann_index.partition_bounds(b - a, config.partition_rows)):  # ... its partitions
        parts.append((saved_and_loaded(scann_index.build_searcher(db[a + c:a + d], config), tmp,
                                       f"part-{i:05d}-{j:04d}"), a + c))
    built = time.perf_counter() - t0
    info = parts[0][0].info
    results.append((f"(b) {args.partitions} processes' default partitions merged: {len(parts)} of ~{info.num_rows:,} "
                    f"rows, each {info.kind} leaves {info.num_leaves} search {info.leaves_to_search}", built,
                    scann_index.PartitionedSearcher(parts)))

    for name, built, searcher in results:
      t1, ids1 = timed_search(searcher, q, k, False, args.repeats)
      tp, idsp = timed_search(searcher, q, k, True, args.repeats)
      print(f"{name}\n    build {built:.1f} s, recall@{k} {recall(ids1, truth):.4f} "
            f"({recall(idsp, truth):.4f} threaded), {nq / t1:,.0f} queries/s single-threaded, "
            f"{nq / tp:,.0f} queries/s with ScaNN's threads")
  print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
