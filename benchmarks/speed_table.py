"""Every CPU speed comparison against the peers in one command, as one markdown table.

    python benchmarks/speed_table.py [--quick] [--out table.md]

Runs, one after another in fresh processes (each prints its own peer number from the same run):
  embed.py  minilm on the Wikipedia excerpt, minilm on short blocks (<= 64 tokens padded to 288),
            tiny on the Wikipedia excerpt (HF RealmEmbedder);
  openqa.py 256 documents, 64 NQ-Open questions, batches of 64 (HF RealmForOpenQA one at a time);
  train_step.py tiny and minilm, batch 2 (HF RealmScorer + RealmKnowledgeAugEncoder + AdamW).
Prints, per row, ours, the peer, the ratio and the 1-minute load average before and after. Each row
waits (up to 5 minutes) for the load to fall below 1.5 first; a row that starts above it is marked
VOID (another job shares the cores; do not record it). The "after" figure includes the row's own
two busy cores, so it ends near 2 on a quiet machine.
`--quick` uses fewer rounds and steps (a smoke run of the table, not for recording). About
25-35 minutes on a quiet 2-core machine without `--quick`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_LOAD = 1.5


def _rows(quick: bool) -> list[tuple[str, list[str], str, str]]:
  """(row name, command, regex for ours / peer / ratio, unit)."""
  r = ["--rounds", "1"] if quick else []
  embed = r"{p}: ours ([\d.]+) blocks/s, HF RealmEmbedder ([\d.]+) blocks/s, ratio ([\d.]+)x"
  step = r"{p} \(.*?\): ours ([\d.]+) ex/s .*?\| HF PyTorch ([\d.]+) ex/s .*?ratio ours/HF = ([\d.]+)x"
  iters = ["--iters", "1", "--warmup", "2", "--rounds", "1"] if quick else ["--iters", "4"]
  return [
      ("embedding, minilm, Wikipedia 288", ["embed.py", "--presets", "minilm", *r], embed.format(p="minilm"),
       "blocks/s"),
      ("embedding, minilm, short blocks", ["embed.py", "--presets", "minilm", "--corpus", "short", *r],
       embed.format(p="minilm"), "blocks/s"),
      ("embedding, tiny, Wikipedia 288", ["embed.py", "--presets", "tiny", *r], embed.format(p="tiny"),
       "blocks/s"),
      ("Open-QA answering, batch 64 vs HF 1 at a time",
       ["openqa.py", "--blocks", "256", "--questions", "64", "--batch", "64", *r],
       r"ours \(Evaluator\.answer.*?\):\s+([\d.]+) questions/s\s+HF RealmForOpenQA.*?:\s+([\d.]+) "
       r"questions/s.*?ratio ours / HF: ([\d.]+)x", "questions/s"),
      ("REALM train step, tiny", ["train_step.py", "--presets", "tiny", "--batch", "2", *iters],
       step.format(p="tiny"), "ex/s"),
      ("REALM train step, minilm", ["train_step.py", "--presets", "minilm", "--batch", "2", *iters],
       step.format(p="minilm"), "ex/s"),
  ]


def _settle(wait_s: float = 300) -> float:
  """The 1-minute load once it is below MAX_LOAD (the previous row's own load decays in a minute or
  two), waiting at most `wait_s`; returned as the row's "before"."""
  deadline = time.monotonic() + wait_s
  while os.getloadavg()[0] > MAX_LOAD and time.monotonic() < deadline:
    time.sleep(10)
  return os.getloadavg()[0]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="fewer rounds: a smoke run, not for recording")
  p.add_argument("--only", nargs="+", default=None, help="rows whose name contains any of these words")
  p.add_argument("--out", default=None, help="also write the table to this file")
  args = p.parse_args(argv)
  rows = [r for r in _rows(args.quick) if not args.only or any(w in r[0] for w in args.only)]
  if not rows:
    p.error(f"--only {args.only} matches no row")
  started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  lines = []
  for name, cmd, pattern, unit in rows:
    before = _settle()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(HERE, cmd[0]), *cmd[1:]], capture_output=True, text=True)
    minutes = (time.perf_counter() - t0) / 60
    after = os.getloadavg()[0]
    m = re.search(pattern, proc.stdout, re.S)
    if proc.returncode or not m:
      tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
      print(f"{name}: failed (exit {proc.returncode}): {' | '.join(tail)}", file=sys.stderr, flush=True)
      lines.append(f"| {name} | failed | | | {before:.2f} -> {after:.2f} | exit {proc.returncode} |")
      continue
    ours, peer, ratio = (float(x) for x in m.groups())
    verdict = "VOID (load)" if before > MAX_LOAD else "ok"
    lines.append(f"| {name} | {ours:.4g} {unit} | {peer:.4g} {unit} | {ratio:.2f}x | {before:.2f} -> {after:.2f} | "
                 f"{verdict}, {minutes:.1f} min |")
    print(lines[-1], flush=True)
  table = "\n".join([f"Started {started}; `python benchmarks/speed_table.py{' --quick' if args.quick else ''}`; "
                     f"{os.cpu_count()} CPUs; rows that started with a 1-minute load above {MAX_LOAD} are VOID.", "",
                     "| path | ours | peer (same run) | ours / peer | load before -> after | note |",
                     "|---|---:|---:|---:|---|---|", *lines])
  print("\n" + table)
  if args.out:
    with open(args.out, "w") as f:
      f.write(table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
