"""REALM pre-training on a TPU v4-32 slice (16 chips = 16 JAX devices, 4 hosts, 32 GiB HBM each).

realm_wiki_base (the paper's batch 512, BERT-base towers, bfloat16 compute, approximate top-k on
TPU) run as 16 micro-batches of 32, i.e. 2 examples per chip per micro-step; the optimizer batch
stays 512. train/memory.py's estimate with the 13,353,718-block Wikipedia index: 21.8 GiB per
device (params 0.8, AdamW + accumulated gradients 2.4, gradients 0.8, index 0.4, block tokens
1.8, activations 15.5 GiB for 2 examples), 68% of the 32 GiB; 8 micro-batches (4 per chip) would
need 37.3 GiB and the whole batch in one step 253.9 GiB. The trainer checks both numbers at start
(`target_slice`). The refresher runs on its own single-host slice (v4-8), next to the trainer.
"""

from realm_jax.train.config import load_config


def get_config():
  return load_config("realm_wiki_base").replace(grad_accum_steps=16, target_slice="v4-32")
