"""The demo's summary: a table of what happened, a PNG of the training curves and of recall over
time, and a few questions answered with their evidence."""

from __future__ import annotations

import json
import pathlib

import numpy as np
from rich.table import Table

from realm_jax.demo.pipeline import RECALL_K


def _mean(rows: list[dict], key: str, sl: slice = slice(None)) -> float | None:
  vals = [r[key] for r in rows if key in r][sl]
  return float(np.mean(vals)) if vals else None


def summarize(results: dict, metrics: list[dict], total_seconds: float) -> dict:
  """The numbers of the table, from the stage results and the trainer's metrics rows."""
  points = results["recall"]["points"]
  trained = [p for p in points if not p["final"]]
  start = min(trained, key=lambda p: p["step"]) if trained else None  # REALM's first index
  ict = results.get("ict")
  before = ict["recall_init"] if ict else start
  after = next((p for p in points if p["final"]), None)
  refreshes = [p for p in trained if p["step"] > 0]
  test = results["finetune"]["test"]
  return {
      "articles": results["corpus"]["articles"], "blocks": results["corpus"]["blocks"],
      "salient_spans": results["corpus"]["salient_spans"],
      "questions": results["questions"]["answerable"], "train_questions": results["questions"]["train"],
      "test_questions": results["questions"]["test"],
      "steps": results["pretrain"]["steps"], "refreshes": len(refreshes),
      "swaps": len(results["pretrain"]["swaps"]),
      "mean_staleness": _mean(metrics, "index_staleness"),
      "mlm_accuracy_first": _mean(metrics, "mlm_accuracy", slice(0, 5)),
      "mlm_accuracy_last": _mean(metrics, "mlm_accuracy", slice(-5, None)),
      "retrieval_utility_last": _mean(metrics, "retrieval_utility", slice(-10, None)),
      "ict_steps": ict["steps"] if ict else 0,
      "recall_before": before[f"recall@{RECALL_K}"] if before else None,
      "recall_after_ict": start[f"recall@{RECALL_K}"] if ict and start else None,
      "recall_after": after[f"recall@{RECALL_K}"] if after else None,
      "exact_match": test["exact_match"], "recall_finetuned": test.get(f"recall@{RECALL_K}"),
      "seconds": total_seconds,
  }


def _fmt(v, pct: bool = False) -> str:
  if v is None:
    return "-"
  if pct:
    return f"{100 * v:.1f}%"
  return f"{v:,.2f}" if isinstance(v, float) else f"{v:,}"


def table(s: dict) -> Table:
  t = Table(title="realm-jax demo", show_header=True, header_style="bold")
  t.add_column("")
  t.add_column("value", justify="right")
  rows = [
      ("Wikipedia articles / blocks", f"{s['articles']} / {s['blocks']:,}"),
      ("salient spans", _fmt(s["salient_spans"])),
      ("Open-QA questions answerable (train / held-out)",
       f"{s['questions']} ({s['train_questions']} / {s['test_questions']})"),
      ("ICT warm-start steps / REALM pre-training steps", f"{s['ict_steps']} / {s['steps']}"),
      ("index refreshes published / swapped in", f"{s['refreshes']} / {s['swaps']}"),
      ("mean index staleness (steps)", _fmt(s["mean_staleness"])),
      ("MLM accuracy (first 5 -> last 5 steps)",
       f"{_fmt(s['mlm_accuracy_first'], True)} -> {_fmt(s['mlm_accuracy_last'], True)}"),
      ("retrieval utility vs null doc (last 10 steps)", _fmt(s["retrieval_utility_last"])),
      (f"recall@{RECALL_K} before pre-training", _fmt(s["recall_before"], True)),
      (f"recall@{RECALL_K} after the ICT warm start", _fmt(s["recall_after_ict"], True)),
      (f"recall@{RECALL_K} after pre-training (ICT + REALM)", _fmt(s["recall_after"], True)),
      ("Open-QA exact match (held-out)", _fmt(s["exact_match"], True)),
      (f"Open-QA recall@{RECALL_K} (held-out, fine-tuned)", _fmt(s["recall_finetuned"], True)),
      ("wall time", f"{s['seconds'] / 60:.1f} min"),
  ]
  for k, v in rows:
    t.add_row(k, v)
  return t


def markdown(s: dict) -> str:
  """The same table as Markdown (for notes and the README)."""
  t = table(s)
  cells = [list(c.cells) for c in t.columns]
  lines = ["| | value |", "|---|---:|"]
  lines += [f"| {a} | {b} |" for a, b in zip(*cells)]
  return "\n".join(lines) + "\n"


def plot(metrics: list[dict], results: dict, path: pathlib.Path) -> None:
  """Training curves (loss, MLM accuracy, retrieval utility, staleness) and recall@k over time."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps = [r["step"] for r in metrics]
  fig, axes = plt.subplots(2, 2, figsize=(11, 7))
  swaps = results["pretrain"]["swaps"]

  def curve(ax, key, title):
    xs = [r["step"] for r in metrics if key in r]
    ax.plot(xs, [r[key] for r in metrics if key in r], lw=1.2)
    for s in swaps:
      ax.axvline(s, color="tab:gray", ls=":", lw=0.8)
    ax.set_title(title)
    ax.set_xlabel("step")

  curve(axes[0, 0], "loss", "marginal MLM loss")
  curve(axes[0, 1], "mlm_accuracy", "MLM accuracy (masked salient spans)")
  curve(axes[1, 0], "retrieval_utility", "retrieval utility vs null doc  (dotted: index swaps)")
  ax2 = axes[1, 0].twinx()
  ax2.plot(steps, [r.get("index_staleness", np.nan) for r in metrics], color="tab:orange", lw=0.8)
  ax2.set_ylabel("index staleness (steps)", color="tab:orange")
  points = results["recall"]["points"]
  trained = sorted((p for p in points if not p["final"]), key=lambda p: p["step"])
  ax = axes[1, 1]
  ict = results.get("ict")
  for k, color in ((1, "tab:blue"), (RECALL_K, "tab:green"), (20, "tab:purple")):
    key = f"recall@{k}"
    xs, ys = [p["step"] for p in trained], [p[key] for p in trained]
    if ict:  # the initial retriever, before the ICT warm start (steps counted back from REALM's 0)
      xs, ys = [-ict["steps"]] + xs, [ict["recall_init"][key]] + ys
    ax.plot(xs, ys, "o-", color=color, label=key)
    final = [p for p in points if p["final"]]
    if final:
      ax.plot([final[0]["step"]], [final[0][key]], "*", ms=12, color=color)
  if ict:
    ax.axvspan(-ict["steps"], 0, color="tab:gray", alpha=0.15, label="ICT warm start")
  top = max([p[f"recall@{k}"] for p in points for k in (1, RECALL_K, 20)] +
            ([v for v in ict["recall_init"].values()] if ict else []) + [0.05])
  ax.set_ylim(0, min(1.0, 1.25 * top))
  ax.set_title("Open-QA retrieval recall of each index (star: final)")
  ax.set_xlabel("checkpoint step of the document tower")
  ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def sample_answers(workdir: pathlib.Path, n: int = 4) -> list[dict]:
  """A few held-out predictions: correct ones first, with the evidence sentence."""
  path = workdir / "predictions.jsonl"
  if not path.exists():
    return []
  preds = [json.loads(line) for line in path.read_text().splitlines() if line]
  preds.sort(key=lambda p: (not p["correct"], p["first_hit_rank"] is None))
  return preds[:n]


def evidence(block_text: str, chars: list[int] | None, width: int = 160) -> str:
  """The answer span in its context, marked with [[ ]]."""
  if not chars:
    return block_text[:width] + ("..." if len(block_text) > width else "")
  a, b = chars
  left = max(0, a - width // 2)
  right = min(len(block_text), b + width // 2)
  return ("..." if left else "") + block_text[left:a] + "[[" + block_text[a:b] + "]]" + block_text[b:right] + \
      ("..." if right < len(block_text) else "")
