"""REALM pre-training on a TPU v5e-64 slice (v5litepod-64: 64 chips = 64 JAX devices, 16 hosts,
16 GiB HBM each).

realm_wiki_base (the paper's batch 512) run as 4 micro-batches of 128, i.e. 2 examples per chip
per micro-step; the optimizer batch stays 512. train/memory.py's estimate with the
13,353,718-block Wikipedia index: 13.9 GiB per device (activations 4.8 GiB per example), 87% of
the 16 GiB (the smallest accumulation under 90%; not yet checked on a TPU). The trainer checks
the slice and the estimate at start (`target_slice`). A v5e refresher: a single-host v5litepod-8 next to it.
"""

from realm_jax.train.config import load_config


def get_config():
  return load_config("realm_wiki_base").replace(grad_accum_steps=4, target_slice="v5litepod-64")
