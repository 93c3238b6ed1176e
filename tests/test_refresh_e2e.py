"""Trainer and refresher as two real OS processes sharing one storage root (a local directory, and
a bucket on a real fake-gcs-server): the trainer hot-swaps indices the refresher built from the
trainer's own checkpoints, finishes, and the refresher exits on TRAINING_DONE.

The helpers here (`Proc`, `root_with_corpus`, the log parsers) are shared with test_refresh_faults.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from realm_jax import publish
from realm_jax.storage import Storage

REPO = pathlib.Path(__file__).resolve().parents[1]
# A short CPU run: checkpoints every 3 steps, all kept, so every index can be traced to one; an
# index more than 4 steps stale makes the trainer wait for a fresher one, so at least two swaps
# happen however busy the machine is.
EVERY = 3
TRAIN_SET = ["num_train_steps=12", f"checkpoint_every={EVERY}", "max_index_staleness=4",
             "index_poll_seconds=0.5", "batch_size=8", "log_every=1", "keep_checkpoints=100",
             "keep_index_versions=100"]
SWAP_RE = re.compile(r"swapped index (\S+) -> (\S+) at step (\d+) \(staleness (-?\d+)\)")
REFUSED_RE = re.compile(r"refused index version (\S+)")
PUBLISHED_RE = re.compile(r"published index (\S+): \d+ blocks x \d+ from checkpoint step (\d+)")


# ------------------------------------------------------------------------------------------------
# Helpers (also used by test_refresh_faults.py)
# ------------------------------------------------------------------------------------------------

class Proc:
  """A `python -m realm_jax.cli.main ...` child (or another `module`) with its output in a log file
  (never a pipe)."""

  def __init__(self, args: list[str], log_path: pathlib.Path, env: dict[str, str], devices: int = 1,
               module: str = "realm_jax.cli.main"):
    self.log_path = log_path
    env = {**env, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices),
           "PYTHONUNBUFFERED": "1"}
    self._log = open(log_path, "ab")
    self.popen = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO,
                                  env=env, stdout=self._log, stderr=subprocess.STDOUT)

  def text(self) -> str:
    return self.log_path.read_text(errors="replace")

  def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
    """Waits until `pattern` appears in the log (after character `start`); fails if the process
    exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
      m = re.compile(pattern).search(self.text(), start)
      if m:
        return m
      if self.popen.poll() is not None:
        m = re.compile(pattern).search(self.text(), start)
        if m:
          return m
        pytest.fail(f"{self.log_path.name} exited ({self.popen.returncode}) before {pattern!r}:\n"
                    f"{self.text()[-3000:]}")
      if time.monotonic() > deadline:
        pytest.fail(f"no {pattern!r} in {self.log_path.name} after {timeout:.0f}s:\n{self.text()[-3000:]}")
      time.sleep(0.1)

  def wait(self, timeout: float) -> int:
    try:
      return self.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      pytest.fail(f"{self.log_path.name} still running after {timeout:.0f}s:\n{self.text()[-3000:]}")

  def kill(self) -> None:
    """SIGKILL (no cleanup of any kind in the child), then reap it."""
    if self.popen.poll() is None:
      self.popen.send_signal(signal.SIGKILL)
    self.popen.wait(timeout=30)
    self._log.close()


def trainer_args(root: str, *extra: str, overrides: list[str] = TRAIN_SET) -> list[str]:
  return ["pretrain", "--storage", root, "--config", "smoke", "--set", *overrides, *extra]


def refresher_args(root: str, *extra: str, overrides: list[str] = TRAIN_SET) -> list[str]:
  return ["refresh", "--storage", root, "--config", "smoke", "--set", *overrides,
          "--poll-seconds", "0.3", "--embed-batch-size", "8", *extra]


def root_with_corpus(seed: Storage, uri: str) -> str:
  """`uri` as a fresh storage root holding a copy of the corpus."""
  dst = Storage.open(uri)
  for path in seed.list("corpus"):
    dst.write_bytes(path, seed.read_bytes(path))
  return uri


def swaps(trainer_log: str) -> list[tuple[str, str, int, int]]:
  """(old version, new version, step, staleness) of every hot swap the trainer logged."""
  return [(a, b, int(s), int(k)) for a, b, s, k in SWAP_RE.findall(trainer_log)]


def checkpoint_steps(storage: Storage) -> set[int]:
  return {int(n) for n in storage.listdir("checkpoints") if n.isdigit()}


def check_staleness_metric(storage: Storage, swapped: list[tuple[str, str, int, int]]) -> list[dict]:
  """metrics/realm.jsonl and the TensorBoard events carry index_staleness >= 0, equal to
  step - (checkpoint step of the index in use), dropping at every swap."""
  rows = [json.loads(line) for line in storage.read_bytes("metrics/realm.jsonl").decode().splitlines() if line]
  stale = {r["step"]: r["index_staleness"] for r in rows}
  assert sorted(stale) == list(range(1, max(stale) + 1))
  assert all(v >= 0 for v in stale.values()), stale
  for _, new, step, k in swapped:  # the step after the swap runs on the new index
    index_step = publish.version_key(new)[0]
    assert stale[step + 1] == step + 1 - index_step == k + 1, (step, stale)
    assert stale[step + 1] < stale[step], (step, stale)
  # TensorBoard: read the event files back with TensorBoard's own reader.
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  with tempfile.TemporaryDirectory() as tmp:
    for path in storage.list("metrics/tb-realm"):
      storage.get_file(path, pathlib.Path(tmp) / pathlib.Path(path).name)
    acc = EventAccumulator(tmp)
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("realm/index_staleness")}
  assert tb == pytest.approx(stale)  # TensorBoard stores float32: staleness counts round-trip within approx's 1e-6
  return rows


# ------------------------------------------------------------------------------------------------
# The end-to-end run
# ------------------------------------------------------------------------------------------------

def _run_trainer_and_refresher(root: str, tmp_path: pathlib.Path, env: dict[str, str]):
  trainer = Proc(trainer_args(root), tmp_path / "trainer.log", env, devices=1)
  refresher = Proc(refresher_args(root), tmp_path / "refresher.log", env, devices=2)
  try:
    assert trainer.wait(timeout=240) == 0, trainer.text()[-3000:]
    assert refresher.wait(timeout=60) == 0, refresher.text()[-3000:]
  finally:
    trainer.kill()
    refresher.kill()
  return trainer.text(), refresher.text()


def _check_run(root: str, trainer_log: str, refresher_log: str) -> None:
  storage = Storage.open(root)
  assert "TRAINING_DONE found" in refresher_log, refresher_log[-3000:]
  assert storage.exists("TRAINING_DONE")
  assert not REFUSED_RE.search(trainer_log), trainer_log
  published = {v: int(s) for v, s in PUBLISHED_RE.findall(refresher_log)}
  swapped = swaps(trainer_log)
  assert len(swapped) >= 2, trainer_log[-3000:]
  written = checkpoint_steps(storage)
  for old, new, step, _ in swapped:
    assert new in published, (new, published)  # built by the refresher ...
    info = publish.open_version(storage, "index", new, verify=True).metadata
    assert info["step"] == published[new] in written  # ... from a checkpoint the trainer wrote
    assert 0 < info["step"] <= step and info["step"] % EVERY == 0
    assert publish.version_key(old) < publish.version_key(new)
  check_staleness_metric(storage, swapped)
  _check_embeddings_against_checkpoint(storage, swapped[-1][1])


def _check_embeddings_against_checkpoint(storage: Storage, version: str) -> None:
  """Outside oracle: the version's embeddings equal the document tower of its checkpoint applied
  here, in this process, directly (no EmbedFn, no mesh, no staging)."""
  import jax
  from flax import nnx

  from realm_jax.data.corpus import CorpusReader
  from realm_jax.data.features import blocks_doc_inputs
  from realm_jax.models import RealmModel
  from realm_jax.retrieval import index as index_lib
  from realm_jax.train.checkpoints import Checkpoints
  from realm_jax.train.config import load_config

  cfg = load_config("smoke", TRAIN_SET)
  loaded = index_lib.load_index(storage, version)
  model = RealmModel(cfg.model, rngs=nnx.Rngs(123))  # different init: the restore must overwrite
  ckpt = Checkpoints(storage.uri("checkpoints"), read_only=True)
  ckpt.restore_part(loaded.info.step, model, "retriever")
  model.eval()
  corpus = CorpusReader(storage, cfg.corpus_prefix)
  want = []
  for i in range(corpus.num_shards):
    feats = blocks_doc_inputs(corpus.read_shard(i), corpus.block_len, corpus.tokenizer())
    want.append(np.asarray(model.retriever.embed_docs(
        feats["input_ids"], feats["attention_mask"], feats["token_type_ids"])))
  # The refresher's jitted, device-sharded batches vs eager per-shard calls on LayerNorm-ed (O(1))
  # outputs: float32 rounding of a 2-layer tower, ~1e-6; a wrong checkpoint or block moves them by 1e-1.
  np.testing.assert_allclose(loaded.embeddings, np.concatenate(want), atol=2e-5, rtol=1e-4)
  jax.clear_caches()


def test_trainer_and_refresher_on_a_local_directory(corpus_seed, tmp_path):
  root = root_with_corpus(corpus_seed, str(tmp_path / "run"))
  trainer_log, refresher_log = _run_trainer_and_refresher(root, tmp_path, dict(os.environ))
  _check_run(root, trainer_log, refresher_log)


def test_trainer_and_refresher_on_a_fake_gcs_bucket(corpus_seed, gcs_server, tmp_path):
  root = root_with_corpus(corpus_seed, gcs_server.new_bucket() + "/run")
  trainer_log, refresher_log = _run_trainer_and_refresher(root, tmp_path,
                                                          {**os.environ, **gcs_server.env})
  _check_run(root, trainer_log, refresher_log)
