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
ratio ours / HF, and the fraction of questions where both picked the same block and span.
"""

from __future__ import annotations

import argparse
import json
import os
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
  args = p.parse_args()
  if args.devices:
    os.environ["JAX_NUM_CPU_DEVICES"] = str(args.devices)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  import jax
  import torch
  import transformers
  from flax import nnx

  from realm_jax.config import get_preset
  from realm_jax.convert import hf as hfconv
  from realm_jax.data import sources
  from realm_jax.data.corpus import build_corpus
  from realm_jax.data.qa import load_questions
  from realm_jax.models import OpenQAModel
  from realm_jax.openqa import loading
  from realm_jax.openqa.config import FinetuneConfig
  from realm_jax.openqa.evaluate import Evaluator
  from realm_jax.storage import Storage
  from realm_jax.train.trainer import make_mesh

  cfg = get_preset("tiny", query_len=64, block_len=128, reader_len=192, reader_beam_size=args.reader_beam)
  rng = np.random.default_rng(0)
  words = ["river", "castle", "painter", "harbour", "mountain", "library", "festival", "railway", "bridge", "market"]
  with tempfile.TemporaryDirectory() as tmp:
    docs = []
    for i in range(args.blocks):
      name = f"Person{i}"
      text = " ".join(f"{name} visited the {rng.choice(words)} of town {rng.integers(1000)} in {1800 + i % 200}."
                      for _ in range(6))
      docs.append(json.dumps({"title": name, "text": text}) + "\n")
    with open(os.path.join(tmp, "docs.jsonl"), "w") as f:
      f.writelines(docs)
    storage = Storage.open(os.path.join(tmp, "root"))
    build_corpus([os.path.join(tmp, "docs.jsonl")], storage, block_len=cfg.block_len)
    tables = loading.load_corpus(storage, "corpus", cfg)
  n = tables.num_blocks
  embeddings = rng.normal(size=(n, cfg.retriever_dim)).astype(np.float32)
  questions = load_questions("nq-test")[:args.questions]

  # HF model with a retriever over the same block texts; its weights converted into ours.
  hf_cfg = transformers.RealmConfig(**hfconv.hf_config_dict(cfg), num_block_records=n, searcher_beam_size=n)
  tokenizer = transformers.BertTokenizerFast(vocab_file=str(sources.minilm_dir() / "vocab.txt"))
  records = np.array([b.text.encode() for b in tables.blocks], dtype=object)
  hf = transformers.RealmForOpenQA(hf_cfg, retriever=transformers.RealmRetriever(records, tokenizer))
  with torch.no_grad():
    hf.block_emb.copy_(torch.from_numpy(embeddings))
  hf.eval()
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  model = OpenQAModel(cfg, rngs=nnx.Rngs(0))
  hfconv.load_state_dict(model.retriever.query_embedder, {k: v for k, v in sd.items() if k.startswith("embedder.")},
                         hfconv.embedder_rules("embedder."), skip=hfconv.SKIP_EMBEDDER)
  hfconv.load_state_dict(model.reader, {k: v for k, v in sd.items() if k.startswith("reader.")},
                         hfconv.reader_rules("reader."), skip=hfconv.SKIP_READER)
  model.eval()

  mesh = make_mesh(FinetuneConfig())
  evaluator = Evaluator(model, cfg, tables, embeddings, mesh, batch_size=args.batch, recall_ks=(args.reader_beam,))
  evaluator.answer(questions)  # compile
  t0 = time.perf_counter()
  ours = evaluator.answer(questions)
  ours_s = time.perf_counter() - t0

  hf_out = []
  with torch.no_grad():
    hf(**tokenizer([questions[0].question], return_tensors="pt"), return_dict=True)  # warm-up
    t0 = time.perf_counter()
    for ex in questions:
      out = hf(**tokenizer([ex.question], return_tensors="pt"), return_dict=True)
      hf_out.append((out.reader_output.block_idx.item(), out.predicted_answer_ids.tolist()))
    hf_s = time.perf_counter() - t0

  same = 0
  for o, (block_idx, answer_ids) in zip(ours, hf_out):
    block = tables.blocks[o["block_id"]]
    a, b = o["span_tokens"]
    same += o["block_rank"] - 1 == block_idx and block.body_ids[a:b + 1].tolist() == answer_ids
  q = len(questions)
  print(f"device: {jax.devices()[0].platform} x{jax.device_count()} (ours) / torch CPU {torch.get_num_threads()} "
        f"threads (HF); {n} blocks, tiny config, reader beam {args.reader_beam}, {q} NQ-Open questions")
  print(f"ours (batched {evaluator.batch_size}, mesh {dict(mesh.shape)}): {q / ours_s:9.1f} questions/s")
  print(f"HF RealmForOpenQA (1 question/call):      {q / hf_s:9.1f} questions/s")
  print(f"ratio ours / HF: {hf_s / ours_s:.2f}x;  same block and span as HF: {same}/{q}")


if __name__ == "__main__":
  main()
