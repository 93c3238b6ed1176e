"""REALM's learning test recipe over seeds x float environments: does it learn in every cell?

One command: `python benchmarks/learning.py [--seeds 0 1 2] [--isas default AVX2] [--learning-rates ...]
[--recipe JSON] [--stale-every N] [--json OUT]`.
Each cell is the recipe of `tests/test_realm_learning.py` (`tests/helpers/learning.py`: 48
invented people, an encoder taught to read on 300 others, REALM with the real Trainer from a
random retriever) in a fresh process, with `XLA_FLAGS=--xla_cpu_max_isa=<isa>` for every ISA but
`default` (XLA:CPU then emits other kernels, so float rounding differs as it does from one CPU to
the next). It prints one row per cell: held-out reading accuracy with the own block / another
person's block / the null document, recall@8 of the fact block before -> after, and the retrieval
utility over the null document in the last 10 steps; then the spread, and whether every cell clears
the test's thresholds. Run it from the repository root; each cell takes ~2 minutes on 2 cores.
`--stale-every N` is the paper's stale-index ablation: each cell pre-trains the same start twice,
re-indexing every `refresh_every` steps (fresh) and every N steps (stale), one row each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_CELL = """
import json, sys, tempfile
from tests.helpers import learning
recipe, stale_every = learning.Recipe(**json.loads(sys.argv[1])), int(sys.argv[2])
work = tempfile.mkdtemp(prefix="realm-learning-")
runs = learning.run_refresh_ablation(work, recipe, stale_every) if stale_every else [learning.run(work, recipe)]
for r in runs:
  print("CELL " + json.dumps({"refresh_every": r.recipe.refresh_every, "reading": r.reading,
                              "recall_before": r.recall_before, "recall_after": r.recall_after,
                              "utility_last10": r.utility_last10, "mlm_accuracy_first10": r.mlm_accuracy_first10,
                              "mlm_accuracy_last10": r.mlm_accuracy_last10, "seconds": r.seconds,
                              "extras": r.extras, "line": r.line()}))
"""


def run_cell(seed: int, isa: str, learning_rate: float | None, overrides: dict | None = None,
             stale_every: int = 0) -> list[dict]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
  env.pop("XLA_FLAGS", None)
  if isa != "default":
    env["XLA_FLAGS"] = f"--xla_cpu_max_isa={isa}"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
  recipe = {**(overrides or {}), "seed": seed}
  if learning_rate is not None:
    recipe["learning_rate"] = learning_rate
  proc = subprocess.run([sys.executable, "-c", _CELL, json.dumps(recipe), str(stale_every)], cwd=repo, env=env,
                        capture_output=True, text=True)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("CELL ")]
  if proc.returncode or not lines:
    raise SystemExit(f"seed {seed} isa {isa} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  return [{"seed": seed, "isa": isa, "learning_rate": learning_rate, **json.loads(line[5:])} for line in lines]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--isas", nargs="+", default=["default", "AVX2"],
                 help="float environments: default, or an --xla_cpu_max_isa value (AVX2, AVX, SSE4_2)")
  p.add_argument("--learning-rates", type=float, nargs="+", default=[None],
                 help="REALM learning rates to try (default: the recipe's); e.g. 1.5e-4 4.5e-4 for the margin")
  p.add_argument("--recipe", default="{}",
                 help='JSON of Recipe fields to change, e.g. \'{"share_towers": false, "ict_steps": 20}\' (the test\'s '
                      "thresholds below are the first recipe's)")
  p.add_argument("--stale-every", type=int, default=0,
                 help="the refresh ablation: each cell pre-trains one start twice, re-indexing every "
                      "`refresh_every` steps and every this many (>= the steps: never)")
  p.add_argument("--json", help="also write the rows here")
  args = p.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from tests.helpers import learning
  from tests.test_realm_learning import MAX_CONTROL_UTILITY, MIN_READING, MIN_RECALL, MIN_RECALL_GAIN, MIN_UTILITY

  print(f"uptime: {os.getloadavg()[0]:.2f} load (1 min); cells run one at a time", flush=True)
  header = (f"{'lr':>7} {'seed':>4} {'isa':>8} {'refresh':>7} | {'read own/other/null':>19} | "
            f"{'recall@8 start':>14} {'end':>5} | "
            f"{'utility last 10':>15} | {'MLM acc last 10':>15} | {'s':>4}")
  print(header + "\n" + "-" * len(header), flush=True)
  rows = []
  t0 = time.time()
  default_lr = learning.Recipe().learning_rate
  cells = [(lr, isa, seed) for lr in args.learning_rates for isa in args.isas for seed in args.seeds]
  recipe = json.loads(args.recipe)
  for lr, isa, seed in cells:
    for r in run_cell(seed, isa, lr, recipe, args.stale_every):
      rows.append(r)
      rd = r["reading"] or {"own": float("nan"), "other": float("nan"), "null": float("nan")}
      print(f"{recipe.get('learning_rate', lr or default_lr):>7.1e} {seed:>4} {isa:>8} {r['refresh_every']:>7} | "
            f"{rd['own']:.2f} / {rd['other']:.2f} / {rd['null']:.2f}   | "
            f"{r['recall_before']:>14.3f} {r['recall_after']:>5.3f} | {r['utility_last10']:>+15.3f} | "
            f"{r['mlm_accuracy_last10']:>15.2f} | {r['seconds']:>4.0f} | {json.dumps(r['extras'])}", flush=True)
  util = [r["utility_last10"] for r in rows]
  end = [r["recall_after"] for r in rows]
  own = [(r["reading"] or {}).get("own", float("nan")) for r in rows]
  print(f"\nutility last 10: min {min(util):+.3f}, mean {sum(util) / len(util):+.3f}, max {max(util):+.3f}; "
        f"recall@8 end: min {min(end):.3f}, max {max(end):.3f}; reading (own block): min {min(own):.2f}")
  reading = recipe.get("reading", True)
  if reading:
    passed = [r["reading"]["own"] >= MIN_READING and r["utility_last10"] > MIN_UTILITY
              and r["recall_after"] >= MIN_RECALL and r["recall_after"] >= r["recall_before"] + MIN_RECALL_GAIN
              for r in rows]
  else:  # the control (an encoder that cannot read): what its test asserts
    passed = [abs(r["utility_last10"]) < MAX_CONTROL_UTILITY and r["recall_after"] < MIN_RECALL
              and r["recall_after"] < r["recall_before"] + MIN_RECALL_GAIN for r in rows]
  which = "the" if reading else "the control"
  print(f"cells clearing {which} test's thresholds: {sum(passed)} / {len(rows)}; {time.time() - t0:.0f} s in all; "
        f"load {os.getloadavg()[0]:.2f} at the end")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
