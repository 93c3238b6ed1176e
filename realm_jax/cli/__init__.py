"""The `realm-jax` command line: one module per sub-command, registered in `main.py`."""
