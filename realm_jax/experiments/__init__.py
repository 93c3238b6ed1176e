"""The named experiment configs, installed with realm-jax (`--config smoke` is smoke.py here).

Each file defines `get_config()` returning a `TrainConfig` (pre-training, ICT) or an
`openqa.config.FinetuneConfig` (the `openqa_*` files); `train.config.load_experiment` finds them
by name from a checkout, an editable install or a wheel.
"""
