"""REALM pre-training on a TPU v5e-64 slice (v5litepod-64: 64 chips = 64 JAX devices, 16 hosts,
16 GiB HBM each).

realm_wiki_base (the paper's batch 512) run as 8 micro-batches of 64, i.e. 1 example per chip per
micro-step; the optimizer batch stays 512. train/memory.py's estimate with the 13,353,718-block
Wikipedia index: 9.1 GiB per device (params 0.8, AdamW + accumulated gradients 2.4, gradients
0.8, index 0.1, block tokens 0.1, activations 4.8 GiB for 1 example), 57% of the 16 GiB; 4
micro-batches (2 per chip) would need 13.9 GiB (87%), which the estimate, not yet checked on a
TPU, leaves too little margin for. The trainer checks the slice and the estimate at start
(`target_slice`). A v5e refresher: a single-host v5litepod-8 next to it.
"""

from realm_jax.train.config import load_config


def get_config():
  return load_config("realm_wiki_base").replace(grad_accum_steps=8, target_slice="v5litepod-64")
