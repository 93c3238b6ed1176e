"""Open-QA fine-tuning on WebQuestions with the REALM paper's settings (see openqa_nq.py)."""

from realm_jax.openqa.config import FinetuneConfig, load_finetune_config


def get_config() -> FinetuneConfig:
  return load_finetune_config("openqa_nq").replace(eval_questions="wq-test", num_train_steps=3_000,
                                                   checkpoint_every=500)
