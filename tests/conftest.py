"""Test-session setup: 8 emulated CPU devices (set before JAX is imported) and shared fixtures."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Triton (the GPU compiler that CUDA builds of torch install) segfaults while loading its LLVM in a
# process that has loaded TensorFlow's (`import tensorflow; import triton` crashes on its own).
# Collection imports TensorFlow (test_convert_tf, test_convert_index) into every worker, and
# `transformers` pulls in `torch._dynamo`, which imports triton if it is installed. The CPU oracle
# tests never need it, so it stays unimportable here.
sys.modules.setdefault("triton", None)
# One persistent XLA compilation cache for the whole session (the pytest workers and every process a
# test starts inherit it): dozens of tests start `realm-jax` processes that compile the same smoke
# programs, and a hit takes the first step's ~15 s of compilation to ~6 s. Programs that compile in
# under a second are cached too (JAX's default skips them): a process compiles dozens of those, and
# caching them took a trainer-plus-refresher test from 35 s to 31 s once the cache was warm. A test
# that needs its own cache sets the variable for its processes. Removed when the process that made
# it exits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile

  _xla_cache = tempfile.mkdtemp(prefix="realm-jax-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
from tests.fixtures.corpora import *  # noqa: E402,F401,F403  (corpus_root, corpus_seed)
from tests.fixtures.gcs import *  # noqa: E402,F401,F403  (gcs_server, storage_root, shared_storage_root)

# The slowest tests (one to five minutes each on 2 cores), longest first, run before all others:
# with `-n 2`, one of them started last keeps one worker busy minutes after the other has run out.
SLOWEST_FIRST = (
    "test_realm_learning.py::", "test_openqa_retrieval_learning.py::", "test_pod_rehearsal.py::",
    "test_multihost.py::test_four_processes", "test_refresh_faults.py::test_refresher_kills",
    "test_demo.py::test_demo_quick", "test_openqa_learning.py::", "test_chaos.py::", "test_stage_chain.py::",
    "test_refresh_kill_multihost.py::", "test_multihost.py::test_each_process", "test_one_line_errors.py::test_ctrl_c",
)


def _rank(nodeid: str) -> int:
  return next((i for i, s in enumerate(SLOWEST_FIRST) if s in nodeid), len(SLOWEST_FIRST))


def pytest_collection_modifyitems(config, items):
  items.sort(key=lambda item: _rank(item.nodeid))  # stable: otherwise in file order
