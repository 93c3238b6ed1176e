"""`realm-jax evaluate`: Evaluate exact match and recall@k."""

from realm_jax.cli.not_yet import register_placeholder


def register(sub):
  register_placeholder(sub, "evaluate", "Evaluate exact match and recall@k", 7)
