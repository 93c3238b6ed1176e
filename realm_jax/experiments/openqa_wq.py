"""Open-QA fine-tuning on WebQuestions with ORQA's settings (see openqa_nq.py): one question per
step, lr 1e-5, 20 epochs of the 3,417 training questions (68,340 steps, ORQA's README command)."""

from realm_jax.openqa.config import ORQA_TRAIN_QUESTIONS, FinetuneConfig, load_finetune_config, orqa_schedule


def get_config() -> FinetuneConfig:
  return load_finetune_config("openqa_nq").replace(eval_questions="wq-test",
                                                   **orqa_schedule(ORQA_TRAIN_QUESTIONS["wq"]))
