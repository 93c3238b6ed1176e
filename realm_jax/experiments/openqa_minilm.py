"""Open-QA fine-tuning on a user's own corpus from the packaged MiniLM-L6 sentence embedder.

The retriever keeps what the sentence embedder learned: mean pooling over the tokens
(`model.retriever_pooling="mean"`) and a head that keeps its ranking (a fixed orthonormal
projection to 128-d, scores = 20 x cosine; `models.retriever.init_sentence_head`), instead of the
paper's random projection of the [CLS] vector. The reader starts from the same MiniLM. On the
short-document corpus of `benchmarks/short_docs.py` this starts at recall@5 63.5% where the
paper's head starts at 39.2% and BM25 reaches 47.3% (docs/OPENQA.md). Query 64 / block 128 /
reader 192 tokens (short documents: set `model.block_len` to the corpus's block length, and
`model.reader_len` to about query + block); batch 8 at lr 1e-5.
Set `train_questions` (a question set's short name, or a JSONL/TSV path or URI).
"""

from realm_jax.config import get_preset
from realm_jax.openqa.config import FinetuneConfig


def get_config() -> FinetuneConfig:
  return FinetuneConfig(
      model=get_preset("minilm", retriever_pooling="mean", query_len=64, block_len=128, reader_len=192,
                       reader_beam_size=5),
      init="minilm",
      train_questions="",  # e.g. --set train_questions=my-questions.jsonl
      retriever_beam_size=100,
      batch_size=8,
      learning_rate=1e-5,
      num_train_steps=1000,
      warmup_steps=100,
      checkpoint_every=200,
      log_every=20,
  )
