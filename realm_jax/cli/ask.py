"""`realm-jax ask`: Answer a question with a fine-tuned model."""

from realm_jax.cli.not_yet import register_placeholder


def register(sub):
  register_placeholder(sub, "ask", "Answer a question with a fine-tuned model", 7)
