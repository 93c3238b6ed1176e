"""ORQA's ICT warm start on a TPU v4-32 slice (16 chips = 16 JAX devices, 4 hosts, 32 GiB HBM each).

ict_base (batch 4096, BERT-base, bfloat16 compute) run as 8 micro-batches of 512, i.e. 32 examples
per chip per micro-step; the optimizer batch stays 4096. train/memory.py's estimate: 17.9 GiB per
device, 56% of the 32 GiB; 4 micro-batches (64 per chip) would need 31.8 GiB, and the whole batch
in one step 114.0 GiB. ICT's in-batch negatives are the other blocks of the micro-batch (511
instead of ORQA's 4095). The trainer checks the slice and the estimate at start (`target_slice`).
"""

from realm_jax.train.config import load_config


def get_config():
  return load_config("ict_base").replace(grad_accum_steps=8, target_slice="v4-32")
