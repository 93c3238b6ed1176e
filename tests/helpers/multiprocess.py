"""Run one Python script as N real JAX processes joined by `jax.distributed` on localhost."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(script: str, num_processes: int, devices_per_process: int, timeout: float = 600,
                  extra_env: dict | None = None) -> list[str]:
  """Starts every process, waits for all, returns their stdout; kills them all on any failure.
  Their output goes to files, not pipes: a process whose pipe nobody drains yet (the others are
  waited for one by one) would block on a full pipe and hang the rest at their next barrier."""
  port = free_port()
  procs, files = [], []
  try:
    for pid in range(num_processes):
      env = {**os.environ, **(extra_env or {}), "JAX_PLATFORMS": "cpu",
             "JAX_NUM_CPU_DEVICES": str(devices_per_process),
             "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(num_processes),
             "JAX_PROCESS_ID": str(pid)}
      out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
      files += [out, err]
      procs.append((subprocess.Popen([sys.executable, "-c", script], env=env, stdout=out, stderr=err, text=True),
                    out, err))
    deadline = time.monotonic() + timeout
    for p, _, _ in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
    results = []
    for _, out, err in procs:
      out.seek(0)
      err.seek(0)
      results.append((out.read(), err.read()))
    failed = [(pid, p.returncode, err) for pid, ((p, _, _), (_, err)) in enumerate(zip(procs, results))
              if p.returncode != 0]
    if failed:
      # The first process to fail is usually the cause; the others die waiting for it.
      report = "\n".join(f"--- process {pid} exited {rc}:\n{err[-2500:]}" for pid, rc, err in failed)
      raise AssertionError(f"{len(failed)} of {len(procs)} processes failed\n{report}")
    return [out for out, _ in results]
  finally:
    for p, _, _ in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for f in files:
      f.close()
