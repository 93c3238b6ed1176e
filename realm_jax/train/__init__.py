"""The REALM trainer (pre-training, ICT) over a jax mesh: config, optimizer, steps and loop."""
