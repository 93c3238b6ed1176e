"""The scale rehearsal's table and fitted growth, from `benchmarks/scale.py --json` files.

One command: `python benchmarks/scale_table.py s1.json s2.json ...`

Prints one markdown row per run (the largest trainer process's figures) and least-squares fits
over all runs of per-process peak RSS = a + b * N/P and start-up = c + d * N/P (N blocks, P
processes), with each fit's prediction at 13,353,718 blocks and P = 4.
"""

from __future__ import annotations

import json
import sys

import numpy as np

PAPER_BLOCKS = 13_353_718


def fit(x: list[float], y: list[float]) -> tuple[float, float]:
  a, b = np.linalg.lstsq(np.stack([np.ones(len(x)), np.asarray(x, float)], axis=1), np.asarray(y, float),
                         rcond=None)[0]
  return float(a), float(b)


def main(paths: list[str]) -> None:
  runs = [json.loads(open(p).read()) for p in paths]
  runs.sort(key=lambda r: (r["blocks"], r["processes"]))
  print("| blocks | P x D | block_len | corpus build s | index publish s | trainer peak RSS GB (max) | "
        "start-up s | step s | swap s | swap bytes / own share | refresher RSS GB | refresher blocks/s per process "
        "| load before/after |")
  print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
  x, rss, start = [], [], []
  for r in runs:
    t = max(r["trainer"], key=lambda p: p["peak_rss_bytes"])
    share = max(p["swap_bytes_read"] / p["swap_share_bytes"] for p in r["trainer"])
    ref_rss = max(p["peak_rss_bytes"] for p in r["refresher"]) / 1e9
    ref_bps = min(p["blocks_per_second"] for p in r["refresher"])
    load = r.get("load_average", {})
    print(f"| {r['blocks']:,} | {r['processes']} x {r['devices_per_process']} | {r['block_len']} | "
          f"{r['corpus_build_seconds']:.0f} | {r['index_publish_seconds']:.0f} | {t['peak_rss_bytes'] / 1e9:.2f} | "
          f"{max(p['startup_seconds'] for p in r['trainer']):.0f} | {t['step_seconds']:.2f} | "
          f"{max(p['swap_seconds'] for p in r['trainer']):.2f} | {share:.3f} | {ref_rss:.2f} | {ref_bps:,.0f} | "
          f"{load.get('before', '?').split()[0]} / {load.get('after', '?').split()[0]} |")
    for p in r["trainer"]:
      x.append(r["blocks"] / r["processes"])
      rss.append(p["peak_rss_bytes"] / 1e9)
      start.append(p["startup_seconds"])
  n = PAPER_BLOCKS / 4
  if len(set(x)) >= 2:
    a, b = fit(x, rss)
    print(f"\nper-process peak RSS ~= {a:.2f} GB + {b * 1e6:.3f} GB per million blocks of N/P "
          f"(at {PAPER_BLOCKS:,} blocks, P = 4: {a + b * n:.2f} GB)")
  # Start-up is fitted per P: on a shared CPU, P processes compiling at once is a term of its own.
  for procs in sorted({r["processes"] for r in runs}):
    pts = [(r["blocks"] / procs, p["startup_seconds"]) for r in runs if r["processes"] == procs for p in r["trainer"]]
    if len({v for v, _ in pts}) >= 2:
      c, d = fit([v for v, _ in pts], [s for _, s in pts])
      print(f"start-up at P = {procs} ~= {c:.0f} s + {d * 1e6:.1f} s per million blocks of N/P")
    if procs == 4:  # an upper bound that needs no fit: all of the largest run's start-up taken as O(N/P)
      v, t = max(pts)
      print(f"start-up at P = 4, upper bound at {PAPER_BLOCKS:,} blocks: {t:.0f} s x {n / v:.2f} = "
            f"{t * n / v:.0f} s (the whole start-up of the {v * 4:,.0f}-block run scaled with N/P)")


if __name__ == "__main__":
  main(sys.argv[1:])
