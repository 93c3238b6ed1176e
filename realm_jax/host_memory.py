"""glibc malloc settings for a CPU host: keep the memory XLA:CPU frees, instead of unmapping it.

XLA:CPU allocates an executable's temporaries on every call and frees them when it returns; for a
training step they are gigabytes. glibc's malloc serves every block above 32 MB with a fresh
`mmap` and unmaps it on `free`, so each step faults in, and the kernel zeroes, every page of its
temporaries again. On the MiniLM REALM step (2 queries x 8 candidates, 2 cores) that was 1.6
million page faults and 3.9 s of kernel time per 11.3 s step; with the settings below, 40
thousand and 0.14 s, and the step took 8.9 s (`python benchmarks/train_step.py --malloc ...`
compares both).

The settings: no `mmap` for large blocks (`M_MMAP_MAX` 0), never return the heap's top to the
system (`M_TRIM_THRESHOLD` -1), and one arena (`M_ARENA_MAX` 1; a thread's own arena would still
`mmap` a block larger than its 64 MB heap). The cost: the process keeps its peak heap until it
exits, and its threads share one arena's lock. `keep_freed_memory` applies them in-process and
must run before any thread is started (the arena limit is fixed when the first thread allocates),
so the `realm-jax` command calls it first thing; `TUNABLES` is the same as the `GLIBC_TUNABLES`
environment variable, for a child process (read when it starts).

They are left alone where they would not help or are unwanted: on a host with an accelerator
(TPU or GPU device files, or `JAX_PLATFORMS` naming another platform: XLA's temporaries then live
in device memory), without glibc, or when `REALM_JAX_MALLOC=system`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=18446744073709551615"
_ACCELERATOR_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")


def wanted(environ=None) -> bool:
  """Whether this host should keep freed memory: Linux, XLA's backend the CPU, not opted out."""
  environ = os.environ if environ is None else environ
  if not sys.platform.startswith("linux") or environ.get("REALM_JAX_MALLOC", "").lower() == "system":
    return False
  platforms = environ.get("JAX_PLATFORMS", "").lower()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES)


def keep_freed_memory(environ=None) -> bool:
  """Applies the settings to this process if `wanted`; True if glibc accepted all three."""
  if not wanted(environ):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (musl, another libc): nothing to set
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


def child_environment(environ=None) -> dict[str, str]:
  """A copy of `environ` whose child process starts with the settings (`GLIBC_TUNABLES`), if
  `wanted`; other tunables already there are kept."""
  env = dict(os.environ if environ is None else environ)
  if wanted(env):
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), TUNABLES) if t)
  return env
