"""ORQA's Inverse Cloze Task warm start: batch 4096, lr 1e-4, 100k steps, query 64 / block 288.

Starts from BERT-base (ORQA, REALM): `init` must name BERT-base weights converted with
`realm-jax convert hf --kind bert --path bert-base-uncased/ --out URI` (both towers start from it).
The whole batch in one step does not fit any accelerator: the slice configs (ict_v4_32,
ict_v5e_64, ict_gpu) run it as gradient-accumulation micro-batches.
"""

from realm_jax.config import get_preset
from realm_jax.train.config import TrainConfig


def get_config() -> TrainConfig:
  return TrainConfig(
      model=get_preset("base", query_len=64, **{"bert.dtype": "bfloat16"}),
      task="ict",
      batch_size=4096,
      learning_rate=1e-4,
      num_train_steps=100_000,
      ict_remove_prob=0.9,
      checkpoint_every=1000,
      log_every=100,
      init="required:BERT-base weights (realm-jax convert hf --kind bert --path bert-base-uncased/ --out URI)",
  )
