"""REALM pre-training on Wikipedia, the paper's settings (Guu et al. 2020, §4 and App. A).

BERT-base towers (shared query/document embedder), batch 512, lr 3e-5, 200k steps, 8 candidates
(null + 7), salient-span masking; the index is refreshed by a separate refresher job about every
500 steps (checkpoint_every), and the trainer swaps it in asynchronously. Start from ICT
(`--set init=gs://.../ict/weights`) as the paper does.
"""

from realm_jax.config import get_preset
from realm_jax.train.config import TrainConfig


def get_config() -> TrainConfig:
  return TrainConfig(
      model=get_preset("base", **{"bert.dtype": "bfloat16"}),
      task="realm",
      corpus_prefix="corpus",
      masking="salient",
      batch_size=512,
      learning_rate=3e-5,
      num_train_steps=200_000,
      retrieval="device",
      approx_top_k=True,  # lax.approx_max_k on TPU
      index_refresh="async",
      index_poll_seconds=30.0,
      checkpoint_every=500,
      keep_checkpoints=3,
      log_every=100,
  )
