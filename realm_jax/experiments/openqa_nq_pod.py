"""The pod variant of openqa_nq.py: 64 questions per step (split over the mesh's data axis), the
same 20 epochs in 1/64 of the steps and of the warmup, the rate x sqrt(64) = 8 (8e-5); see
docs/OPENQA.md for how it compares with ORQA's one question per step."""

from realm_jax.openqa.config import ORQA_TRAIN_QUESTIONS, FinetuneConfig, load_finetune_config, orqa_schedule

BATCH = 64


def get_config() -> FinetuneConfig:
  return load_finetune_config("openqa_nq").replace(
      **orqa_schedule(ORQA_TRAIN_QUESTIONS["nq"], batch_size=BATCH, lr_scaling="sqrt"), log_every=10,
      checkpoint_every=250)
