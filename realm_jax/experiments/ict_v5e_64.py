"""ICT pre-training on a TPU v5e-64 slice (v5litepod-64: 64 chips, 16 hosts, 16 GiB HBM each).

ict_base (batch 4096) run as 2 micro-batches of 2048, i.e. 32 examples per chip per micro-step:
train/memory.py estimates 13.4 GiB per device, 84% of the 16 GiB, the smallest accumulation under
90% (not yet checked on a TPU). In-batch negatives: the other 2047 blocks of the micro-batch. The
trainer checks the slice and the estimate at start (`target_slice`).
"""

from realm_jax.train.config import load_config


def get_config():
  return load_config("ict_base").replace(grad_accum_steps=2, target_slice="v5litepod-64")
