"""Tiny Open-QA fine-tuning on CPU in a minute: checks the whole loop, not the quality."""

from realm_jax.config import get_preset
from realm_jax.openqa.config import FinetuneConfig


def get_config() -> FinetuneConfig:
  return FinetuneConfig(
      model=get_preset("tiny", query_len=16, block_len=64, reader_len=80, reader_beam_size=4),
      retriever_beam_size=16,
      batch_size=16,
      learning_rate=1e-3,
      num_train_steps=40,
      warmup_steps=4,
      checkpoint_every=20,
      log_every=5,
  )
