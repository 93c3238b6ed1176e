"""Experiment configs: each file defines `get_config() -> realm_jax.train.config.TrainConfig`."""
