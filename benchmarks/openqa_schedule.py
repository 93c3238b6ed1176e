"""ORQA's one-question-per-step schedule against batched schedules, on one small Open-QA task.

One command: `python benchmarks/openqa_schedule.py [--seeds 0 1 2] [--batch 8] [--epochs 20]
[--learning-rate 1e-5] [--scalings none sqrt linear] [--json OUT]`.

The task is the one of `tests/test_openqa_learning.py`'s first test: 32 invented people, one block
each ("X was born in CITY. ..."), every tower from the packaged MiniLM-L6 (`--layers`: its first
layers only), a fresh span head; fine-tuning on the 16 training people's "Where was X born?",
evaluation on the other 16 (never seen). As in ORQA, the query tower and the reader are trained and
the index stays the one built at step 0.

Each arm trains the same number of epochs with the real `Finetuner`:
- `orqa`: batch 1 at `--learning-rate` for `--epochs` epochs, warmup BERT's
  min(10000, max(100, steps / 10)) (ORQA's `orqa_model.py`);
- `batch B, <scaling>`: batch B, steps / B, warmup / B, learning rate x1 (`none`), x sqrt(B)
  (`sqrt`) or x B (`linear`).
It prints one row per (arm, seed): held-out exact match and recall@1 after fine-tuning, training
exact match and the last logged loss; then the mean and spread per arm. Accuracy only: the time
of a run depends on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from realm_jax.config import get_preset  # noqa: E402
from realm_jax.data.corpus import build_corpus  # noqa: E402
from realm_jax.data.qa import QAExample  # noqa: E402
from realm_jax.openqa.config import FinetuneConfig, orqa_schedule  # noqa: E402
from realm_jax.openqa.evaluate import Evaluator  # noqa: E402
from realm_jax.openqa.finetune import Finetuner  # noqa: E402
from realm_jax.retrieval import index as index_lib  # noqa: E402
from realm_jax.storage import Storage  # noqa: E402
from tests.helpers.facts_corpus import ONE_PIECE_CITIES, invented_names  # noqa: E402

NUM_PEOPLE = 32


def build_task(root: pathlib.Path) -> tuple[list[QAExample], list[QAExample]]:
  """The corpus under `root/corpus` and (training, held-out) questions."""
  names, cities = invented_names(NUM_PEOPLE), ONE_PIECE_CITIES[:NUM_PEOPLE]
  docs = [{"title": n, "text": f"{n} was born in {c}. {n} worked as a cartographer for many years. "
                               f"Later {n} moved to a small village near the coast."} for n, c in zip(names, cities)]
  (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  build_corpus([str(root / "docs.jsonl")], Storage.open(str(root / "seed")), block_len=48)
  questions = [QAExample(n, f"Where was {n} born?", [c]) for n, c in zip(names, cities)]
  return questions[:NUM_PEOPLE // 2], questions[NUM_PEOPLE // 2:]


def run_arm(root: pathlib.Path, name: str, train: list[QAExample], held: list[QAExample], seed: int, layers: int,
            schedule: dict) -> dict:
  """Fine-tunes a fresh model on a copy of the corpus; held-out and training metrics after."""
  src, run_root = Storage.open(str(root / "seed")), root / f"{name.replace(' ', '_')}-{seed}"
  dst = Storage.open(str(run_root))
  for path in src.list("corpus"):
    dst.write_bytes(path, src.read_bytes(path))
  model = get_preset("minilm", query_len=16, block_len=48, reader_len=40, reader_beam_size=1,
                     **{"bert.num_layers": layers})
  cfg = FinetuneConfig(model=model, init="minilm", retriever_beam_size=8, max_answers=1, max_answer_tokens=4,
                       seed=seed, log_every=max(1, schedule["num_train_steps"] // 10),
                       checkpoint_every=schedule["num_train_steps"], async_checkpointing=False, **schedule)
  tuner = Finetuner(cfg, str(run_root), questions=train, log_fn=lambda m: None)
  evaluator = Evaluator(tuner.model, cfg.model, tuner.tables, index_lib.load_index(tuner.storage).embeddings,
                        tuner.mesh, batch_size=16, recall_ks=(1,))
  result = tuner.run()
  _, after = evaluator.evaluate(held, "held-out")
  _, after_train = evaluator.evaluate(train, "train")
  return {"arm": name, "seed": seed, **schedule, "held_out_em": after.exact_match,
          "held_out_recall@1": after.recall[1], "train_em": after_train.exact_match,
          "last_loss": result.history[-1]["loss"]}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--batch", type=int, default=8, help="the batched arms' questions per step")
  p.add_argument("--epochs", type=int, default=20, help="epochs over the 16 training questions (ORQA: 20)")
  p.add_argument("--learning-rate", type=float, default=1e-5, help="the batch-1 arm's rate (ORQA: 1e-5)")
  p.add_argument("--scalings", nargs="+", default=["none", "sqrt", "linear"], choices=["none", "sqrt", "linear"])
  p.add_argument("--layers", type=int, default=6, help="MiniLM layers in every tower (at most 6)")
  p.add_argument("--json", help="also write the rows to this JSON file")
  args = p.parse_args()

  arms = {"orqa (batch 1)": orqa_schedule(NUM_PEOPLE // 2, epochs=args.epochs, learning_rate=args.learning_rate)}
  for scaling in args.scalings:
    arms[f"batch {args.batch}, lr {scaling}"] = orqa_schedule(
        NUM_PEOPLE // 2, epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch,
        lr_scaling=scaling)
  rows = []
  with tempfile.TemporaryDirectory(prefix="openqa-schedule-") as tmp:
    root = pathlib.Path(tmp)
    train, held = build_task(root)
    for seed in args.seeds:
      for name, schedule in arms.items():
        row = run_arm(root, name, train, held, seed, args.layers, schedule)
        rows.append(row)
        print(f"{name:24s} seed {seed}: steps {row['num_train_steps']:4d} lr {row['learning_rate']:.2e} "
              f"held-out EM {row['held_out_em']:.3f} recall@1 {row['held_out_recall@1']:.3f} "
              f"train EM {row['train_em']:.3f} loss {row['last_loss']:.3f}", flush=True)
  print(f"\n{'arm':24s} {'held-out EM':>16s} {'recall@1':>16s} {'train EM':>16s}")
  for name in arms:
    mine = [r for r in rows if r["arm"] == name]

    def stat(key, mine=mine):
      v = np.array([r[key] for r in mine])
      return f"{v.mean():.3f} +- {v.std():.3f}"
    print(f"{name:24s} {stat('held_out_em'):>16s} {stat('held_out_recall@1'):>16s} {stat('train_em'):>16s}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
