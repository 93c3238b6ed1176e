"""The README's demo table, generated from the `summary.json` of `realm-jax demo` runs (one per
seed): mean ± sample standard deviation over the runs, then each run's value.

  python benchmarks/demo_table.py ~/.cache/realm-jax/demo*/summary.json            # print it
  python benchmarks/demo_table.py ~/.cache/realm-jax/demo*/summary.json --readme README.md

With `--readme` the table replaces what lies between the `<!-- demo-table:begin -->` and
`<!-- demo-table:end -->` lines of that file (both must be there; nothing else is touched).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

BEGIN, END = "<!-- demo-table:begin -->", "<!-- demo-table:end -->"

# (dotted field of summary.json, label, kind): kind "pct" prints percent, "nats" signed, "min" minutes
ROWS = (
    ("reading.accuracy_gold_after", "reading warm start: held-out accuracy with an answer-bearing block", "pct"),
    ("reading.accuracy_null_after", "reading warm start: held-out accuracy with the null document", "pct"),
    ("realm.mlm_accuracy_first5", "REALM: MLM accuracy, first 5 steps", "pct"),
    ("realm.mlm_accuracy_last5", "REALM: MLM accuracy, last 5 steps", "pct"),
    ("control.mlm_accuracy_last5", "control: MLM accuracy, last 5 steps", "pct"),
    ("realm.retrieval_utility_last10", "REALM: retrieval utility vs null doc (nats/token, last 10 steps)", "nats"),
    ("control.retrieval_utility_last10", "control: retrieval utility vs null doc (nats/token, last 10 steps)", "nats"),
    ("realm.top1_utility_last10", "REALM: top-1 block utility vs null doc (nats, last 10 steps)", "nats"),
    ("control.top1_utility_last10", "control: top-1 block utility vs null doc (nats, last 10 steps)", "nats"),
    ("recall_at_5.before", "recall@5: initial retriever", "pct"),
    ("recall_at_5.after_ict", "recall@5: after the ICT warm start (start of REALM and control)", "pct"),
    ("recall_at_5.after_realm", "recall@5: after REALM pre-training", "pct"),
    ("recall_at_5.after_control", "recall@5: after the control", "pct"),
    ("delta", "recall@5: after REALM − after the control", "pct"),
    ("recall_at_5.bm25", "recall@5: BM25 (bm25s)", "pct"),
    ("recall_at_5.minilm", "recall@5: 6-layer MiniLM, mean-pooled", "pct"),
    ("openqa.exact_match", "Open-QA exact match (held-out)", "pct"),
    ("openqa.recall_at_5", "Open-QA recall@5 (held-out)", "pct"),
    ("wall_seconds", "wall time (min)", "min"),
    ("cpu_seconds", "CPU time, user + system (min)", "min"),
)


def field(summary: dict, dotted: str):
  if dotted == "delta":
    r = summary["recall_at_5"]
    if r.get("after_realm") is None or r.get("after_control") is None:
      return None
    return r["after_realm"] - r["after_control"]
  value = summary
  for part in dotted.split("."):
    if not isinstance(value, dict) or part not in value:
      return None
    value = value[part]
  return value


def fmt(v, kind: str) -> str:
  if v is None:
    return "-"
  if kind == "pct":
    return f"{100 * v:.1f}"
  if kind == "nats":
    return f"{v:+.2f}"
  return f"{v / 60:.1f}"


def fmt_mean(vals: list[float], kind: str) -> str:
  if not vals:
    return "-"
  if len(vals) == 1:  # no spread from one run
    return fmt(vals[0], kind)
  mean = float(np.mean(vals))
  std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
  if kind == "pct":
    return f"{100 * mean:.1f} ± {100 * std:.1f}"
  if kind == "nats":
    return f"{mean:+.2f} ± {std:.2f}"
  return f"{mean / 60:.1f} ± {std / 60:.1f}"


def table(summaries: list[dict]) -> str:
  summaries = sorted(summaries, key=lambda s: s["seed"])
  head = "| | mean ± std | " + " | ".join(f"seed {s['seed']}" for s in summaries) + " |"
  lines = [head, "|---|---:|" + "---:|" * len(summaries)]
  for key, label, kind in ROWS:
    vals = [field(s, key) for s in summaries]
    have = [v for v in vals if v is not None]
    lines.append(f"| {label} | {fmt_mean(have, kind)} | " + " | ".join(fmt(v, kind) for v in vals) + " |")
  deltas = [field(s, "delta") for s in summaries]
  notes = [f"{len(summaries)} run{'s' if len(summaries) > 1 else ''}; percentages are of the "
           f"{summaries[0]['questions']['answerable']} answerable questions (recall) or the "
           f"{summaries[0]['questions']['test']} held-out questions (Open-QA); ± is the sample standard deviation."]
  if all(d is not None for d in deltas) and len(deltas) > 1:
    std = float(np.std(deltas, ddof=1))
    notes.append(f"REALM − control recall@5: positive in {sum(d > 0 for d in deltas)} of {len(deltas)} runs; "
                 f"mean {100 * float(np.mean(deltas)):.1f} points = {float(np.mean(deltas)) / std:.1f}× its "
                 f"seed-to-seed standard deviation ({100 * std:.1f})." if std > 0 else
                 f"REALM − control recall@5: {100 * deltas[0]:.1f} points in every run.")
  return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def replace_in(path: pathlib.Path, text: str) -> None:
  old = path.read_text()
  if old.count(BEGIN) != 1 or old.count(END) != 1 or old.index(BEGIN) > old.index(END):
    raise SystemExit(f"error: {path} needs one {BEGIN} line and one {END} line after it")
  head, rest = old.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  path.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("summaries", nargs="+", help="summary.json files of demo runs (one per seed)")
  ap.add_argument("--readme", default=None, help="write the table between the demo-table markers of this file")
  args = ap.parse_args(argv)
  summaries = []
  for p in args.summaries:
    try:
      summaries.append(json.loads(pathlib.Path(p).read_text()))
    except (OSError, json.JSONDecodeError) as e:
      print(f"error: {p}: cannot read a summary.json ({e})", file=sys.stderr)
      return 2
  text = table(summaries)
  if args.readme:
    replace_in(pathlib.Path(args.readme), text)
  else:
    print(text, end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())
