"""`realm-jax demo`: Run the whole REALM loop on real Wikipedia text on this machine."""

from realm_jax.cli.not_yet import register_placeholder


def register(sub):
  register_placeholder(sub, "demo", "Run the whole REALM loop on real Wikipedia text on this machine", 10)
