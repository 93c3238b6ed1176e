"""One logging path: every library line goes to a stdlib `logging` logger under `realm_jax`.

Library code never prints: it logs, and the CLI (`configure`, `--log-level`) decides what reaches
the terminal, with timestamps. `RunLog` is what the long-running roles (trainer, fine-tuner,
refresher) log through: their logger, plus an optional listener that also receives each line (the
demo's console UI, or a test reading the lines back).
"""

from __future__ import annotations

import logging
import sys
from typing import Callable

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
LEVELS = ("debug", "info", "warning", "error")
# Loggers of libraries we call whose INFO/WARNING lines are notes to their own developers (orbax
# through absl: "read-only manager", "no checkpoint found"), shown only at --log-level debug.
QUIET_LIBRARIES = ("absl", "orbax", "jax._src.xla_bridge")
# Loggers whose error records carry a library's traceback: cut to one line unless at debug
# (asyncio: "Task exception was never retrieved" for each of orbax's writes a refused save left).
ONE_LINE_LIBRARIES = (*QUIET_LIBRARIES, "asyncio")


class _OneLine(logging.Filter):
  """A library's error record as one line: no traceback, at most 300 characters. Orbax logs every
  failure of its background threads with the whole traceback (a full disk during a checkpoint: a
  hundred of them); the same failure reaches the command as one error line naming the path."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info or record.exc_text or record.stack_info:
      record.exc_info, record.exc_text, record.stack_info = None, None, None
    message = record.getMessage().splitlines()
    text = message[0] if message else ""
    record.msg, record.args = (text[:300] + " ..." if len(text) > 300 or len(message) > 1 else text), None
    return True


_ONE_LINE = _OneLine()


def _unraisable(unraisable) -> None:
  """sys.unraisablehook: drops the "Event loop is closed" RuntimeErrors that tensorstore's
  completion callbacks raise when orbax has already given up on a failed write (a full disk: about
  two hundred tracebacks, each a duplicate of the failure the command reports in one line);
  everything else goes to Python's default hook."""
  exc = unraisable.exc_value
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    logging.getLogger("realm_jax").debug("dropped a late callback of a failed asynchronous write: %s", exc)
    return
  sys.__unraisablehook__(unraisable)


def configure(level: str = "info") -> None:
  """Timestamped lines on stderr: realm_jax's at `level`, other libraries' warnings and up (their
  notes only at `debug`, and their errors in one line each unless at `debug`). Called once by the
  CLI; library code never calls it."""
  numeric = getattr(logging, level.upper())
  logging.basicConfig(level=logging.WARNING, format=FORMAT, datefmt=DATE_FORMAT)
  logging.getLogger("realm_jax").setLevel(numeric)
  for name in QUIET_LIBRARIES:
    logging.getLogger(name).setLevel(logging.DEBUG if numeric <= logging.DEBUG else logging.ERROR)
  for name in ONE_LINE_LIBRARIES:
    logger = logging.getLogger(name)
    logger.removeFilter(_ONE_LINE)
    if numeric > logging.DEBUG:
      logger.addFilter(_ONE_LINE)
  sys.unraisablehook = _unraisable if numeric > logging.DEBUG else sys.__unraisablehook__


class RunLog:
  """Logs a role's lines to `logging.getLogger(name)`; `listener(line)` also gets each one.

  With `chief=False` (processes other than 0 of a multi-host job) INFO lines are dropped, so one
  log tells the run's story; warnings are kept on every process."""

  def __init__(self, name: str, listener: Callable[[str], None] | None = None, chief: bool = True):
    self.logger = logging.getLogger(name)
    self.listener, self.chief = listener, chief

  def __call__(self, message: str, level: int = logging.INFO) -> None:
    self._emit(message, level)

  def warning(self, message: str) -> None:
    self._emit(message, logging.WARNING)

  def _emit(self, message: str, level: int) -> None:
    if level < logging.WARNING and not self.chief:
      return
    self.logger.log(level, "%s", message, stacklevel=3)  # the line that called the RunLog
    if self.listener is not None:
      self.listener(message)
