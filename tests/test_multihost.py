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


def test_four_processes_train_and_resume_on_gcs_with_the_losses_of_one(corpus_files, gcs_server, tmp_path):
  """4 processes x 1 device, checkpoints and index on the GCS emulator, stopped after 2 steps and
  resumed for a third: the losses are those of one process with the same 4 devices run straight."""
  overrides = BASE + ["data_shards=4"]
  root = _root_with_corpus(gcs_server.new_bucket(), corpus_files)
  first = run_processes(_script(root, overrides, 2, False), 4, 1, extra_env=gcs_server.env)
  assert "PROCESS 3 of 4 devices 4" in first[3]
  second = run_processes(_script(root, overrides, 1, True), 4, 1, extra_env=gcs_server.env)
  single = run_processes(_script(_root_with_corpus(str(tmp_path / "single"), corpus_files), overrides, 3, False),
                         num_processes=1, devices_per_process=4)
  got, want = _history(first[0]) + _history(second[0]), _history(single[0])
  assert [h["step"] for h in got] == [1, 2, 3]
  # The same 4 devices and program split over 4 processes: only the cross-process reduction order
  # and a resumed run's recompilation can differ (~1e-7); a wrong shard, input split or restored
  # state moves the loss by percents.
  np.testing.assert_allclose([h["loss"] for h in got], [h["loss"] for h in want], rtol=1e-5)
  storage = Storage.open(root)
  assert {p.split("/")[1] for p in storage.list("checkpoints") if p.count("/") > 1} >= {"1", "2", "3"}


# Each process's storage counts the bytes it reads, per object; the trainer runs over it.
_COUNTING = textwrap.dedent("""
    import json, pathlib
    import jax
    from realm_jax.retrieval import mips
    from realm_jax.storage import Storage
    from realm_jax.storage.local import LocalBackend
    from realm_jax.train.config import load_config
    from realm_jax.train.trainer import Trainer

    from tests.helpers.counting_storage import Counting

    backend = Counting(LocalBackend(pathlib.Path(ROOT)))
    trainer = Trainer(load_config("smoke", OVERRIDES), Storage(ROOT, backend), log_fn=lambda m: None, stop_after=2)
    at_start = dict(backend.read_bytes)
    result = trainer.run()
    print("READS=" + json.dumps({"start": at_start, "all": backend.read_bytes, "versions": result.index_versions,
                                 "rows": mips.local_row_ranges(trainer.corpus.num_blocks, trainer.mesh)}))
""")


def test_each_process_reads_only_its_rows_at_start_and_at_a_swap(tmp_path):
  """2 processes x 2 devices over a corpus of 8 shard files: at start-up each reads the token
  files of its own devices' rows only, and each index version it loads (the first at start-up, the
  next at a synchronous refresh) only its rows' embedding files; neither reads any text."""
  write_documents(tmp_path / "docs.jsonl")
  root = str(tmp_path / "run")
  manifest = build_corpus([str(tmp_path / "docs.jsonl")], Storage.open(root), block_len=64, shard_blocks=2)
  n = sum(s["num_blocks"] for s in manifest["shards"])
  assert len(manifest["shards"]) == 8 and n == 16
  overrides = BASE[:1] + ["num_train_steps=40", "log_every=1", "async_checkpointing=false", "data_shards=2",
                          "index_refresh=sync", "sync_refresh_every=1", "checkpoint_every=100"]
  script = f"ROOT = {root!r}\nOVERRIDES = {overrides!r}\n" + _COUNTING
  outs = [json.loads(next(line for line in out.splitlines() if line.startswith("READS="))[len("READS="):])
          for out in run_processes(script, num_processes=2, devices_per_process=2)]
  # The row ranges the processes place are disjoint halves of the corpus (checked here, not assumed).
  # (per device: [lo, hi) pairs, merged here)
  assert [sorted(r for lo, hi in o["rows"] for r in range(lo, hi)) for o in outs] == [list(range(8)),
                                                                                      list(range(8, 16))]
  storage = Storage.open(root)
  versions = outs[0]["versions"]
  assert len(versions) == 2 and outs[1]["versions"] == versions  # start-up, then the swap
  for pid, out in enumerate(outs):
    own_shards = {f"{s:05d}" for s in range(4 * pid, 4 * pid + 4)}  # 2 rows per shard file
    started = {k: v for k, v in out["start"].items() if "/tokens-" in k or "/text-" in k}
    assert started and {k.split("-")[-1].split(".")[0] for k in started} <= own_shards, started
    assert not any("/text-" in k for k in out["all"]), out["all"]
    for version in versions:
      emb = {k: v for k, v in out["all"].items() if k.startswith(f"index/{version}/embeddings/")}
      assert {k.split("-")[-1].split(".")[0] for k in emb} == own_shards, emb
      whole = sum(storage.stat(f"index/{version}/embeddings/emb-{s:05d}.npy").size for s in range(8))
      assert sum(emb.values()) <= 0.5 * whole, (sum(emb.values()), whole)  # its rows' files, each read once


_REFRESH = textwrap.dedent("""
    from realm_jax.refresh.refresher import Refresher, RefreshOptions
    r = Refresher(ROOT, RefreshOptions(max_versions=1, poll_seconds=0.1, embed_batch_size=8), log_fn=lambda m: None)
    print("PUBLISHED", [i.version for i in r.run().published])
""")


def test_a_two_process_refresher_publishes_the_embeddings_of_one(corpus_seed, tmp_path):
  """The refresher as 2 processes x 2 devices: each embeds and uploads its half of the corpus
  shards and a ScaNN partition, process 0 publishes; the version holds the embeddings a
  one-process refresher publishes from the same checkpoint, and its searcher finds the same rows."""
  from realm_jax.retrieval import index as index_lib
  from realm_jax.train.config import load_config
  from tests.test_refresh_e2e import root_with_corpus
  from tests.test_refresh_faults import _write_checkpoint

  cfg = load_config("smoke", [])
  loaded = {}
  for name, processes, devices in [("multi", 2, 2), ("single", 1, 4)]:
    root = root_with_corpus(corpus_seed, str(tmp_path / name))
    _write_checkpoint(root, cfg, 3, seed=7)
    outs = run_processes(f"ROOT = {root!r}\n" + _REFRESH, num_processes=processes, devices_per_process=devices)
    assert all("PUBLISHED ['000000000003-" in out for out in outs), outs
    loaded[name] = index_lib.load_index(Storage.open(root))
  multi, single = loaded["multi"], loaded["single"]
  assert len(multi.info.scann_parts) == 2 and len(single.info.scann_parts) == 1
  assert [p["first_row"] for p in multi.info.scann_parts] == [0, 8]  # corpus shards 0-1 and 2-3 (4 rows each)
  # The same jitted tower on the same rows; only the device batch split differs (2 vs 4 devices
  # of one process), which XLA:CPU computes row by row: equal to float32 rounding.
  np.testing.assert_allclose(multi.embeddings, single.embeddings, rtol=0, atol=1e-6)
  queries = single.embeddings[:4] + 0.01
  got = multi.load_searcher().search(queries, 3)
  want = single.load_searcher().search(queries, 3)
  np.testing.assert_array_equal(got.ids[:, 0], np.arange(4))  # each query's own block first
  np.testing.assert_array_equal(want.ids[:, 0], np.arange(4))
