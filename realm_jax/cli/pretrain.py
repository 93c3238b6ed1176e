"""`realm-jax pretrain` and `realm-jax ict`: REALM pre-training and the ICT warm start."""

from realm_jax.cli.not_yet import register_placeholder


def register(sub):
  register_placeholder(sub, "pretrain", "REALM pre-training with retrieval inside the step", 5)
  register_placeholder(sub, "ict", "Inverse Cloze Task warm start of the retriever", 5)
