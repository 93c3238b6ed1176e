"""Top-k inner-product search throughput: our sharded device MIPS against numpy, torch and ScaNN.

One command: `python benchmarks/mips.py [--rows 1000000] [--dim 128] [--queries 1000] [--k 8]`
(`--rows 100000` for a quick run). On one clustered float32 corpus and query set it times
  - numpy brute force: `q @ db.T` + `argpartition` (in query batches of `--host-batch`, since
    the full [queries x rows] score matrix and its argpartition indices would need ~12 GB);
  - the HF port's method: `torch.einsum("BD,QD->QB", block_emb, q)` + `torch.topk`, exactly as
    `transformers.RealmForOpenQA` retrieves (same query batches);
  - ours: `realm_jax.retrieval.mips.search` (jit, exact) with the rows sharded over 1 and 2 CPU
    devices, each in a subprocess with `JAX_NUM_CPU_DEVICES` set (compile excluded);
  - ScaNN (`scann_index.build_searcher` defaults; build time reported, search single-threaded
    and with ScaNN's thread pool);
and prints queries/s, the ratio against numpy, recall@k against numpy's result, and for the exact
methods the fraction of this machine's float32 matmul peak that the search reaches (2 * rows *
dim * queries FLOP per pass). The peak is a large `jnp.dot` timed between the passes of each
method, in the same process, so that both see the same load (the machine is shared); each
method and the peak count their best of `--repeats` passes.
Embedding throughput (blocks/s) is measured by `benchmarks/embed.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def clustered(n: int, dim: int, clusters: int, draw_seed: int, noise: float = 0.25) -> np.ndarray:
  """Rows near `clusters` random centres (the same centres for corpus and queries)."""
  centers = np.random.default_rng(0).standard_normal((clusters, dim), dtype=np.float32)
  rng = np.random.default_rng(draw_seed)
  out = np.empty((n, dim), np.float32)
  for start in range(0, n, 1 << 17):  # bounded temporaries
    stop = min(n, start + (1 << 17))
    out[start:stop] = centers[rng.integers(0, clusters, stop - start)]
    out[start:stop] += noise * rng.standard_normal((stop - start, dim), dtype=np.float32)
  return out


def best_time(fn, repeats: int) -> tuple[float, object]:
  """Best wall time of `repeats` calls, and the last result."""
  best, out = float("inf"), None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t0)
  return best, out


def matmul_peak(precision: str | None, size: int = 3072):
  """A function timing one large jitted float32 `jnp.dot` on this process's default device
  (GFLOP/s). It is called between the timed searches, so peak and search see the same load."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  dot = jax.jit(lambda a, b: jnp.dot(a, b, precision=precision))
  dot(a, a).block_until_ready()

  def once() -> float:
    t, _ = best_time(lambda: dot(a, a).block_until_ready(), 1)
    return 2 * size**3 / t / 1e9

  return once


def numpy_search(db: np.ndarray, q: np.ndarray, k: int, batch: int) -> np.ndarray:
  """Brute force: scores by BLAS matmul, top-k by argpartition, then sorted."""
  out = np.empty((len(q), k), np.int64)
  for s in range(0, len(q), batch):
    scores = q[s:s + batch] @ db.T
    top = np.argpartition(scores, -k, axis=1)[:, -k:]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    out[s:s + batch] = np.take_along_axis(top, order, axis=1)
  return out


def torch_search(block_emb, q: np.ndarray, k: int, batch: int) -> np.ndarray:
  """What `RealmForOpenQA` does: einsum over the whole block matrix, then torch.topk."""
  import torch

  out = []
  with torch.inference_mode():
    for s in range(0, len(q), batch):
      scores = torch.einsum("BD,QD->QB", block_emb, torch.from_numpy(q[s:s + batch]))
      out.append(torch.topk(scores, k=k, dim=-1).indices.numpy())
  return np.concatenate(out)


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
  hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, truth))
  return hits / truth.size


# -- worker: our device MIPS in a process with its own device count -------------------------------


def worker(args: argparse.Namespace) -> None:
  """Runs in a subprocess (JAX_NUM_CPU_DEVICES set by the parent); prints one JSON line per
  tile size in `--chunk-rows`."""
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, str(REPO))
  from realm_jax.retrieval import mips

  db = np.load(args.data_dir / "db.npy", mmap_mode="r")
  q = jnp.asarray(np.load(args.data_dir / "q.npy"))
  mesh = jax.make_mesh((len(jax.devices()),), ("rows",))
  index = mips.shard_rows(db, mesh)
  peak = matmul_peak(args.precision)
  for chunk_rows in args.chunk_rows:
    search = jax.jit(lambda q, index, chunk_rows=chunk_rows: mips.search(
        q, index, args.k, approx=args.approx, chunk_rows=chunk_rows or None,
        group_size=args.group_size,
        precision=args.precision))
    t0 = time.perf_counter()
    jax.block_until_ready(search(q, index))
    compile_s = time.perf_counter() - t0
    t, peaks = float("inf"), []
    for _ in range(args.repeats):  # alternate peak and search: both see the same load
      peaks.append(peak())
      dt, res = best_time(lambda search=search: jax.block_until_ready(search(q, index)), 1)
      t = min(t, dt)
    name = f"ids_{len(jax.devices())}_{chunk_rows}.npy"
    np.save(args.data_dir / name, np.asarray(res.ids))
    print(json.dumps({"devices": len(jax.devices()), "seconds": t, "first_call_s": compile_s,
                      "platform": jax.devices()[0].platform, "chunk_rows": chunk_rows,
                      "ids": name, "peak": max(peaks)}))


def run_worker(args: argparse.Namespace, devices: int, data_dir: pathlib.Path) -> list[dict]:
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "PYTHONPATH": str(REPO)}
  if args.platform == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, __file__, "--worker", "--data-dir", str(data_dir), "--k", str(args.k),
         "--repeats", str(args.repeats), "--group-size", str(args.group_size),
         "--chunk-rows", *map(str, args.chunk_rows)]
  cmd += (["--approx"] if args.approx else []) + (
      ["--precision", args.precision] if args.precision else [])
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f"device MIPS worker ({devices} devices) failed:\n{proc.stderr[-3000:]}")
  return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


# -- main ------------------------------------------------------------------------------------------


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", type=int, default=1_000_000)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--k", type=int, default=8)
  p.add_argument("--clusters", type=int, default=1000)
  p.add_argument("--devices", type=int, nargs="+", default=[1, 2],
                 help="device counts for our MIPS (CPU devices; ignored on --platform gpu)")
  p.add_argument("--platform", default="cpu", help="JAX platform for our MIPS and the peak")
  p.add_argument("--host-batch", type=int, default=128, help="query batch for numpy / torch")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--chunk-rows", type=int, nargs="+", default=[0],
                 help="rows per tile of our search (several: one row each; 0: its default)")
  p.add_argument("--precision", choices=["default", "high", "highest"],
                 help="matmul precision of our search (default: the backend's; TF32 on GPU)")
  p.add_argument("--group-size", type=int, default=32)
  p.add_argument("--approx", action="store_true", help="our MIPS with lax.approx_max_k")
  p.add_argument("--skip", nargs="*", default=[], choices=["numpy", "torch", "scann", "ours"])
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--data-dir", type=pathlib.Path, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return worker(args)
  if args.platform == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.pop("JAX_NUM_CPU_DEVICES", None)  # the peak: one device using every core

  n, d, nq, k = args.rows, args.dim, args.queries, args.k
  flop = 2.0 * n * d * nq
  load = os.getloadavg()[0]
  print(f"MIPS benchmark: {n:,} x {d} float32 clustered rows, {nq:,} queries, k={k}; "
        f"{os.cpu_count()} CPUs, load average {load:.1f}")
  t0 = time.perf_counter()
  db = clustered(n, d, args.clusters, draw_seed=1)
  q = clustered(nq, d, args.clusters, draw_seed=2)
  print(f"data generated in {time.perf_counter() - t0:.1f} s")
  peak = matmul_peak(args.precision)
  print(f"float32 matmul peak (3072^3 jnp.dot, {args.platform}, precision "
        f"{args.precision or 'default'}): {peak():.0f} GFLOP/s now; measured again between "
        "every timed pass")

  rows = []  # (name, seconds, ids, exact, peak GFLOP/s meanwhile, note)
  truth = numpy_search(db, q, k, args.host_batch)  # reference result (also the warm-up)
  host = {}  # numpy and torch, timed in alternating rounds with the peak
  if "numpy" not in args.skip:
    host["numpy q@db.T + argpartition"] = (lambda: numpy_search(db, q, k, args.host_batch),
                                           f"batch {args.host_batch}")
  if "torch" not in args.skip:
    import torch
    torch.set_num_threads(os.cpu_count())
    block_emb = torch.from_numpy(db)
    torch_search(block_emb, q[:args.host_batch], k, args.host_batch)
    host["torch einsum + topk (HF RealmForOpenQA)"] = (
        lambda: torch_search(block_emb, q, k, args.host_batch),
        f"batch {args.host_batch}, {torch.get_num_threads()} threads")
  if host:
    best, peaks = {name: (float("inf"), None) for name in host}, []
    for _ in range(args.repeats):
      peaks.append(peak())
      for name, (fn, _) in host.items():
        t, ids = best_time(fn, 1)
        best[name] = min(best[name], (t, ids), key=lambda x: x[0])
    for name, (t, ids) in best.items():
      rows.append((name, t, ids, True, max(peaks), host[name][1]))
  if "ours" not in args.skip:
    with tempfile.TemporaryDirectory(prefix="bench-mips-") as tmp:
      data_dir = pathlib.Path(tmp)
      np.save(data_dir / "db.npy", db)
      np.save(data_dir / "q.npy", q)
      counts = args.devices if args.platform == "cpu" else [1]
      for devices in counts:
        for r in run_worker(args, devices, data_dir):
          rows.append((f"ours: mips.search, {r['devices']} {r['platform']} device(s)",
                       r["seconds"], np.load(data_dir / r["ids"]), not args.approx, r["peak"],
                       f"tiles of {r['chunk_rows'] or 'default'} rows, precision "
                       f"{args.precision or 'default'}, first call {r['first_call_s']:.1f} s"))
  if "scann" not in args.skip:
    sys.path.insert(0, str(REPO))
    from realm_jax.retrieval import scann_index
    t0 = time.perf_counter()
    index = scann_index.build_searcher(db)
    build_s = time.perf_counter() - t0
    info = index.info
    note = (f"build {build_s:.0f} s, {info.kind}, {info.num_leaves} leaves, search "
            f"{info.leaves_to_search}, reorder {info.reorder}")
    index.search(q[:10], k)
    t, res = best_time(lambda: index.search(q, k), args.repeats)
    rows.append(("ScaNN (1 thread)", t, res.ids, False, None, note))
    t, res = best_time(lambda: index.search(q, k, parallel=True), args.repeats)
    rows.append(("ScaNN (thread pool)", t, res.ids, False, None, ""))
  print(f"load average now {os.getloadavg()[0]:.1f}")

  numpy_qps = next((nq / t for name, t, *_ in rows if name.startswith("numpy")), None)
  print()
  print(f"{'method':44s} {'seconds':>8s} {'queries/s':>10s} {'x numpy':>8s} "
        f"{'recall@' + str(k):>9s} {'% peak':>7s}  notes")
  for name, t, ids, exact, peak_meanwhile, note in rows:
    qps = nq / t
    ratio = f"{qps / numpy_qps:8.2f}" if numpy_qps else f"{'-':>8s}"
    frac = f"{100 * flop / t / 1e9 / peak_meanwhile:6.1f}%" if exact else f"{'-':>7s}"
    if exact:
      note = f"{note}; peak meanwhile {peak_meanwhile:.0f} GFLOP/s"
    print(f"{name:44s} {t:8.3f} {qps:10.0f} {ratio} {recall(ids, truth):9.4f} {frac}  {note}")
  print(f"\n(exact search = {flop / 1e9:.0f} GFLOP per pass; recall against numpy float32, so "
        "exact methods differ only on ties. Embedding throughput: python benchmarks/embed.py)")


if __name__ == "__main__":
  main()
