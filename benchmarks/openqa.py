"""Open-QA answering throughput: our batched `evaluate` path against HF `RealmForOpenQA`.

One command: `python benchmarks/openqa.py [--blocks 512] [--questions 64] [--batch 32] [--devices 1]`.
A tiny REALM config, a synthetic block corpus of `--blocks` invented biographies (built with our
corpus builder, MiniLM WordPiece vocab) and random block embeddings; a random-initialised
transformers 4.40.2 `RealmForOpenQA` (with a `RealmRetriever` over the same block texts) is
converted into our OpenQAModel, so both answer with the same weights, blocks and embeddings.
  - ours: `Evaluator.answer` — questions in batches sharded over the mesh, exact MIPS, reader
    over the top `reader_beam_size` blocks, spans -> text (compile excluded: one warm-up pass);
  - HF: `RealmForOpenQA.forward`, one question at a time (its batch size must be 1), eval mode;
Both answer the first `--questions` NQ-Open test questions. Prints questions/s of each, the
ratio ours / HF, the fraction of questions where both picked the same block and span, and the
1-minute load average before and after. `--whole-batch` also times ours without the CPU
micro-batches (each tower over the whole batch at once), in the same alternating rounds.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--blocks", type=int, default=512)
  p.add_argument("--questions", type=int, default=64)
  p.add_argument("--batch", type=int, default=32, help="our questions per batch")
  p.add_argument("--devices", type=int, default=None, help="emulated CPU devices (default: what JAX finds)")
  p.add_argument("--reader-beam", type=int, default=5)
  p.add_argument("--vocab", default=None, help="WordPiece vocab.txt (default: the packaged MiniLM's)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--no-hf", action="store_true", help="time ours only (where transformers 4.40.2 is absent)")
  p.add_argument("--whole-batch", action="store_true", help="also time ours without micro-batches")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype of both sides (bfloat16: ours `bert.dtype`, HF under torch.autocast)")
  args = p.parse_args()
  print(f"load average (1 min) before: {os.getloadavg()[0]:.2f}", flush=True)
  if args.devices:
    os.environ["JAX_NUM_CPU_DEVICES"] = str(args.devices)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  import jax
  from flax import nnx

  from realm_jax.config import get_preset
  from realm_jax.convert import hf as hfconv
  from realm_jax.data import sources
  from realm_jax.data.corpus import build_corpus
  from realm_jax.data.qa import load_questions
  from realm_jax.models import OpenQAModel
  from realm_jax.openqa import loading
  from realm_jax.openqa.evaluate import Evaluator
  from realm_jax.parallel import make_mesh
  from realm_jax.storage import Storage

  # reader_len = question (<= 14 tokens here) + block: little padding, as with the paper's 64/288/320.
  cfg = get_preset("tiny", query_len=32, block_len=128, reader_len=144, reader_beam_size=args.reader_beam,
                   **{"bert.dtype": args.dtype})
  rng = np.random.default_rng(0)
  words = ["river", "castle", "painter", "harbour", "mountain", "library", "festival", "railway", "bridge", "market"]
  tmp = tempfile.mkdtemp(prefix="realm-openqa-bench-")  # the corpus is read lazily: kept to the end
  atexit.register(shutil.rmtree, tmp, True)
  docs = []
  for i in range(args.blocks):
    name = f"Person{i}"
    text = " ".join(f"{name} visited the {rng.choice(words)} of town {rng.integers(1000)} in {1800 + i % 200}."
                    for _ in range(14))
    docs.append(json.dumps({"title": name, "text": text}) + "\n")
  with open(os.path.join(tmp, "docs.jsonl"), "w") as f:
    f.writelines(docs)
  storage = Storage.open(os.path.join(tmp, "root"))
  vocab = args.vocab or str(sources.minilm_dir() / "vocab.txt")
  build_corpus([os.path.join(tmp, "docs.jsonl")], storage, tokenizer=f"wordpiece:{vocab}", block_len=cfg.block_len)
  tables = loading.load_corpus(storage, "corpus", cfg)
  n = tables.num_blocks
  blocks = tables.reader.get_blocks(list(range(n)))
  embeddings = rng.normal(size=(n, cfg.retriever_dim)).astype(np.float32)
  questions = load_questions("nq-test")[:args.questions]

  model = OpenQAModel(cfg, rngs=nnx.Rngs(0))
  mesh = make_mesh()
  if args.no_hf:
    model.eval()
    _time_ours(model, cfg, tables, embeddings, mesh, questions, args, None)
    return
  import torch
  import transformers

  # HF model with a retriever over the same block texts; its weights converted into ours.
  hf_cfg = transformers.RealmConfig(**hfconv.hf_config_dict(cfg), num_block_records=n, searcher_beam_size=n)
  tokenizer = transformers.BertTokenizerFast(vocab_file=vocab)
  records = np.array([b.text.encode() for b in blocks], dtype=object)
  hf = transformers.RealmForOpenQA(hf_cfg, retriever=transformers.RealmRetriever(records, tokenizer))
  with torch.no_grad():
    hf.block_emb.copy_(torch.from_numpy(embeddings))
  hf.eval()
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  hfconv.load_state_dict(model.retriever.query_embedder, {k: v for k, v in sd.items() if k.startswith("embedder.")},
                         hfconv.embedder_rules("embedder."), skip=hfconv.SKIP_EMBEDDER)
  hfconv.load_state_dict(model.reader, {k: v for k, v in sd.items() if k.startswith("reader.")},
                         hfconv.reader_rules("reader."), skip=hfconv.SKIP_READER)
  model.eval()

  evaluator = Evaluator(model, cfg, tables, embeddings, mesh, batch_size=args.batch, recall_ks=(args.reader_beam,))
  evaluator.answer(questions)  # compile
  whole = None
  if args.whole_batch:
    whole = Evaluator(model, cfg, tables, embeddings, mesh, batch_size=args.batch, recall_ks=(args.reader_beam,),
                      step_tokens=None)
    whole.answer(questions)

  def run_hf():
    out = []
    # bfloat16: PyTorch's CPU autocast (oneDNN bfloat16 matmuls) as the peer
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
      for ex in questions:
        r = hf(**tokenizer([ex.question], return_tensors="pt"), return_dict=True)
        out.append((r.reader_output.block_idx.item(), r.predicted_answer_ids.tolist()))
    return out

  run_hf()  # warm-up
  ours_times, hf_times, whole_times = [], [], []
  for _ in range(args.rounds):  # alternating rounds: both see the same machine load
    t0 = time.perf_counter()
    ours = evaluator.answer(questions)
    ours_times.append(time.perf_counter() - t0)
    if whole:
      t0 = time.perf_counter()
      whole.answer(questions)
      whole_times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    hf_out = run_hf()
    hf_times.append(time.perf_counter() - t0)
  ours_s, hf_s = statistics.median(ours_times), statistics.median(hf_times)
  same = 0
  for o, (block_idx, answer_ids) in zip(ours, hf_out):
    block = blocks[o["block_id"]]
    a, b = o["span_tokens"]
    same += o["block_rank"] - 1 == block_idx and block.body_ids[a:b + 1].tolist() == answer_ids
  q = len(questions)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, mesh {dict(mesh.shape)}; torch CPU "
        f"{torch.get_num_threads()} threads; {n} blocks, tiny config ({args.dtype}), reader beam "
        f"{args.reader_beam}, {q} NQ-Open questions; median of {args.rounds} alternating rounds")
  print(f"ours (Evaluator.answer, batches of {evaluator.batch_size}): {q / ours_s:9.1f} questions/s")
  print(f"HF RealmForOpenQA (1 question/call):       {q / hf_s:9.1f} questions/s")
  if whole:
    print(f"ours, whole batch per tower (no micro-batches): {q / statistics.median(whole_times):9.1f} questions/s")
  print(f"ratio ours / HF: {hf_s / ours_s:.2f}x;  same block and span as HF: {same}/{q}")
  print(f"load average (1 min) after: {os.getloadavg()[0]:.2f}")


def _time_ours(model, cfg, tables, embeddings, mesh, questions, args, note):
  """Times `Evaluator.answer` (answers only) and `Evaluator.evaluate` (+ EM and recall@1..100)."""
  import jax

  from realm_jax.openqa.evaluate import Evaluator

  q = len(questions)
  answer_only = Evaluator(model, cfg, tables, embeddings, mesh, batch_size=args.batch, recall_ks=(args.reader_beam,))
  full = Evaluator(model, cfg, tables, embeddings, mesh, batch_size=args.batch)
  answer_only.answer(questions)  # compile
  full.evaluate(questions)
  t0 = time.perf_counter()
  ours = answer_only.answer(questions)
  ours_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  _, summary = full.evaluate(questions)
  full_s = time.perf_counter() - t0
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, mesh {dict(mesh.shape)}; {tables.num_blocks} "
        f"blocks, tiny config, reader beam {args.reader_beam}, {q} NQ-Open questions, "
        f"batches of {answer_only.batch_size}")
  print(f"ours, answers only (retrieve top {answer_only.beam}):        {q / ours_s:9.1f} questions/s")
  print(f"ours, evaluate (top {full.beam}, EM + recall@k on the host): {q / full_s:9.1f} questions/s")
  print(f"load average (1 min) after: {os.getloadavg()[0]:.2f}")
  return ours, ours_s


if __name__ == "__main__":
  main()
