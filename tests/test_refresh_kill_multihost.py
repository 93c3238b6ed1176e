"""Crash test of the multi-process refresher: `realm-jax refresh` as a 2-process x 2-device JAX job
(`jax.distributed` on localhost), one of its processes SIGKILLed in each round (process 0 or 1, at
a pause point of tests/helpers/pausing_refresher.py or at a random moment), then the survivor too
(a dead host takes the job down; alone it would wait in a barrier for ever).

After every kill LATEST is absent or names a complete version and every version holding a manifest
matches it file by file (no torn version). Then a clean 2x2 run on what the killed jobs left
(staged embeddings, manifest-less and unnamed versions) publishes the checkpoint's version, and its
embeddings are those a one-process refresher publishes from the same checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import time

import numpy as np

from realm_jax import layout, publish
from realm_jax.storage import Storage
from tests.helpers.multiprocess import free_port
from tests.test_refresh_e2e import Proc, root_with_corpus

STEP = 3
# (pause point, the process that pauses (None: both), the process killed first). "random": a kill
# at a random moment after the restore starts, with process 0 paused before LATEST as a backstop,
# so that no round publishes and the clean run at the end has the version to publish.
SCHEDULE = [("embedding", None, 0), ("random", 0, 1), ("upload", 1, 1), ("before_manifest", 0, 1),
            ("random", 0, 0), ("upload", 1, 0), ("before_latest", 0, 0)]
PAUSING = "tests.helpers.pausing_refresher"


def _args(root: str) -> list[str]:
  """`realm-jax refresh` arguments; the model and corpus come from the checkpoint."""
  return ["refresh", "--storage", root, "--poll-seconds", "0.3", "--embed-batch-size", "8",
          "--max-versions", "1"]


class Job:
  """One `realm-jax refresh` started as `processes` JAX processes joined on a fresh localhost port."""

  def __init__(self, args: list[str], log_prefix, env: dict[str, str], processes: int = 2, devices: int = 2,
               module: str = "realm_jax.cli.main"):
    port = free_port()
    self.procs = []
    try:
      for k in range(processes):
        job_env = {**env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                   "JAX_NUM_PROCESSES": str(processes), "JAX_PROCESS_ID": str(k)} if processes > 1 else env
        self.procs.append(Proc(args, log_prefix.with_name(f"{log_prefix.name}-p{k}.log"), job_env,
                               devices=devices, module=module))
    except BaseException:
      self.kill()
      raise

  def text(self) -> str:
    return "".join(f"--- process {k}:\n{p.text()[-2500:]}\n" for k, p in enumerate(self.procs))

  def wait(self, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    return [p.wait(max(1.0, deadline - time.monotonic())) for p in self.procs]

  def kill(self) -> None:
    for p in self.procs:
      p.kill()


def _assert_no_torn_version(storage: Storage) -> str | None:
  """LATEST (if any) names a complete version, and so does every manifest: each file present with
  its size and CRC32C. Returns LATEST's version."""
  for v in publish.list_versions(storage, layout.INDEX):
    publish.open_version(storage, layout.INDEX, v, verify=True)
  pv = publish.open_latest(storage, layout.INDEX, verify=True)
  return None if pv is None else pv.version


def _kill_round(i: int, point: str, pauser: int | None, victim: int, root: str, tmp_path, env: dict,
                rng: random.Random) -> dict:
  storage = Storage.open(root)
  pause = "before_latest" if point == "random" else point
  pause_env = {**env, "REALM_JAX_FAULT_PAUSE": pause}
  if pauser is not None:
    pause_env["REALM_JAX_FAULT_PAUSE_PROCESS"] = str(pauser)
  job = Job(_args(root)[1:], tmp_path / f"round{i}-{point}", pause_env, module=PAUSING)
  try:
    if point == "random":  # anywhere from the restore to process 0's pause before LATEST
      job.procs[0].wait_for(rf"checkpoint step {STEP}: restoring", timeout=240)
      time.sleep(rng.uniform(0.0, 2.0))
    else:
      for k in ([0, 1] if pauser is None else [pauser]):
        job.procs[k].wait_for(f"FAULT PAUSE at {point} ", timeout=240)
    job.procs[victim].kill()
    first = _assert_no_torn_version(storage)  # the survivor may still be running
    time.sleep(0.3)
  finally:
    job.kill()  # the survivor, and everyone when the round failed
  return {"point": point, "victim": victim, "latest": [first, _assert_no_torn_version(storage)],
          "log": job.text()}


def test_a_killed_two_process_refresher_leaves_no_torn_version_and_a_rerun_publishes(corpus_seed, tmp_path):
  from realm_jax.retrieval import index as index_lib
  from realm_jax.train.config import load_config
  from tests.test_refresh_faults import _write_checkpoint

  cfg = load_config("smoke", [])
  root = root_with_corpus(corpus_seed, str(tmp_path / "multi"))
  storage = Storage.open(root)
  _write_checkpoint(root, cfg, STEP, seed=7)
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  rng = random.Random(int(time.time()))

  # 1. Kill rounds: one process (alternating) at a pause point or a random moment, then the other.
  rounds = [_kill_round(i, point, pauser, victim, root, tmp_path, env, rng)
            for i, (point, pauser, victim) in enumerate(SCHEDULE)]
  for r in rounds:  # every round stopped before LATEST: nothing was published, nothing torn
    assert r["latest"] == [None, None], r
  leftovers = publish.list_versions(storage, layout.INDEX, complete_only=False)
  assert leftovers, "no round got as far as uploading"  # half versions (and an unnamed complete one) remain
  assert storage.listdir(layout.INDEX_WORK), "no staged embeddings left to resume"

  # 2. A clean 2x2 run on what the killed jobs left resumes the staged embeddings and publishes.
  final = Job(_args(root), tmp_path / "final", env)
  try:
    assert final.wait(timeout=300) == [0, 0], final.text()
  finally:
    final.kill()
  logs = [p.text() for p in final.procs]
  assert "Traceback" not in "".join(logs), final.text()
  version = re.search(rf"published index (\S+): \d+ blocks x \d+ from checkpoint step {STEP};", logs[0]).group(1)
  for log in logs:  # each process embedded nothing: the killed rounds had staged all its shards
    assert "(2 shards were already staged)" in log, log[-3000:]
  assert _assert_no_torn_version(storage) == version
  assert publish.version_key(version)[0] == STEP
  assert not [n for n in storage.listdir(layout.INDEX_WORK) if n.startswith(f"{STEP:012d}-")]  # staging cleaned
  multi = index_lib.load_index(storage)
  assert len(multi.info.scann_parts) == 2

  # 3. The same checkpoint through a one-process refresher on 4 devices.
  single_root = root_with_corpus(corpus_seed, str(tmp_path / "single"))
  _write_checkpoint(single_root, cfg, STEP, seed=7)
  single_job = Job(_args(single_root), tmp_path / "single", env, processes=1, devices=4)
  try:
    assert single_job.wait(timeout=300) == [0], single_job.text()
  finally:
    single_job.kill()
  single = index_lib.load_index(Storage.open(single_root))
  # The same jitted tower on the same rows from the same checkpoint; only the device batch split
  # differs (2 devices in each of 2 processes vs 4 in one), which XLA:CPU computes row by row, so
  # the two agree to float32 rounding (~1e-7 on unit-scale values): 1e-6 leaves room for that only.
  np.testing.assert_allclose(multi.embeddings, single.embeddings, rtol=0, atol=1e-6)
  kills = ", ".join(f"{r['point']} (process {r['victim']} first)" for r in rounds)
  print(f"kills: {kills}; "
        f"leftover versions before the rerun: {leftovers}; published {version}")
