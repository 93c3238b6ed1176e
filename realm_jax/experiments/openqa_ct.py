"""Open-QA fine-tuning on CuratedTrec with the REALM paper's settings (see openqa_nq.py).

CuratedTrec answers are regular expressions: exact match is ORQA's regex match; for training,
only answers that are plain literals are located in the blocks (see docs/OPENQA.md).
"""

from realm_jax.openqa.config import FinetuneConfig, load_finetune_config


def get_config() -> FinetuneConfig:
  return load_finetune_config("openqa_nq").replace(eval_questions="ct-test", num_train_steps=1_000,
                                                   checkpoint_every=250)
