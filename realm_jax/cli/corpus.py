"""`realm-jax corpus`: Build a block corpus from JSONL, text or a MediaWiki dump."""

from realm_jax.cli.not_yet import register_placeholder


def register(sub):
  register_placeholder(sub, "corpus", "Build a block corpus from JSONL, text or a MediaWiki dump", 3)
