"""`realm-jax finetune`: Open-QA fine-tuning on a frozen index."""

from realm_jax.cli.not_yet import register_placeholder


def register(sub):
  register_placeholder(sub, "finetune", "Open-QA fine-tuning on a frozen index", 7)
