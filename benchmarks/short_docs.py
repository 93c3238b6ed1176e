"""A user's own corpus of short documents: the starting retriever and fine-tuning against BM25.

One command: `python benchmarks/short_docs.py [--steps 60] [--batch 8] [--learning-rate 1e-5]
[--dims 128 384] [--workdir DIR] [--json OUT]`.

The corpus: every article of the packaged Wikipedia excerpt (about 100 articles, whole, not only
their leads) cut into blocks of at most 64 tokens (`realm-jax corpus build --block-len 64`), and the
real Open-QA questions of the packaged sets (NaturalQuestions-Open, WebQuestions, CuratedTrec,
TriviaQA) that it can answer, chosen as the demo chooses them (the question names an article and a
specific answer occurs in one of its blocks), split in half (fixed split): fine-tuning sees the
first half, every recall below is on the held-out half.

Rows (recall@1/5/20 of an answer-bearing block, exact search):
- BM25 (`bm25s`, Lucene scoring, English stopwords) over each block's title and text;
- zero-shot `init=minilm` with the paper's retriever head (tanh-pooled [CLS] -> random Dense(128)
  -> LayerNorm): what a user got before `retriever_pooling` existed;
- zero-shot `init=minilm` with `retriever_pooling=mean` and the sentence head (identity at 384-d,
  a fixed orthonormal projection at 128-d), for each `--dims`;
- each of those after Open-QA fine-tuning with the real `Finetuner` (query tower and reader trained,
  index frozen, as ORQA) for `--steps` steps on the training half (`--finetune-cls` also fine-tunes
  the paper's head).
Accuracy only: times are printed with `uptime`'s load but are not the point.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from realm_jax.config import get_preset  # noqa: E402
from realm_jax.data import qa, sources  # noqa: E402
from realm_jax.data.corpus import CorpusReader, build_corpus  # noqa: E402
from realm_jax.demo import questions as demo_questions  # noqa: E402
from realm_jax.demo.recall import RecallProbe  # noqa: E402
from realm_jax.demo.references import bm25_recall  # noqa: E402
from realm_jax.openqa.config import FinetuneConfig  # noqa: E402
from realm_jax.openqa.finetune import Finetuner  # noqa: E402
from realm_jax.openqa.loading import init_openqa_model  # noqa: E402
from realm_jax.retrieval import index as index_lib  # noqa: E402
from realm_jax.storage import Storage  # noqa: E402

BLOCK_LEN, QUERY_LEN, KS = 64, 48, (1, 5, 20)


def _load() -> str:
  return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _model(pooling: str, dim: int):
  return get_preset("minilm", retriever_pooling=pooling, retriever_dim=dim, query_len=QUERY_LEN,
                    block_len=BLOCK_LEN, reader_len=QUERY_LEN + BLOCK_LEN, reader_beam_size=5)


def _row(name: str, recall: dict, seconds: float | None = None) -> dict:
  cells = "  ".join(f"@{k} {100 * recall[k]:5.1f}" for k in KS)
  print(f"{name:<44} {cells}" + (f"   ({seconds:.0f} s)" if seconds is not None else ""), flush=True)
  return {"name": name, **{f"recall@{k}": recall[k] for k in KS}}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=60, help="fine-tuning steps (default 60)")
  p.add_argument("--batch", type=int, default=8, help="questions per fine-tuning step (default 8)")
  p.add_argument("--learning-rate", type=float, default=1e-5)
  p.add_argument("--beam", type=int, default=100, help="retriever beam of the fine-tuning loss (default 100)")
  p.add_argument("--dims", type=int, nargs="+", default=[128, 384], help="retriever_dim of the mean-pooled rows")
  p.add_argument("--finetune-cls", action="store_true", help="also fine-tune the paper's [CLS] head")
  p.add_argument("--workdir", help="keep the corpus (reused) and the runs here (default: a temporary directory)")
  p.add_argument("--json", help="write the rows to this file")
  args = p.parse_args()
  print(f"load before: {_load()}", flush=True)
  t0 = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(args.workdir or tmp)
    corpus_uri = str(work / "corpus")  # build_corpus writes <root>/corpus
    if not (work / "corpus" / "manifest.json").exists():
      build_corpus([str(sources.wikipedia_excerpt())], Storage.open(str(work)), block_len=BLOCK_LEN,
                   tokenizer="minilm")
    reader = CorpusReader(Storage.open(str(work)))
    blocks = list(reader.iter_blocks())
    pool = [ex for name in demo_questions.QUESTION_SETS for ex in qa.load_questions(name)]
    picked = demo_questions.select_questions(blocks, pool)
    train, test = demo_questions.split(picked, 0.5)
    print(f"corpus: {len(blocks)} blocks of <= {BLOCK_LEN} tokens from {len({b.title for b in blocks})} articles; "
          f"{len(picked)} answerable questions: {len(train)} to fine-tune on, {len(test)} held out", flush=True)
    rows = [_row("BM25 (bm25s)", {int(k.split("@")[1]): v for k, v in bm25_recall(blocks, test, KS).items()})]
    probe = RecallProbe(blocks, test, reader.tokenizer(), BLOCK_LEN, QUERY_LEN, ks=KS)
    arms = [("cls", 128, args.finetune_cls)] + [("mean", d, True) for d in args.dims]
    for pooling, dim, tune in arms:
      head = "[CLS], random head" if pooling == "cls" else f"mean-pooled, sentence head {dim}-d"
      cfg = FinetuneConfig(model=_model(pooling, dim), init="minilm", corpus=corpus_uri,
                           retriever_beam_size=args.beam, batch_size=args.batch, learning_rate=args.learning_rate,
                           num_train_steps=max(1, args.steps), warmup_steps=max(1, args.steps // 10),
                           checkpoint_every=max(1, args.steps), log_every=max(1, args.steps // 6),
                           async_checkpointing=False)
      t = time.time()
      model = init_openqa_model(cfg.model, "minilm", cfg.seed, lambda m: None)
      model.eval()
      q_emb, d_emb = probe.embed(model.retriever)
      rows.append(_row(f"MiniLM zero-shot, {head}", probe.recall(q_emb, d_emb), time.time() - t))
      if not tune or args.steps <= 0:
        continue
      t = time.time()
      root = tempfile.mkdtemp(prefix=f"finetune-{pooling}-{dim}-", dir=work)  # a fresh run each time
      tuner = Finetuner(cfg, root, questions=train, log_fn=lambda m: None)
      tuner.run()
      frozen = index_lib.load_index(Storage.open(root), tuner.index_version).embeddings
      rows.append(_row(f"  + fine-tuned {args.steps} steps x {args.batch}", probe.recall(
          probe.embed_queries(tuner.model.retriever), np.asarray(frozen, np.float32)), time.time() - t))
  print(f"load after: {_load()}; {time.time() - t0:.0f} s in all", flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({"rows": rows, "steps": args.steps, "batch": args.batch,
                                                   "learning_rate": args.learning_rate, "pid": os.getpid()},
                                                  indent=1))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
