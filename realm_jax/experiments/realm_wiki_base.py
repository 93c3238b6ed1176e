"""REALM pre-training on Wikipedia, the paper's settings (Guu et al. 2020, §4 and App. A).

BERT-base towers (shared query/document embedder), batch 512, lr 3e-5, 200k steps, 8 candidates
(null + 7), salient-span masking; the index is refreshed by a separate refresher job about every
500 steps (checkpoint_every), and the trainer swaps it in asynchronously.

Starting weights, as in the paper: the knowledge-augmented encoder from BERT-base (`init`: weights
converted with `realm-jax convert hf --kind bert`), the retriever from the ICT warm start
(`init_retriever`: the ICT run's storage root, whose newest checkpoint's retriever is loaded).
The whole batch in one step does not fit any accelerator: the slice configs (realm_v4_32,
realm_v5e_64, realm_wiki_gpu) run it as gradient-accumulation micro-batches.
"""

from realm_jax.config import get_preset
from realm_jax.train.config import TrainConfig


def get_config() -> TrainConfig:
  return TrainConfig(
      model=get_preset("base", **{"bert.dtype": "bfloat16"}),
      task="realm",
      corpus_prefix="corpus",
      masking="salient",
      batch_size=512,
      learning_rate=3e-5,
      num_train_steps=200_000,
      retrieval="device",
      approx_top_k=True,  # lax.approx_max_k on TPU
      index_refresh="async",
      index_poll_seconds=30.0,
      checkpoint_every=500,
      keep_checkpoints=3,
      log_every=100,
      init="required:BERT-base weights for the encoder (realm-jax convert hf --kind bert ... --out URI)",
      init_retriever="required:the ICT run's storage root (its newest checkpoint's retriever)",
  )
