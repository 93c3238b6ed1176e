"""Open-QA fine-tuning on NaturalQuestions-Open with the REALM paper's settings.

lr 1e-5, reader beam 5, retriever beam 5000 (ORQA), query 64 / block 288 / reader 320 tokens, BERT-base.
Set `train_questions` to the NQ-Open train JSONL/TSV (a path or gs:// URI) and `init` to the
pre-trained REALM run's storage root (or converted weights); `nq-test` is evaluated at the end.
"""

from realm_jax.config import get_preset
from realm_jax.openqa.config import FinetuneConfig


def get_config() -> FinetuneConfig:
  return FinetuneConfig(
      model=get_preset("base", query_len=64, block_len=288, reader_len=320, reader_beam_size=5),
      train_questions="",  # e.g. --set train_questions=gs://bucket/data/nq-open-train.jsonl
      eval_questions="nq-test",
      retriever_beam_size=5000,
      batch_size=64,  # questions per step, sharded over the mesh
      learning_rate=1e-5,
      num_train_steps=20_000,
      checkpoint_every=1000,
      log_every=50,
      init="required:the pre-trained REALM run's storage root (or converted REALM weights)",
  )
