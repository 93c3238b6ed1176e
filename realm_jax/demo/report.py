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


def _run_row(rows: list[dict]) -> dict:
  """The REALM-phase numbers of one run's metrics rows (REALM or the control)."""
  return {
      "steps": int(rows[-1]["step"]) if rows else 0,
      "loss_first": float(rows[0]["loss"]) if rows else None,  # step 1: the same for REALM and the control
      "mlm_accuracy_first5": _mean(rows, "mlm_accuracy", slice(0, 5)),
      "mlm_accuracy_last5": _mean(rows, "mlm_accuracy", slice(-5, None)),
      # the original REALM code's: per masked token, marginal log-likelihood minus the null document's
      "retrieval_utility_last10": _mean(rows, "retrieval_utility", slice(-10, None)),
      "retrieval_utility_first10": _mean(rows, "retrieval_utility", slice(0, 10)),
      # per example: the top-scoring retrieved block's log-likelihood minus the null document's
      "top1_utility_last10": _mean(rows, "top1_utility", slice(-10, None)),
      "null_doc_prob_last10": _mean(rows, "null_doc_prob", slice(-10, None)),
  }


def _at(recall: dict | None, k: int = RECALL_K) -> float | None:
  return recall.get(f"recall@{k}") if recall else None


def summarize(results: dict, metrics: list[dict], control_metrics: list[dict], seed: int) -> dict:
  """The numbers of the table, from the stage results and the trainers' metrics rows. The field
  names are stable (`benchmarks/demo_table.py` and `tests/test_demo.py` read them)."""
  points = results["recall"]["points"]
  trained = [p for p in points if not p["final"]]
  start = min(trained, key=lambda p: p["step"]) if trained else None  # REALM's first index
  ict = results.get("ict")
  refs = results.get("references", {})
  control = results.get("control")
  final = next((p for p in points if p["final"]), None)
  strip = ("version", "step", "final")
  recall = {
      "before": ict["recall_init"] if ict else start and {k: v for k, v in start.items() if k not in strip},
      "after_ict": {k: v for k, v in start.items() if k not in strip} if ict and start else None,
      "after_realm": {k: v for k, v in final.items() if k not in strip} if final else None,
      "after_control": control["recall_end"] if control else None,
      "control_start": control["recall_start"] if control else None,
      "bm25": refs.get("bm25"),
      "minilm": refs.get("minilm"),
  }
  test = results["finetune"]["test"]
  reading = results.get("reading")
  realm = {**_run_row(metrics), "refreshes": len([p for p in trained if p["step"] > 0]),
           "swaps": len(results["pretrain"]["swaps"]), "mean_staleness": _mean(metrics, "index_staleness"),
           "start": results["pretrain"].get("start")}
  seconds = sum(r.get("seconds", 0.0) for r in results.values())
  return {
      "seed": seed,
      "wall_seconds": seconds,
      "cpu_seconds": sum(r.get("cpu_seconds", 0.0) for r in results.values()),
      "stage_seconds": {k: round(r.get("seconds", 0.0), 1) for k, r in results.items()},
      "corpus": {"articles": results["corpus"]["articles"], "blocks": results["corpus"]["blocks"],
                 "salient_spans": results["corpus"]["salient_spans"]},
      "questions": {"answerable": results["questions"]["answerable"], "train": results["questions"]["train"],
                    "test": results["questions"]["test"]},
      "ict": {"steps": ict["steps"] if ict else 0},
      "reading": {"steps": reading["steps"], "gold_fraction": reading["gold_fraction"],
                  "accuracy_gold_before": reading["accuracy_before"].get("gold"),
                  "accuracy_gold_after": reading["accuracy_after"].get("gold"),
                  "accuracy_null_after": reading["accuracy_after"].get("null")} if reading else None,
      "realm": realm,
      "control": {**_run_row(control_metrics), "start": control["start"]} if control else None,
      "recall_at_5": {k: _at(v) for k, v in recall.items() if k != "control_start"},
      "recall": recall,
      "openqa": {"exact_match": test["exact_match"], "recall_at_5": test.get(f"recall@{RECALL_K}"),
                 "recall_at_1": test.get("recall@1"), "train_questions": results["finetune"]["train_questions"],
                 "steps": results["finetune"]["steps"]},
  }


def _fmt(v, pct: bool = False, signed: bool = False) -> str:
  if v is None:
    return "-"
  if pct:
    return f"{100 * v:.1f}%"
  if signed:
    return f"{v:+.2f}"
  return f"{v:,.2f}" if isinstance(v, float) else f"{v:,}"


def table(s: dict) -> Table:
  t = Table(title="realm-jax demo", show_header=True, header_style="bold")
  t.add_column("")
  t.add_column("REALM", justify="right")
  t.add_column("control", justify="right")
  r, c = s["realm"], s["control"] or {}
  reading = s.get("reading")
  rows = [
      ("Wikipedia articles / blocks", f"{s['corpus']['articles']} / {s['corpus']['blocks']:,}", ""),
      ("salient spans", _fmt(s["corpus"]["salient_spans"]), ""),
      ("Open-QA questions answerable (train / held-out)",
       f"{s['questions']['answerable']} ({s['questions']['train']} / {s['questions']['test']})", ""),
      ("ICT warm-start steps / reading warm-start steps",
       f"{s['ict']['steps']} / {reading['steps'] if reading else 0}", ""),
  ]
  if reading:
    rows.append(("reading accuracy, held-out (answer block: before -> after; null doc)",
                 f"{_fmt(reading['accuracy_gold_before'], True)} -> {_fmt(reading['accuracy_gold_after'], True)}; "
                 f"{_fmt(reading['accuracy_null_after'], True)}", ""))
  rows += [
      ("REALM pre-training steps (same start for both)", _fmt(r["steps"]), _fmt(c.get("steps"))),
      ("index refreshes published / swapped in", f"{r['refreshes']} / {r['swaps']}", "none (frozen)"),
      ("mean index staleness (steps)", _fmt(r["mean_staleness"]), ""),
      ("MLM accuracy (first 5 -> last 5 steps)",
       f"{_fmt(r['mlm_accuracy_first5'], True)} -> {_fmt(r['mlm_accuracy_last5'], True)}",
       f"{_fmt(c.get('mlm_accuracy_first5'), True)} -> {_fmt(c.get('mlm_accuracy_last5'), True)}"),
      ("retrieval utility vs null doc, nats/token (last 10 steps)",
       _fmt(r["retrieval_utility_last10"], signed=True), _fmt(c.get("retrieval_utility_last10"), signed=True)),
      ("top-1 block utility vs null doc, nats (last 10 steps)",
       _fmt(r["top1_utility_last10"], signed=True), _fmt(c.get("top1_utility_last10"), signed=True)),
  ]
  for k in (1, RECALL_K, 20):
    rows.append((f"recall@{k}: initial / after ICT", f"{_fmt(_at(s['recall']['before'], k), True)} / "
                 f"{_fmt(_at(s['recall']['after_ict'], k), True)}", ""))
    rows.append((f"recall@{k} after pre-training", _fmt(_at(s['recall']['after_realm'], k), True),
                 _fmt(_at(s['recall']['after_control'], k), True)))
  for name, label in (("bm25", "BM25 (bm25s)"), ("minilm", "MiniLM-L6 mean-pooled (6 layers)")):
    if s["recall"].get(name):
      rows.append((f"reference recall@1 / @{RECALL_K} / @20: {label}",
                   " / ".join(_fmt(_at(s["recall"][name], k), True) for k in (1, RECALL_K, 20)), ""))
  rows += [
      ("Open-QA exact match (held-out)", _fmt(s["openqa"]["exact_match"], True), ""),
      (f"Open-QA recall@{RECALL_K} (held-out, fine-tuned)", _fmt(s["openqa"]["recall_at_5"], True), ""),
      ("wall time / CPU time (user + system)",
       f"{s['wall_seconds'] / 60:.1f} min / {s['cpu_seconds'] / 60:.1f} min", ""),
  ]
  for row in rows:
    t.add_row(*row)
  return t


def markdown(s: dict) -> str:
  """The same table as Markdown."""
  t = table(s)
  cells = [list(c.cells) for c in t.columns]
  lines = ["| | REALM | control |", "|---|---:|---:|"]
  lines += [f"| {a} | {b} | {c} |" for a, b, c in zip(*cells)]
  return "\n".join(lines) + "\n"


def plot(metrics: list[dict], control_metrics: list[dict], results: dict, path: pathlib.Path) -> None:
  """Training curves (loss, MLM accuracy, retrieval utility, staleness; the control dashed) and
  recall@k over time."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps = [r["step"] for r in metrics]
  fig, axes = plt.subplots(2, 2, figsize=(11, 7))
  swaps = results["pretrain"]["swaps"]

  def curve(ax, key, title):
    xs = [r["step"] for r in metrics if key in r]
    ax.plot(xs, [r[key] for r in metrics if key in r], lw=1.2, label="REALM")
    if control_metrics:
      xs = [r["step"] for r in control_metrics if key in r]
      ax.plot(xs, [r[key] for r in control_metrics if key in r], lw=1.0, ls="--", color="tab:red",
              label="control (retriever frozen)")
      ax.legend(loc="best", fontsize=7)
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
  """The first `n` held-out predictions (in the held-out file's order, right or wrong: a fixed
  rule, not a choice of the good ones), with the evidence sentence."""
  path = workdir / "predictions.jsonl"
  if not path.exists():
    return []
  preds = [json.loads(line) for line in path.read_text().splitlines() if line]
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
