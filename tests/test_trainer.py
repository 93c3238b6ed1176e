"""The REALM trainer end to end on CPU: mesh-size invariance, exact resume, metrics on storage."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from realm_jax.storage import Storage

OVERRIDES = ["batch_size=8", "num_train_steps=40", "log_every=1", "checkpoint_every=2",
             "index_refresh=none", "async_checkpointing=false"]


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
  line = next(line for line in out.stdout.splitlines() if line.startswith("HISTORY="))
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
  def quiet(m):
    return None
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
  rows = [json.loads(line) for line in storage.read_bytes("metrics/realm.jsonl").decode().splitlines()]
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
  trainer = Trainer(cfg, root, log_fn=lambda m: None)
  before = jax.tree.map(np.array, nnx.state(trainer.model, nnx.Param))
  result = trainer.run()
  after = jax.tree.map(np.array, nnx.state(trainer.model, nnx.Param))
  assert result.step == 6  # 3 optimizer steps x 2 micro-batches
  # Only the retriever trains: the encoder, which the ICT loss never reads, is not even weight-decayed.
  assert cfg.weight_decay > 0
  jax.tree.map(np.testing.assert_array_equal, after["encoder"], before["encoder"])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), after["retriever"], before["retriever"]))
  assert all(moved), f"{sum(moved)} of {len(moved)} retriever parameters moved"
  assert all(0.0 <= h["ict_accuracy"] <= 1.0 and np.isfinite(h["loss"]) for h in result.history)
  assert Storage.open(root).exists("TRAINING_DONE")


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(corpus_root, tmp_path, capsys):
  """A learning rate of 1e30 (the warmup makes step 1's zero) blows the weights up in step 2: step
  3's loss is NaN. The CLI stops with one line naming step 3, and step 2's checkpoint stays the
  newest, finite and restorable."""
  from flax import nnx

  from realm_jax.cli.main import main
  from realm_jax.models import RealmModel
  from realm_jax.train.checkpoints import Checkpoints
  from realm_jax.train.config import load_config

  root = _fresh_root(corpus_root, tmp_path, "nan")
  overrides = OVERRIDES + ["checkpoint_every=1", "learning_rate=1e30"]
  capsys.readouterr()
  assert main(["pretrain", "--config", "smoke", "--storage", root, "--set", *overrides]) == 2
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("realm-jax pretrain: error:")]
  assert len(errors) == 1, errors
  assert "non-finite loss at step 3" in errors[0] and "the last checkpoint is step 2" in errors[0], errors[0]
  ckpt = Checkpoints(Storage.open(root).uri("checkpoints"), read_only=True)
  assert ckpt.all_steps() == [1, 2]  # nothing of the NaN state was saved
  model = RealmModel(load_config("smoke", overrides).model, rngs=nnx.Rngs(7))
  for part in ("retriever", "encoder"):
    ckpt.restore_part(2, model, part)
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert params and all(np.isfinite(np.asarray(p)).all() for p in params)


def test_metrics_on_an_object_store_leave_no_local_files(tmp_path, monkeypatch):
  """On a root with no local path (memory://, gs://) TensorBoard writes its event files to a local
  staging directory and uploads them at each flush; closing removes that directory, and the
  uploaded events read back with TensorBoard's own reader."""
  import tempfile

  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  from realm_jax.train.metrics import MetricsWriter, read_metrics

  local_tmp = tmp_path / "local-tmp"
  local_tmp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(local_tmp))
  storage = Storage.open("memory://metrics-test")
  writer = MetricsWriter(storage, "realm")
  assert list(local_tmp.iterdir())  # the staging directory exists while the writer is open
  for step in (1, 2, 3):
    writer.write(step, {"loss": 1.0 / step})
  writer.close()
  assert list(local_tmp.iterdir()) == []
  assert [r["step"] for r in read_metrics(storage, "realm")] == [1, 2, 3]
  events = tmp_path / "events"
  for path in storage.list("metrics/tb-realm"):
    storage.get_file(path, events / path.rsplit("/", 1)[1])
  acc = EventAccumulator(str(events))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("realm/loss")] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
