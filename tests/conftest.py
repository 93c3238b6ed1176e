"""Test-session setup: 8 emulated CPU devices (set before JAX is imported) and shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from tests.fixtures.corpora import *  # noqa: E402,F401,F403  (corpus_root, corpus_seed)
from tests.fixtures.gcs import *  # noqa: E402,F401,F403  (gcs_server, storage_root, shared_storage_root)
