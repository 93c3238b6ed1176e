"""Open-QA fine-tuning on NaturalQuestions-Open with ORQA's (and so the REALM paper's) settings.

ORQA's schedule: one question per step, lr 1e-5, 20 epochs of the 79,168 training questions
(1,583,360 steps), BERT's warmup (10,000 steps) and linear decay (`openqa.config.orqa_schedule`).
Reader beam 5, retriever beam 5000, query 64 / block 288 / reader 320 tokens, BERT-base.
One question per step does not split over a data axis: run it with `mesh_model` = the device count
(the index rows split over every device), or take `openqa_nq_pod` (64 questions per step).
Set `train_questions` to the NQ-Open train JSONL/TSV (a path or gs:// URI) and `init` to the
pre-trained REALM run's storage root (or converted weights); `nq-test` is evaluated at the end.
"""

from realm_jax.config import get_preset
from realm_jax.openqa.config import ORQA_TRAIN_QUESTIONS, FinetuneConfig, orqa_schedule


def get_config() -> FinetuneConfig:
  return FinetuneConfig(
      model=get_preset("base", query_len=64, block_len=288, reader_len=320, reader_beam_size=5),
      train_questions="",  # e.g. --set train_questions=gs://bucket/data/nq-open-train.jsonl
      eval_questions="nq-test",
      retriever_beam_size=5000,
      **orqa_schedule(ORQA_TRAIN_QUESTIONS["nq"]),
      checkpoint_every=1000,  # ORQA's save_checkpoints_steps
      log_every=100,
      init="required:the pre-trained REALM run's storage root (or converted REALM weights)",
  )
