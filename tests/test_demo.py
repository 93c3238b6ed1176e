"""`realm-jax demo --quick` end to end, as a user runs it: a real CLI process with the refresher
as its child process; Ctrl-C during pre-training stops both, the next run resumes, and a third
run reuses every cached stage."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

STAGES = ("sources", "corpus", "questions", "references", "ict", "reading", "pretrain", "control", "openqa_index",
          "recall", "finetune")
# The stable fields of summary.json (scripts such as benchmarks/demo_table.py read them).
FIELDS = ("realm.retrieval_utility_last10", "realm.mlm_accuracy_first5", "realm.mlm_accuracy_last5",
          "recall_at_5.before", "recall_at_5.after_ict", "recall_at_5.after_realm", "recall_at_5.after_control",
          "recall_at_5.bm25", "recall_at_5.minilm", "openqa.exact_match", "openqa.recall_at_5", "wall_seconds", "seed")
QUICK_WITHOUT = {"recall_at_5.minilm"}  # the quick recipe's towers are random: no MiniLM download, no reference


def _field(summary: dict, dotted: str):
  value = summary
  for part in dotted.split("."):
    assert isinstance(value, dict) and part in value, (dotted, summary)
    value = value[part]
  return value


def _demo(workdir: pathlib.Path, log: pathlib.Path) -> subprocess.Popen:
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "COLUMNS": "120"}  # a laptop: one CPU device
  # As from a terminal: pytest-xdist workers ignore SIGINT and children inherit that (Python then
  # installs no KeyboardInterrupt handler), so restore the default before exec.
  return subprocess.Popen([sys.executable, "-m", "realm_jax.cli.main", "demo", "--quick", "--workdir", str(workdir)],
                          stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie still answers kill(0); it has exited all the same.
  stat = pathlib.Path(f"/proc/{pid}/stat")
  return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def test_demo_quick_interrupt_resume_and_cache(tmp_path):
  workdir = tmp_path / "demo"
  ckpts = workdir / "pretrain" / "checkpoints"

  # 1. Ctrl-C once the trainer has written a checkpoint (pre-training is under way).
  log1 = tmp_path / "run1.log"
  proc = _demo(workdir, log1)
  try:
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
      if ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir()):
        break
      time.sleep(0.5)
    assert proc.poll() is None, log1.read_text()[-3000:]
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  out1 = log1.read_text()
  assert code == 130, out1[-3000:]
  assert "interrupted" in out1
  pids = [int(p) for p in re.findall(r"index refresher running as process (\d+)", out1)]
  assert pids, out1[-3000:]
  assert not any(_alive(p) for p in pids), "the refresher outlived the demo"
  assert not (workdir / "state" / "pretrain.json").exists()

  # 2. The same command resumes and finishes.
  log2 = tmp_path / "run2.log"
  proc = _demo(workdir, log2)
  code = proc.wait(timeout=900)
  out2 = log2.read_text()
  assert code == 0, out2[-4000:]
  assert "resuming pre-training at step" in out2
  summary = json.loads((workdir / "summary.json").read_text())
  for key in FIELDS:
    value = _field(summary, key)
    assert (value is None) if key in QUICK_WITHOUT else isinstance(value, (int, float)), (key, value)
  for key in FIELDS[1:-2]:
    if key not in QUICK_WITHOUT:
      assert 0.0 <= _field(summary, key) <= 1.0, (key, summary)
  assert summary["seed"] == 0 and summary["wall_seconds"] > 0
  realm, control = summary["realm"], summary["control"]
  assert realm["steps"] == control["steps"] == 12
  assert realm["refreshes"] >= 2 and realm["swaps"] >= 1, summary
  assert summary["corpus"]["blocks"] > 100 and summary["questions"]["answerable"] >= 4
  assert realm["mean_staleness"] >= 0
  # The control and REALM start from the same checkpoint: the same weights files, and the same
  # first step (same weights, data and bootstrap index: the same loss before either update).
  assert realm["start"] and realm["start"] == control["start"], summary
  assert abs(realm["loss_first"] - control["loss_first"]) <= 1e-4 * abs(realm["loss_first"]), summary
  # The control's retriever did not move: its recall is that of the start (the ICT warm start).
  assert summary["recall"]["after_control"] == summary["recall"]["control_start"], summary
  png = (workdir / "curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  preds = (workdir / "predictions.jsonl").read_text().splitlines()
  assert len(preds) == summary["questions"]["test"]
  recall = json.loads((workdir / "state" / "recall.json").read_text())
  steps = sorted(p["step"] for p in recall["points"] if not p["final"])
  assert steps[0] == 0 and len(steps) >= 3, steps  # bootstrap + the refresher's versions
  assert "realm-jax demo" in out2 and "Sample held-out questions" in out2
  assert not any(_alive(p) for p in map(int, re.findall(r"index refresher running as process (\d+)", out2)))

  # 3. Everything cached: no stage runs again, same summary.
  log3 = tmp_path / "run3.log"
  proc = _demo(workdir, log3)
  code = proc.wait(timeout=300)
  out3 = log3.read_text()
  assert code == 0, out3[-3000:]
  assert out3.count("cached from an earlier run") == len(STAGES), out3[-3000:]
  again = json.loads((workdir / "summary.json").read_text())
  assert again == summary


def test_demo_refuses_a_workdir_of_another_recipe(tmp_path):
  workdir = tmp_path / "demo"
  (workdir).mkdir()
  (workdir / "recipe.json").write_text(json.dumps({"name": "full", "model": {}}))
  proc = subprocess.run([sys.executable, "-m", "realm_jax.cli.main", "demo", "--quick", "--workdir", str(workdir)],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "another --workdir" in proc.stderr and "Traceback" not in proc.stderr
