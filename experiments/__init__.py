"""Experiment configs: each file defines `get_config()` returning a `TrainConfig` (pre-training,
ICT) or an `openqa.config.FinetuneConfig` (the `openqa_*` files)."""
