"""`realm-jax refresh`: Run the index refresher next to a trainer."""

from realm_jax.cli.not_yet import register_placeholder


def register(sub):
  register_placeholder(sub, "refresh", "Run the index refresher next to a trainer", 6)
