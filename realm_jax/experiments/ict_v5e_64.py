"""ORQA's ICT warm start on a TPU v5e-64 slice (v5litepod-64: 64 chips, 16 hosts, 16 GiB HBM each).

ict_base (batch 4096) run as 4 micro-batches of 1024, i.e. 16 examples per chip per micro-step;
the optimizer batch stays 4096. train/memory.py's estimate: 11.0 GiB per device, 69% of the 16 GiB;
2 micro-batches (32 per chip) would need 17.9 GiB. In-batch negatives: the other 1023 blocks of
the micro-batch. The trainer checks the slice and the estimate at start (`target_slice`).
"""

from realm_jax.train.config import load_config


def get_config():
  return load_config("ict_base").replace(grad_accum_steps=4, target_slice="v5litepod-64")
