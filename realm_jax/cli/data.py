"""`realm-jax data`: Fetch offline data and extract Open-QA question sets."""

from realm_jax.cli.not_yet import register_placeholder


def register(sub):
  register_placeholder(sub, "data", "Fetch offline data and extract Open-QA question sets", 3)
