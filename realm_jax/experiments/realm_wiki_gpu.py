"""REALM pre-training on Wikipedia on one 8-GPU node (H100 / A100 80GB, `pip install 'realm-jax[cuda]'`).

realm_wiki_base with the paper's batch of 512 kept as the optimizer batch, run as 16 micro-batches
of 32 (4 examples per GPU): the estimator (realm_jax/train/memory.py, tpu/README.md) puts 4 per
GPU at ~42 GB with bfloat16 compute, 8 per GPU at ~76 GB (too close to 80 GB) and the whole batch
(64 per GPU) at ~540 GB: our model code does not rematerialise. Exact top-k (lax.approx_max_k is
a TPU kernel). The trainer refreshes the index itself every 500 steps on all 8 GPUs ("sync"): on
one node this costs no more than splitting the GPUs between a trainer and a refresher (512 does
not divide over 7 trainer GPUs; see tpu/README.md, GPUs).
"""

from realm_jax.train.config import load_config


def get_config():
  return load_config("realm_wiki_base").replace(
      grad_accum_steps=16,  # micro-batch 32 = 4 per GPU; the optimizer batch stays 512
      approx_top_k=False,
      index_refresh="sync",
      sync_refresh_every=500,
  )
