"""Crash tests: the refresher SIGKILLed again and again (at random moments and, through
REALM_JAX_FAULT_PAUSE and the pausing storage of tests/helpers/pausing_refresher.py, inside the
narrow windows of a publish) while a real trainer process trains; bad index versions put behind
LATEST by hand; the trainer SIGKILLed mid-checkpoint.

One trainer process serves the whole scenario (its start-up is the costly part on CPU):
  1. seven refresher kills in a row, one inside each publish window and one at a random moment
     (`benchmarks/chaos.py --kills N` kills it at random many more times): after each, LATEST (if
     any) names a complete version;
  2. a clean refresher restart resumes the staged embeddings and publishes; the trainer swaps it
     in; over all of it the trainer refused nothing (no torn loads) and kept training;
  3. a corrupted manifest, a missing shard and a truncated manifest behind LATEST are refused with
     a clear log line, and the trainer keeps its index;
  4. the trainer killed while orbax writes a checkpoint resumes from the last finalized one.
"""

from __future__ import annotations

import json
import os
import random
import re
import time

from realm_jax import publish
from realm_jax.storage import Storage
from tests.test_refresh_e2e import REFUSED_RE, SWAP_RE, Proc, refresher_args, root_with_corpus, trainer_args

OVERRIDES = ["num_train_steps=100000", "checkpoint_every=3", "index_poll_seconds=0.3",
             "batch_size=8", "log_every=1", "keep_checkpoints=8", "keep_index_versions=3"]
# Kill schedule: each named window (REALM_JAX_FAULT_PAUSE) once, and one time-randomised kill.
SCHEDULE = ["embedding", "random", "upload", "before_manifest", "before_latest", "restore", "after_latest"]
STEP_RE = re.compile(r"step (\d+)/\d+ loss=")


def _last_step(log: str) -> int:
  steps = STEP_RE.findall(log)
  return int(steps[-1]) if steps else 0


def _assert_latest_complete(storage: Storage) -> str | None:
  """LATEST names a version whose every file matches its manifest (or nothing is published)."""
  pv = publish.open_latest(storage, "index", verify=True)
  return None if pv is None else pv.version


def _kill_refresher_at_each_point(root, tmp_path, env, trainer, rng) -> list[dict]:
  storage = Storage.open(root)
  kills = []
  for i, point in enumerate(SCHEDULE):
    args = refresher_args(root, overrides=OVERRIDES)
    if point == "random":  # the real command
      ref = Proc(args, tmp_path / f"refresher-{i}.log", env, devices=2)
    else:  # the same command on a storage that pauses at `point`
      ref = Proc(args[1:], tmp_path / f"refresher-{i}.log", {**env, "REALM_JAX_FAULT_PAUSE": point}, devices=2,
                 module="tests.helpers.pausing_refresher")
    try:
      if point == "random":  # anywhere from the restore to the end of the publish
        ref.wait_for(r"checkpoint step \d+: restoring", timeout=180)
        time.sleep(rng.uniform(0.0, 2.5))
      else:
        ref.wait_for(f"FAULT PAUSE at {point}", timeout=180)
    finally:
      ref.kill()
    kills.append({"point": point, "log": ref.text(), "latest": _assert_latest_complete(storage)})
    assert trainer.popen.poll() is None, trainer.text()[-3000:]
  return kills


def _put_bad_version(storage: Storage, good: str, name: str, damage: str) -> str:
  """Copies version `good` to `name` with one kind of damage, then points LATEST at it by hand."""
  manifest = json.loads(storage.read_bytes(f"index/{good}/{publish.MANIFEST}"))
  manifest["version"] = name
  shards = sorted(f for f in manifest["files"] if f.startswith("embeddings/"))  # not the ScaNN files
  for f in manifest["files"]:
    if not (damage == "missing_shard" and f == shards[-1]):
      storage.write_bytes(f"index/{name}/{f}", storage.read_bytes(f"index/{good}/{f}"))
  text = json.dumps(manifest)
  if damage == "checksum":  # the manifest no longer describes the bytes
    manifest["files"][shards[0]]["crc32c"] = "0badc0de"
    text = json.dumps(manifest)
  elif damage == "truncated":
    text = text[: len(text) // 2]
  info = storage.write_bytes(f"index/{name}/{publish.MANIFEST}", text.encode())
  storage.write_json("index/LATEST", {"format": publish.FORMAT, "version": name,
                                      "manifest_generation": info.generation,
                                      "published": "2026-01-01T00:00:00+00:00"})
  return name


def test_refresher_kills_bad_versions_and_trainer_kill(corpus_seed, tmp_path):
  root = root_with_corpus(corpus_seed, str(tmp_path / "run"))
  storage = Storage.open(root)
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  rng = random.Random(int(time.time()))
  trainer = Proc(trainer_args(root, overrides=OVERRIDES), tmp_path / "trainer.log", env)
  try:
    trainer.wait_for(r"step 2/", timeout=240)

    # 1. A kill at each point of the schedule while the trainer runs.
    step_before = _last_step(trainer.text())
    kills = _kill_refresher_at_each_point(root, tmp_path, env, trainer, rng)
    assert len(kills) == len(SCHEDULE)

    # 2. A clean restart resumes what the killed ones staged, and publishes.
    final = Proc(refresher_args(root, "--max-versions", "1", overrides=OVERRIDES),
                 tmp_path / "refresher-final.log", env, devices=2)
    assert final.wait(timeout=240) == 0, final.text()[-3000:]
    version = re.search(r"published index (\S+):", final.text()).group(1)
    trainer.wait_for(rf"swapped index \S+ -> {version} ", timeout=120)
    all_logs = "".join(k["log"] for k in kills) + final.text()
    resumed = [int(n) for n in re.findall(r"\((\d+) shards were already staged\)", all_logs)]
    assert any(n > 0 for n in resumed), all_logs[-3000:]  # some restart resumed staged shards
    log = trainer.text()
    assert not REFUSED_RE.search(log), log  # torn / partial loads seen by the trainer: none
    assert _last_step(log) > step_before  # it kept training through the kills
    for _, new, _, _ in SWAP_RE.findall(log):  # every swapped-in version was a published one
      assert new in all_logs + "".join(k["latest"] or "" for k in kills)
    print(f"refresher kills tried: {len(kills)} ({', '.join(k['point'] for k in kills)}); "
          f"torn loads seen: {len(REFUSED_RE.findall(log))}; "
          f"swaps: {len(SWAP_RE.findall(log))}; trainer steps during the kills: "
          f"{step_before} -> {_last_step(log)}")

    # 3. Bad versions behind LATEST are refused; the trainer keeps its index.
    good_pointer = storage.read_bytes("index/LATEST")
    step = publish.version_key(version)[0]
    for k, damage in enumerate(["checksum", "missing_shard", "truncated"]):
      start = len(trainer.text())
      bad = _put_bad_version(storage, version, f"{step + 1000 + k:012d}-bad{k}", damage)
      line = trainer.wait_for(r"refused index version .*", timeout=60, start=start).group(0)
      assert f"index/{bad}/" in line, line  # names the damaged file
      want = {"checksum": "manifest says", "missing_shard": "missing",
              "truncated": "manifest is not JSON"}[damage]
      assert want in line, line
      trainer.wait_for(r"step \d+/", timeout=60, start=len(trainer.text()))  # still training
      assert f"-> {bad}" not in trainer.text()
    storage.write_bytes("index/LATEST", good_pointer)  # undo by hand, as an operator would

    # 4. The trainer killed mid-checkpoint resumes from the last finalized checkpoint.
    ckpt_dir = storage.local_path("checkpoints")
    deadline = time.monotonic() + 120
    while not any(".orbax-checkpoint-tmp" in p.name for p in ckpt_dir.iterdir()):
      assert time.monotonic() < deadline and trainer.popen.poll() is None, trainer.text()[-3000:]
      time.sleep(0.01)
    trainer.kill()
    partial = [p.name for p in ckpt_dir.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    finalized = max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    assert partial, "the kill did not land inside a checkpoint write"
    interrupted = int(partial[0].split(".")[0])
    assert interrupted > finalized
    resumed_trainer = Proc(trainer_args(root, "--resume", "--stop-after", "2", overrides=OVERRIDES),
                           tmp_path / "trainer-resumed.log", env)
    try:
      assert resumed_trainer.wait(timeout=240) == 0, resumed_trainer.text()[-3000:]
    finally:
      resumed_trainer.kill()
    text = resumed_trainer.text()
    assert f"resumed from checkpoint step {finalized}" in text, text[-3000:]
    assert f"finished at step {finalized + 2}" in text, text[-3000:]
  finally:
    trainer.kill()


def _write_checkpoint(root: str, cfg, step: int, seed: int) -> None:
  """A trainer-format checkpoint (the real Checkpoints class) of a freshly initialised model."""
  import optax
  from flax import nnx

  from realm_jax.models import RealmModel
  from realm_jax.train.checkpoints import Checkpoints

  model = RealmModel(cfg.model, rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  ckpt = Checkpoints(Storage.open(root).uri("checkpoints"), keep=10, async_save=False)
  ckpt.save(step, model, optimizer, {}, {"config": cfg.to_dict(), "index_version": None})
  ckpt.close()


def test_refresher_in_process_conflict_config_and_stop(corpus_seed, tmp_path):
  """Lost publish race skipped (not fatal), a mismatched model config refused by name, and the
  loop's two exits (--max-versions, TRAINING_DONE)."""
  import pytest

  from realm_jax.refresh.refresher import Refresher, RefreshError, RefreshOptions
  from realm_jax.train.config import load_config

  root = root_with_corpus(corpus_seed, str(tmp_path / "run"))
  storage = Storage.open(root)
  cfg = load_config("smoke", ["keep_index_versions=5"])
  _write_checkpoint(root, cfg, 2, seed=1)
  _write_checkpoint(root, cfg, 4, seed=2)
  lines: list[str] = []
  refresher = Refresher(root, RefreshOptions(max_versions=1, poll_seconds=0.1, embed_batch_size=8),
                        log_fn=lines.append)  # the config comes from the checkpoints
  assert refresher.cfg is None
  assert refresher.next_step() == 4  # the newest finalized step newer than (no) index
  result = refresher.run()
  assert refresher.cfg == cfg
  assert result.reason == "max versions" and [i.step for i in result.published] == [4]
  assert publish.open_latest(storage, "index").metadata["step"] == 4
  assert refresher.next_step() is None
  # A publish that loses the race (LATEST already names a newer version) is skipped.
  assert refresher.refresh(2) is None
  assert any("another publisher got there first" in line for line in lines), lines
  assert publish.open_latest(storage, "index").metadata["step"] == 4
  # TRAINING_DONE stops the loop before anything more is published.
  _write_checkpoint(root, cfg, 6, seed=3)
  storage.write_bytes("TRAINING_DONE", b"6\n")
  done = Refresher(root, RefreshOptions(poll_seconds=0.1, embed_batch_size=8), config=cfg,
                   log_fn=lines.append).run()
  assert done.reason == "training done" and done.published == []
  # A config or override that contradicts the checkpoint's is refused, naming the field.
  other = load_config("smoke", ["keep_index_versions=5", "model.retriever_dim=64"])
  with pytest.raises(RefreshError, match=r"checkpoints/6: --config/--set give model\.retriever_dim=64, the trainer "
                     r"ran with model\.retriever_dim=128"):
    Refresher(root, RefreshOptions(embed_batch_size=8), config=other).refresh(6)
  with pytest.raises(RefreshError, match=r"give keep_index_versions=2, the trainer ran with keep_index_versions=5"):
    Refresher(root, RefreshOptions(embed_batch_size=8), overrides=["keep_index_versions=2"]).refresh(6)


def test_two_live_refreshers_publish_one_version_per_checkpoint(corpus_seed, tmp_path):
  """Two refresher processes on one root, each new checkpoint raced by both (they embed it at the
  same time, sharing its staged shards): exactly one complete version per checkpoint step, LATEST
  always names a complete version, and both exit cleanly on TRAINING_DONE."""
  from realm_jax.train.config import load_config
  from tests.test_refresh_e2e import Proc, refresher_args, root_with_corpus

  root = root_with_corpus(corpus_seed, str(tmp_path / "run"))
  storage = Storage.open(root)
  cfg = load_config("smoke", ["keep_index_versions=100", "keep_checkpoints=100"])
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  _write_checkpoint(root, cfg, 2, seed=1)
  overrides = ["keep_index_versions=100", "keep_checkpoints=100"]
  refreshers = [Proc(refresher_args(root, overrides=overrides), tmp_path / f"refresher-{k}.log", env)
                for k in range(2)]
  try:
    seen_latest = set()
    for step, seed in ((2, None), (4, 2), (6, 3)):
      if seed is not None:
        _write_checkpoint(root, cfg, step, seed=seed)
      deadline = time.monotonic() + 300
      while True:  # LATEST checked (every file against its manifest) all along
        version = _assert_latest_complete(storage)
        if version is not None:
          seen_latest.add(version)
        # Each refresher published the step, lost the race for it, or (slower to look) found the
        # index already at it.
        outcomes = [re.search(rf"(published index \S+: .* from checkpoint step {step};|checkpoint step {step}: not "
                              rf"published, another publisher got there first|no finalized checkpoint newer than "
                              rf"the index \(step {step}\))", r.text()) for r in refreshers]
        if all(outcomes):
          break
        for r in refreshers:
          assert r.popen.poll() is None, r.text()[-3000:]
        assert time.monotonic() < deadline, [r.text()[-2000:] for r in refreshers]
        time.sleep(0.05)
    storage.write_bytes("TRAINING_DONE", b"6\n")
    for r in refreshers:
      assert r.wait(timeout=120) == 0, r.text()[-3000:]
  finally:
    for r in refreshers:
      r.kill()
  logs = "".join(r.text() for r in refreshers)
  versions = publish.list_versions(storage, "index")
  steps = sorted(publish.version_key(v)[0] for v in versions)
  assert steps == [2, 4, 6], versions  # exactly one version per checkpoint step
  for v in versions:
    publish.open_version(storage, "index", v, verify=True)
  assert publish.list_versions(storage, "index", complete_only=False) == versions  # no half-published leftover
  assert "another publisher got there first" in logs  # they did race
  assert "Traceback" not in logs, logs[-3000:]
  print(f"versions {versions}; LATEST seen {sorted(seen_latest)}")
