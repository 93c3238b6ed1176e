"""ORQA's ICT warm start on one 8-GPU node (H100 / A100 80GB, `pip install 'realm-jax[cuda]'`).

ict_base (batch 4096, bfloat16 compute) run as 4 micro-batches of 1024 (128 per GPU): the
estimator (realm_jax/train/memory.py) puts 128 per GPU at ~64 GB and the full 512 per GPU at
~240 GB. Note that ICT's negatives are the other blocks of the same micro-batch, so each query
sees 1023 negatives instead of ORQA's 4095 (A100 40GB: grad_accum_steps=8, 511 negatives).
"""

from realm_jax.train.config import load_config


def get_config():
  return load_config("ict_base").replace(grad_accum_steps=4)
