"""The real multi-host code path on one machine: several JAX processes joined by
`jax.distributed` on localhost, CPU devices in each, one global mesh, shared storage."""

import json
import textwrap

import numpy as np
import pytest

from realm_jax.data.corpus import build_corpus
from realm_jax.storage import Storage
from tests.helpers.facts_corpus import write_documents
from tests.helpers.multiprocess import run_processes

BASE = ["batch_size=8", "num_train_steps=40", "log_every=1", "checkpoint_every=1",
        "index_refresh=none", "async_checkpointing=false"]


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
  root = tmp_path_factory.mktemp("facts")
  write_documents(root / "docs.jsonl")
  seed = Storage.open(str(root / "seed"))
  build_corpus([str(root / "docs.jsonl")], seed, block_len=64)
  return {p: seed.read_bytes(p) for p in seed.list("corpus")}


def _root_with_corpus(uri: str, files: dict) -> str:
  storage = Storage.open(uri)
  for path, data in files.items():
    storage.write_bytes(path, data)
  return uri


def _script(root: str, overrides: list[str], stop_after: int, resume: bool) -> str:
  return textwrap.dedent(f"""
      import json
      import jax
      from realm_jax.train.config import load_config
      from realm_jax.train.trainer import Trainer
      cfg = load_config("smoke", {overrides!r})
      r = Trainer(cfg, {root!r}, resume={resume!r}, log_fn=lambda m: None, stop_after={stop_after}).run()
      print("PROCESS", jax.process_index(), "of", jax.process_count(), "devices", jax.device_count())
      print("HISTORY=" + json.dumps(r.history))
  """)


def _history(output: str) -> list[dict]:
  return json.loads(next(line for line in output.splitlines() if line.startswith("HISTORY="))[len("HISTORY="):])


def test_two_processes_give_the_loss_of_one(corpus_files, tmp_path):
  overrides = BASE + ["data_shards=2"]
  multi = run_processes(_script(_root_with_corpus(str(tmp_path / "multi"), corpus_files), overrides, 3, False),
                        num_processes=2, devices_per_process=2)
  assert "PROCESS 1 of 2 devices 4" in multi[1]
  single = run_processes(_script(_root_with_corpus(str(tmp_path / "single"), corpus_files), overrides, 3, False),
                         num_processes=1, devices_per_process=4)
  got, want = _history(multi[0]), _history(single[0])
  assert [h["step"] for h in got] == [1, 2, 3]
  # The same 4 devices and program split over 2 processes: only the cross-process reduction
  # order can differ (~1e-7); a wrong shard or input split moves the loss by percents.
  np.testing.assert_allclose([h["loss"] for h in got], [h["loss"] for h in want], rtol=1e-5)


def test_four_hosts_train_and_resume_on_gcs(corpus_files, gcs_server):
  """4 processes x 2 devices, checkpoints and index on the GCS emulator; a resumed run continues
  with the losses of an uninterrupted one."""
  overrides = BASE + ["data_shards=4"]
  env = gcs_server.env
  straight = _root_with_corpus(gcs_server.new_bucket(), corpus_files)
  want = _history(run_processes(_script(straight, overrides, 3, False), 4, 2, extra_env=env)[0])
  root = _root_with_corpus(gcs_server.new_bucket(), corpus_files)
  first = run_processes(_script(root, overrides, 2, False), 4, 2, extra_env=env)
  assert "PROCESS 3 of 4 devices 8" in first[3]
  second = run_processes(_script(root, overrides, 1, True), 4, 2, extra_env=env)
  got = _history(first[0]) + _history(second[0])
  assert [h["step"] for h in got] == [1, 2, 3]
  # Same processes, devices and program: the tolerance only absorbs recompilation (see test_trainer).
  np.testing.assert_allclose([h["loss"] for h in got], [h["loss"] for h in want], rtol=1e-5)
  storage = Storage.open(root)
  assert {p.split("/")[1] for p in storage.list("checkpoints") if p.count("/") > 1} >= {"1", "2", "3"}
