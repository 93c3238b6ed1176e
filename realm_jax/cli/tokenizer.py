"""`realm-jax tokenizer`: Train or inspect tokenizers."""

from realm_jax.cli.not_yet import register_placeholder


def register(sub):
  register_placeholder(sub, "tokenizer", "Train or inspect tokenizers", 3)
