"""Run one Python script as N real JAX processes joined by `jax.distributed` on localhost."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(script: str, num_processes: int, devices_per_process: int, timeout: float = 600,
                  extra_env: dict | None = None) -> list[str]:
  """Starts every process, waits for all, returns their stdout; kills them all on any failure."""
  port = free_port()
  procs = []
  try:
    for pid in range(num_processes):
      env = {**os.environ, **(extra_env or {}), "JAX_PLATFORMS": "cpu",
             "JAX_NUM_CPU_DEVICES": str(devices_per_process),
             "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(num_processes),
             "JAX_PROCESS_ID": str(pid)}
      procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=timeout) for p in procs]
    failed = [(pid, p.returncode, err) for pid, (p, (_, err)) in enumerate(zip(procs, results)) if p.returncode != 0]
    if failed:
      # The first process to fail is usually the cause; the others die waiting for it.
      report = "\n".join(f"--- process {pid} exited {rc}:\n{err[-2500:]}" for pid, rc, err in failed)
      raise AssertionError(f"{len(failed)} of {len(procs)} processes failed\n{report}")
    return [out for out, _ in results]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
