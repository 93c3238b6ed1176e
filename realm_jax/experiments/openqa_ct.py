"""Open-QA fine-tuning on CuratedTrec with ORQA's settings (see openqa_nq.py): one question per
step, lr 1e-5, 20 epochs of the 1,353 training questions (27,060 steps).

CuratedTrec answers are regular expressions: exact match is ORQA's regex match; for training,
only answers that are plain literals are located in the blocks (see docs/OPENQA.md).
"""

from realm_jax.openqa.config import ORQA_TRAIN_QUESTIONS, FinetuneConfig, load_finetune_config, orqa_schedule


def get_config() -> FinetuneConfig:
  return load_finetune_config("openqa_nq").replace(eval_questions="ct-test",
                                                   **orqa_schedule(ORQA_TRAIN_QUESTIONS["ct"]))
