"""`realm-jax evaluate` on the whole NQ-Open test set (3,610 questions) against a real corpus.

One command: `python benchmarks/evaluate_nq.py [--workdir DIR] [--config openqa_minilm] [--batch-size 64]`.
As a user would, through the CLI: `corpus build` of the packaged Wikipedia excerpt (whole articles,
128-token blocks), `finetune` for one step from the packaged MiniLM (it builds and publishes the
frozen index from the initial document tower and writes the checkpoint `evaluate` reads; the
training questions are NQ-Open dev, never the test set), then `evaluate --questions nq-test`, timed
as a whole (process start, compile, retrieval, reading, scoring) and as the questions/s that
`evaluate` reports (answering only). Speed only: one fine-tuning step answers few questions right.
Prints the 1-minute load average before and after; a number taken above ~1.5 on 2 cores is void.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, out: bool = False) -> str:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-m", "realm_jax", *args], env=env, text=True,
                        stdout=subprocess.PIPE if out else None, check=False)
  if proc.returncode:
    sys.exit(f"realm-jax {' '.join(args)} exited {proc.returncode}")
  return proc.stdout or ""


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default=None, help="where the corpus and the run go (default: a fresh temp dir)")
  p.add_argument("--config", default="openqa_minilm", help="fine-tuning experiment (its model is evaluated)")
  p.add_argument("--batch-size", type=int, default=64, help="evaluate's questions per batch")
  p.add_argument("--limit", type=int, default=None, help="only the first N test questions (smoke runs)")
  args = p.parse_args()
  print(f"load average (1 min) before: {os.getloadavg()[0]:.2f}", flush=True)
  sys.path.insert(0, ROOT)
  from realm_jax.data import sources

  work = args.workdir or tempfile.mkdtemp(prefix="evaluate-nq-")
  root = os.path.join(work, "run")
  print(f"work directory (kept, reused by --workdir): {work}", flush=True)
  if not os.path.exists(os.path.join(root, "corpus")):
    t0 = time.perf_counter()
    cli("corpus", "build", "--input", str(sources.wikipedia_excerpt()), "--storage", root, "--block-len", "128",
        "--quiet")
    print(f"corpus build: {time.perf_counter() - t0:.0f} s", flush=True)
  if not os.path.exists(os.path.join(root, "checkpoints")):
    t0 = time.perf_counter()
    cli("finetune", "--config", args.config, "--storage", root, "--log-level", "warning", "--set",
        "train_questions=nq-dev", "num_train_steps=1", "warmup_steps=1", "checkpoint_every=1",
        "retriever_beam_size=8")
    print(f"finetune (index build + 1 step): {time.perf_counter() - t0:.0f} s", flush=True)
  limit = ["--limit", str(args.limit)] if args.limit else []
  t0 = time.perf_counter()
  text = cli("evaluate", "--storage", root, "--questions", "nq-test", "--batch-size", str(args.batch_size),
             "--json", "--log-level", "warning", *limit, out=True)
  wall = time.perf_counter() - t0
  rows = [line for line in text.splitlines() if line.startswith("[{")]
  summary = json.loads(rows[-1])[0] if rows else {}
  n = summary.get("num_questions", 0)
  print(text.strip())
  print(f"evaluate on {n} nq-test questions: {summary.get('questions_per_second', 0):.1f} questions/s answering, "
        f"{wall:.1f} s for the whole command ({n / wall:.1f} questions/s including start-up and compile)")
  print(f"load average (1 min) after: {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
  main()
