"""The pod variant of openqa_wq.py: 64 questions per step (split over the mesh's data axis), the
same 20 epochs in 1/64 of the steps and of the warmup, at ORQA's rate 1e-5 (not scaled up: on the
small task of benchmarks/openqa_schedule.py the unscaled rate matched one question per step, and
larger rates lost held-out retrieval; docs/OPENQA.md)."""

from realm_jax.openqa.config import ORQA_TRAIN_QUESTIONS, FinetuneConfig, load_finetune_config, orqa_schedule

BATCH = 64


def get_config() -> FinetuneConfig:
  return load_finetune_config("openqa_wq").replace(
      **orqa_schedule(ORQA_TRAIN_QUESTIONS["wq"], batch_size=BATCH, lr_scaling="none"), log_every=10,
      checkpoint_every=250)
