"""The REALM trainer end to end on CPU: mesh-size invariance, exact resume, metrics on storage."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from realm_jax.data.corpus import build_corpus
from realm_jax.storage import Storage
from tests.helpers.facts_corpus import write_documents

OVERRIDES = ["batch_size=8", "num_train_steps=40", "log_every=1", "checkpoint_every=2",
             "index_refresh=none", "async_checkpointing=false"]


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("facts")
  write_documents(root / "docs.jsonl")
  build_corpus([str(root / "docs.jsonl")], Storage.open(str(root / "seed")), block_len=64)
  return root


def _fresh_root(corpus_root, tmp_path, name):
  """A new storage root holding a copy of the corpus (each run publishes its own index)."""
  src, dst = Storage.open(str(corpus_root / "seed")), Storage.open(str(tmp_path / name))
  for path in src.list("corpus"):
    dst.write_bytes(path, src.read_bytes(path))
  return str(tmp_path / name)


def _run_in_subprocess(root: str, devices: int, steps: int) -> list[dict]:
  script = textwrap.dedent(f"""
      import json
      from realm_jax.train.config import load_config
      from realm_jax.train.trainer import Trainer
      cfg = load_config("smoke", {OVERRIDES!r})
      r = Trainer(cfg, {root!r}, log_fn=lambda m: None, stop_after={steps}).run()
      print("HISTORY=" + json.dumps(r.history))
  """)
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  line = next(l for l in out.stdout.splitlines() if l.startswith("HISTORY="))
  return json.loads(line[len("HISTORY="):])


def test_eight_devices_give_the_loss_of_one(corpus_root, tmp_path):
  one = _run_in_subprocess(_fresh_root(corpus_root, tmp_path, "one"), 1, 3)
  eight = _run_in_subprocess(_fresh_root(corpus_root, tmp_path, "eight"), 8, 3)
  assert [h["step"] for h in one] == [1, 2, 3]
  # 8 devices sum the batch's gradients in another order (psum of partial sums) and the 3 Adam
  # steps amplify the difference: ~1e-5 relative on the loss, ~1e-4 on the gradient norm (a sum of
  # squares over every parameter); a wrong shard or a missing device moves both by percents.
  np.testing.assert_allclose([h["loss"] for h in eight], [h["loss"] for h in one], rtol=2e-4)
  np.testing.assert_allclose([h["grad_norm"] for h in eight], [h["grad_norm"] for h in one], rtol=2e-3)


def test_resume_continues_exactly(corpus_root, tmp_path):
  from realm_jax.train.config import load_config
  from realm_jax.train.trainer import Trainer

  cfg = load_config("smoke", OVERRIDES)
  quiet = lambda m: None
  straight = Trainer(cfg, _fresh_root(corpus_root, tmp_path, "straight"), log_fn=quiet, stop_after=6).run()
  root = _fresh_root(corpus_root, tmp_path, "interrupted")
  first = Trainer(cfg, root, log_fn=quiet, stop_after=4).run()
  assert first.step == 4
  with pytest.raises(Exception, match="pass --resume"):
    Trainer(cfg, root, log_fn=quiet, stop_after=2)
  second = Trainer(cfg, root, resume=True, log_fn=quiet, stop_after=2).run()
  assert second.step == 6
  want = {h["step"]: h["loss"] for h in straight.history}
  got = {h["step"]: h["loss"] for h in first.history + second.history}
  assert sorted(got) == [1, 2, 3, 4, 5, 6]
  # Same devices, same programs, same inputs: a resumed run computes the same floats; 1e-5 only
  # absorbs a recompiled program's fusion choices (a lost optimizer or RNG state moves the loss by %).
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-5)
  # Metrics reach the storage root as JSONL (one row per logged step) and TensorBoard events.
  storage = Storage.open(root)
  rows = [json.loads(l) for l in storage.read_bytes("metrics/realm.jsonl").decode().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert all(r["index_staleness"] == r["step"] for r in rows)  # one index, built at step 0
  assert any(p.startswith("metrics/tb-realm/events.out.tfevents") for p in storage.list("metrics"))


def test_synchronous_refresh_reembeds_every_n_steps(corpus_root, tmp_path):
  """--synchronous-refresh (Atlas-style): stop, re-embed with the current document tower, go on."""
  from realm_jax.retrieval import index as index_lib
  from realm_jax.train.config import load_config
  from realm_jax.train.trainer import Trainer

  cfg = load_config("smoke", OVERRIDES + ["index_refresh=sync", "sync_refresh_every=2"])
  root = _fresh_root(corpus_root, tmp_path, "sync")
  result = Trainer(cfg, root, log_fn=lambda m: None, stop_after=5).run()
  assert len(result.index_versions) == 3  # bootstrap at step 0, then steps 2 and 4
  info = index_lib.latest_index_info(Storage.open(root))
  assert info.step == 4 and info.version == result.index_versions[-1]
  staleness = [h["index_staleness"] for h in result.history]
  assert staleness == [1, 2, 1, 2, 1]  # after each refresh the index is as fresh as the weights


def test_ict_warm_start_trains_the_retriever(corpus_root, tmp_path):
  from realm_jax.train.config import load_config
  from realm_jax.train.trainer import Trainer

  cfg = load_config("ict_smoke", ["batch_size=16", "log_every=1", "async_checkpointing=false",
                                  "grad_accum_steps=2", "num_train_steps=3"])
  root = _fresh_root(corpus_root, tmp_path, "ict")
  result = Trainer(cfg, root, log_fn=lambda m: None).run()
  assert result.step == 6  # 3 optimizer steps x 2 micro-batches
  assert all(0.0 <= h["ict_accuracy"] <= 1.0 and np.isfinite(h["loss"]) for h in result.history)
  assert Storage.open(root).exists("TRAINING_DONE")
