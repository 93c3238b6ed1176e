"""The index refresher as a real child process (`realm-jax refresh`), started and always stopped
by the demo; it shares nothing with the trainer but the storage root."""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys


class RefresherProcess:
  """Context manager: starts `realm-jax refresh` for a storage root (it reads the trainer's config
  from its checkpoints); on exit waits for it to finish by itself (it exits on TRAINING_DONE), else
  stops it."""

  def __init__(self, storage_root: str, log_file: pathlib.Path, poll_seconds: float = 0.5):
    self.cmd = [sys.executable, "-m", "realm_jax", "refresh", "--storage", storage_root,
                "--poll-seconds", str(poll_seconds)]
    self.log_file = log_file
    self.proc: subprocess.Popen | None = None

  def __enter__(self) -> "RefresherProcess":
    self.log_file.parent.mkdir(parents=True, exist_ok=True)
    self._log = open(self.log_file, "ab")
    # Its own session: a Ctrl-C in the terminal reaches the demo, which stops the refresher itself.
    self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    return self

  @property
  def pid(self) -> int | None:
    return self.proc.pid if self.proc else None

  def alive(self) -> bool:
    return self.proc is not None and self.proc.poll() is None

  def wait_done(self, timeout_s: float) -> int | None:
    """Waits for a normal exit (after TRAINING_DONE); returns its exit code, None on timeout."""
    try:
      return self.proc.wait(timeout=timeout_s) if self.proc else None
    except subprocess.TimeoutExpired:
      return None

  def stop(self) -> None:
    """SIGINT, then SIGTERM, then SIGKILL: a publish interrupted at any point leaves the
    previous index intact (tests/test_refresh_faults.py), so stopping is always safe."""
    if not self.alive():
      return
    for sig, wait in ((signal.SIGINT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
      try:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=wait)
        return
      except subprocess.TimeoutExpired:
        continue
      except ProcessLookupError:
        return

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      if exc_type is None:
        self.wait_done(120)  # a Ctrl-C here still reaches the `finally`
    finally:
      self.stop()  # nothing to do when it has exited by itself
      self._log.close()
