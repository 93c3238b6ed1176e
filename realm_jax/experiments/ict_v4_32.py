"""ICT pre-training on a TPU v4-32 slice (16 chips, 4 hosts, 32 GiB HBM each).

ict_base (batch 4096, BERT-base, bfloat16 compute) run as 4 micro-batches of 1024, i.e. 64
examples per chip per micro-step: train/memory.py estimates 22.8 GiB per device, 71% of the 32
GiB, the smallest accumulation under 90% (not yet checked on a TPU). ICT's in-batch negatives are
the other blocks of the micro-batch (1023 here). The trainer checks the slice and the estimate at
start (`target_slice`).
"""

from realm_jax.train.config import load_config


def get_config():
  return load_config("ict_base").replace(grad_accum_steps=4, target_slice="v4-32")
