"""The index refresher: re-embeds the corpus from the trainer's checkpoints and publishes indices."""
