"""REALM pre-training on a TPU v4-32 slice (16 chips = 16 JAX devices, 4 hosts, 32 GiB HBM each).

realm_wiki_base (the paper's batch 512) run as 8 micro-batches of 64, i.e. 4 examples per chip per
micro-step; the optimizer batch stays 512. train/memory.py's estimate with the 13,353,718-block
Wikipedia index: 24.1 GiB per device (activations 4.8 GiB per example), 75% of the 32 GiB: the
smallest accumulation under 90% (not yet checked on a TPU). The trainer checks the slice and the
estimate at start (`target_slice`).
"""

from realm_jax.train.config import load_config


def get_config():
  return load_config("realm_wiki_base").replace(grad_accum_steps=8, target_slice="v4-32")
