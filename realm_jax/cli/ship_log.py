"""`realm-jax ship-log`: copy a job's growing log file to the storage root, every N seconds.

`tpu/launch.py` starts one next to each job on each worker, so that a worker's log survives the
worker (a preempted TPU VM loses its disk): at most one period of lines is lost. The object on
storage (`logs/<job>/worker-<W>.log`) keeps every launch's lines: the copy found there when a
shipper starts (an earlier launch, on this VM or a preempted one) is kept in front, and each
launch begins with a header line. It stops after a last copy once `--until` exists (the job's exit
file) or on SIGTERM / SIGINT (`launch.py stop`).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import socket
import time


def register(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("ship-log", help="Copy a growing log file to storage periodically (used by tpu/launch.py)",
                     description="Copy a log file to <storage>/<path> every --every seconds until --until "
                     "exists or a SIGTERM arrives; earlier launches' lines already there are kept in front.")
  p.add_argument("log", help="the local log file (it may not exist yet)")
  p.add_argument("--storage", required=True, help="storage root URI (gs://bucket/run or a path)")
  p.add_argument("--to", required=True, metavar="PATH", help="path under the root, e.g. logs/pretrain/worker-0.log")
  p.add_argument("--every", type=float, default=60.0, help="seconds between copies (default 60)")
  p.add_argument("--until", default=None, metavar="FILE", help="stop after a last copy once this file exists")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  import logging

  from realm_jax.errors import ConfigError
  from realm_jax.storage import Storage, StorageError

  if args.every <= 0:
    raise ConfigError(f"--every must be > 0, got {args.every}")
  storage = Storage.open(args.storage)
  log = logging.getLogger("realm_jax.ship_log")
  try:
    earlier = storage.read_bytes(args.to) if storage.exists(args.to) else b""
  except StorageError as e:
    log.warning("cannot read %s (%s): starting it afresh", storage.uri(args.to), e)
    earlier = b""
  header = (f"--- {args.log} on {socket.gethostname()}, launched "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC ---\n").encode()
  stop = []
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: stop.append(signum))
  path, last = pathlib.Path(args.log), None

  def copy() -> None:
    nonlocal last
    try:
      data = path.read_bytes() if path.exists() else b""
      if data == last:
        return
      storage.write_bytes(args.to, earlier + header + data)
      last = data
    except (OSError, StorageError) as e:  # a flaky upload: try again at the next period
      log.warning("copying %s to %s failed: %s", path, storage.uri(args.to), e)

  next_copy = 0.0
  while True:
    finished = bool(stop) or (args.until is not None and os.path.exists(args.until))
    if finished or time.monotonic() >= next_copy:
      copy()
      next_copy = time.monotonic() + args.every
    if finished:
      return 0
    time.sleep(min(1.0, args.every))
