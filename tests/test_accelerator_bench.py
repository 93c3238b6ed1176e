"""benchmarks/accelerator.py --dry-run on CPU: every part runs and the JSON file holds them all."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_writes_one_json(tmp_path):
  out = tmp_path / "acc.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1", "PYTHONPATH": REPO}
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "accelerator.py"), "--dry-run",
                         "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  assert (r["dry_run"], r["preset"], r["dtype"], r["remat"], r["candidates"]) == (True, "tiny", "bfloat16", "full", 8)
  # On CPU the peak is a timed bfloat16 matmul that other jobs on the machine slow down as much as
  # the measured paths, so an MFU above 1 is possible there: only its presence is checked.
  assert r["realm_step"]["examples_per_s"] > 0 and r["realm_step"]["mfu"] > 0
  assert r["embedding"]["blocks_per_s"] > 0 and r["embedding"]["mfu"] > 0
  assert r["mips"]["queries_per_s"] > 0 and r["mips"]["rows"] == 20_000
  mem = r["memory"]
  assert mem["measured"]["temporaries"] > 0 and mem["estimate"]["temporaries"] > 0
  # The step's arguments (params, AdamW moments, index, block tokens, batch) are known to ~1%.
  assert abs(mem["estimate"]["arguments"] / mem["measured"]["arguments"] - 1) < 0.02


def test_bad_arguments_are_one_line():
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "accelerator.py"), "--out", "x.json",
                         "--batch", "0"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "--batch" in proc.stderr.strip().splitlines()[-1]
