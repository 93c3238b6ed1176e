"""Ctrl-C during training, taken between two steps instead of inside JAX.

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT arrives. During
a training step that is often inside JAX: in its garbage-collection callback (`_xla_gc_callback`,
where Python prints "Exception ignored" and drops the interrupt, so the run trains on to the end
and exits 0) or in the middle of tracing and compiling (after which the process could die with a
segfault on its way out). Inside `deferred()` the first Ctrl-C only records the request and says
so; the training loop calls `check()` before each step and stops there, cleanly (its `finally`
blocks wait for checkpoint writes and close the metrics). A second Ctrl-C exits at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Iterator

_requested = threading.Event()
_depth = 0


def _handler(signum, frame) -> None:
  if _depth == 0:
    raise KeyboardInterrupt
  if not _requested.is_set():
    _requested.set()
    logging.getLogger("realm_jax").warning("interrupted: stopping before the next step "
                                           "(press Ctrl-C again to stop at once)")
    return
  sys.stderr.write("realm-jax: interrupted again: exiting at once\n")
  sys.stderr.flush()
  os._exit(130)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Within this block (main thread only; elsewhere it does nothing) SIGINT is a request that
  `check()` turns into KeyboardInterrupt at a safe point."""
  global _depth
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.signal(signal.SIGINT, _handler)
  _depth += 1
  try:
    yield
  finally:
    _depth -= 1
    signal.signal(signal.SIGINT, previous)
    if _depth == 0:
      _requested.clear()


def check() -> None:
  """Raises KeyboardInterrupt if Ctrl-C was pressed inside `deferred()` since it began."""
  if _requested.is_set():
    raise KeyboardInterrupt


__all__ = ["check", "deferred"]
