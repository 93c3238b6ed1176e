"""`realm-jax demo`: the whole REALM loop (corpus, refresher, pre-training, Open-QA) on one CPU."""
