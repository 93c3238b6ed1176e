"""Tiny REALM pre-training on CPU in seconds: checks the whole loop, not the quality."""

from realm_jax.config import get_preset
from realm_jax.train.config import TrainConfig


def get_config() -> TrainConfig:
  return TrainConfig(
      model=get_preset("tiny", query_len=32, block_len=64, num_candidates=4),
      task="realm",
      batch_size=8,
      learning_rate=1e-3,
      num_train_steps=20,
      warmup_steps=2,
      checkpoint_every=10,
      log_every=5,
      index_refresh="async",
      index_poll_seconds=0.5,
  )
