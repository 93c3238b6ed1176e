"""`realm-jax convert` and `realm-jax export`: checkpoint conversion in and out."""

from realm_jax.cli.not_yet import register_placeholder


def register(sub):
  register_placeholder(sub, "convert", "Convert TF/HF REALM, ORQA or BERT weights to realm-jax", 8)
  register_placeholder(sub, "export", "Export a realm-jax checkpoint to a HuggingFace directory", 8)
