"""Tiny ICT warm start on CPU in seconds."""

from realm_jax.config import get_preset
from realm_jax.train.config import TrainConfig


def get_config() -> TrainConfig:
  return TrainConfig(
      model=get_preset("tiny", query_len=32, block_len=64),
      task="ict",
      batch_size=16,
      learning_rate=1e-3,
      num_train_steps=20,
      warmup_steps=2,
      checkpoint_every=10,
      log_every=5,
  )
