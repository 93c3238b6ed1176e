"""The malloc settings of `realm_jax.host_memory`, observed through the kernel's page-fault counter.

A thread of a child process frees a 256 MB block (glibc's `malloc`, as XLA:CPU's buffers) and
allocates, and writes, one of the same size again: with glibc's defaults the second block is a
fresh `mmap` and faults in every page (65,536 of 4 KB); with the settings, set in-process or
through `GLIBC_TUNABLES`, it reuses the freed heap and faults in almost none. Without the one-arena
setting the thread's own arena maps the block afresh: the test fails."""

import json
import os
import subprocess
import sys

import pytest

from realm_jax import host_memory

PAGES = 256 * 2**20 // 4096

CHILD = """
import ctypes, json, resource, sys, threading
from realm_jax import host_memory
applied = host_memory.keep_freed_memory() if sys.argv[1] == "in-process" else None
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
n, faults = 256 * 2**20, []

def twice():  # in a thread of its own, as XLA's worker threads allocate
  p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(n); ctypes.memset(p, 1, n)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  libc.free(p)

t = threading.Thread(target=twice); t.start(); t.join()
print(json.dumps({"applied": applied, "faults": faults[0]}))
"""


def _faults(how: str, env: dict[str, str]) -> dict:
  out = subprocess.run([sys.executable, "-c", CHILD, how], env=env, capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def cpu_env():
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "REALM_JAX_MALLOC")}
  env["JAX_PLATFORMS"] = "cpu"
  return env


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is a Linux matter")
def test_freed_memory_is_reused_instead_of_faulted_in_again(cpu_env):
  default = _faults("none", cpu_env)
  assert default["faults"] >= 0.9 * PAGES, default  # glibc's default: a fresh mmap, every page
  kept = _faults("in-process", cpu_env)
  assert kept["applied"] is True and kept["faults"] <= 0.05 * PAGES, kept
  child = _faults("none", host_memory.child_environment(cpu_env))
  assert child["faults"] <= 0.05 * PAGES, child
  opted_out = _faults("in-process", {**cpu_env, "REALM_JAX_MALLOC": "system"})
  assert opted_out["applied"] is False and opted_out["faults"] >= 0.9 * PAGES, opted_out


def test_left_alone_on_accelerator_hosts_and_when_opted_out():
  assert host_memory.wanted({"JAX_PLATFORMS": "cpu"}) == sys.platform.startswith("linux")
  assert not host_memory.wanted({"JAX_PLATFORMS": "tpu"})
  assert not host_memory.wanted({"JAX_PLATFORMS": "cuda,cpu"})
  assert not host_memory.wanted({"JAX_PLATFORMS": "cpu", "REALM_JAX_MALLOC": "system"})
  env = host_memory.child_environment({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.rtld.nns=4"})
  if sys.platform.startswith("linux"):
    assert env["GLIBC_TUNABLES"] == "glibc.rtld.nns=4:" + host_memory.TUNABLES
  assert "GLIBC_TUNABLES" not in host_memory.child_environment({"JAX_PLATFORMS": "tpu"})
