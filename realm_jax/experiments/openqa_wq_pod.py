"""The pod variant of openqa_wq.py: 64 questions per step for the same 20 epochs at lr 1e-5
(`openqa.config.orqa_pod_config` says why)."""

from realm_jax.openqa.config import FinetuneConfig, orqa_pod_config


def get_config() -> FinetuneConfig:
  return orqa_pod_config("openqa_wq", "wq")
