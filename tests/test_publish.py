"""Atomic, verified publishing on local / fake-gcs-server / memory roots: round trips,
interruption at every write, corruption and missing files, racing publishers, retention."""

import io
import os
import pathlib
import subprocess
import sys
import textwrap
import threading
from collections.abc import Mapping

import numpy as np
import pytest

from realm_jax import publish as pub
from realm_jax.errors import RealmError
from realm_jax.storage import Storage

REPO = pathlib.Path(__file__).resolve().parents[1]


def _files(tmp_path, tag: str) -> dict:
  """A version's files: bytes, a .npy and a local file path, one of them nested."""
  local = tmp_path / f"{tag}-searcher.pb"
  local.write_bytes(f"searcher config {tag}".encode() * 50)
  arr = np.arange(12, dtype=np.float32).reshape(3, 4) + len(tag)
  buf = io.BytesIO()
  np.save(buf, arr, allow_pickle=False)
  return {"embeddings.npy": buf.getvalue(), "scann/config.pb": local,
          "block_ids.bin": os.urandom(1000)}


def _expected(files: dict) -> dict:
  return {n: (v.read_bytes() if isinstance(v, pathlib.Path) else v) for n, v in files.items()}


def test_publish_then_read_round_trip(storage_root, tmp_path):
  s = Storage.open(storage_root)
  assert pub.read_latest(s, "index") is None and pub.open_latest(s, "index") is None
  files = _files(tmp_path, "a")
  v = pub.new_version(500)
  m = pub.publish(s, "index", v, files, {"step": 500, "fingerprint": "abc"})
  latest = pub.read_latest(s, "index")
  assert latest == m and latest.version == v and latest.metadata["step"] == 500
  assert sorted(s.list(f"index/{v}")) == sorted(
      [f"index/{v}/{n}" for n in files] + [f"index/{v}/manifest.json"])
  if s.root.startswith("gs://"):  # generations recorded and pinned
    assert all(e.generation for e in m.files.values())
  pv = pub.open_version(s, "index", v)
  for name, data in _expected(files).items():
    assert pv.read_bytes(name) == data
    assert pv.manifest.files[name].size == len(data)
  np.testing.assert_array_equal(pv.read_array("embeddings.npy"),
                                np.arange(12, dtype=np.float32).reshape(3, 4) + 1)
  out = pv.download(tmp_path / "stage")
  assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
          if p.is_file()} == _expected(files)
  assert pv.download(tmp_path / "stage2", under="scann") == tmp_path / "stage2" / "scann"
  assert pub.list_versions(s, "index") == [v]

  v2 = pub.new_version(1000)
  pub.publish(s, "index", v2, pub.files_from_dir(tmp_path / "stage"), {"step": 1000})
  assert pub.read_latest(s, "index").version == v2
  assert pub.open_latest(s, "index").read_bytes("scann/config.pb") == files[
      "scann/config.pb"].read_bytes()


def test_versions_order_by_step_then_suffix():
  vs = ["10-b", "9", "000000000010-a", "100", pub.new_version(11)]
  assert sorted(vs, key=pub.version_key) == ["9", "000000000010-a", "10-b", vs[-1], "100"]
  assert pub.new_version(7).startswith("000000000007-")
  for bad in ["abc", "12-", "-3", "1.5", "7/8", "12-a-b."]:
    with pytest.raises(pub.PublishError, match="invalid version"):
      pub.version_key(bad)


class _FailingSource(Mapping):
  """A file source whose i-th file cannot be produced (e.g. the embedder crashed)."""

  def __init__(self, files, fail_at):
    self.files, self.fail_at = files, fail_at

  def __iter__(self):
    return iter(self.files)

  def __len__(self):
    return len(self.files)

  def __getitem__(self, name):
    if sorted(self.files).index(name) == self.fail_at:
      raise OSError(f"source for {name} failed")
    return self.files[name]


def test_interrupted_publish_leaves_previous_version(storage_root, tmp_path):
  s = Storage.open(storage_root)
  base = _files(tmp_path, "base")
  pub.publish(s, "index", "1", base, {"n": 1})
  files = _files(tmp_path, "next")
  steps = [f"file:{n}" for n in sorted(files)] + ["manifest"]
  attempts = 0
  for i in range(len(files)):  # the i-th file's source raises
    attempts += 1
    with pytest.raises(OSError, match="source for"):
      pub.publish(s, "index", f"{1 + attempts}", _FailingSource(files, i))
    assert pub.open_latest(s, "index").version == "1"
  for step in steps:  # the process dies right after each write before LATEST
    attempts += 1

    def crash(done, step=step):
      if done == step:
        raise KeyboardInterrupt(f"killed after {done}")

    with pytest.raises(KeyboardInterrupt):
      pub.publish(s, "index", f"{1 + attempts}", files, progress=crash)
    latest = pub.open_latest(s, "index")  # verifies every file of the pointed-to version
    assert latest.version == "1" and latest.read_bytes("block_ids.bin") == base["block_ids.bin"]
  # only the version whose manifest got written counts as complete
  assert pub.list_versions(s, "index") == ["1", f"{1 + attempts}"]
  done = []
  final = pub.publish(s, "index", f"{2 + attempts}", files, progress=done.append)
  assert done == steps + ["latest"]
  assert pub.open_latest(s, "index").manifest == final
  # version 2 failed before its first write, so it left nothing behind
  assert pub.prune(s, "index", keep=1) == ["1"] + [str(v) for v in range(3, 2 + attempts)]
  assert s.listdir("index") == [f"{2 + attempts}", "LATEST"]


def test_retrying_a_crashed_version_completes_it(storage_root, tmp_path):
  s = Storage.open(storage_root)
  files = _files(tmp_path, "r")

  def crash(done):
    if done == "file:embeddings.npy":
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    pub.publish(s, "index", "5-x", files, progress=crash)
  pub.publish(s, "index", "5-x", files)  # same content: the written files are accepted
  pv = pub.open_latest(s, "index")
  assert pv.version == "5-x" and pv.read_bytes("block_ids.bin") == files["block_ids.bin"]


def test_conflicting_content_for_one_version_name(storage_root, tmp_path):
  s = Storage.open(storage_root)
  files = _files(tmp_path, "c")

  def crash(done):
    if done == "file:scann/config.pb":
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    pub.publish(s, "index", "8", files, progress=crash)
  with pytest.raises(pub.PublishConflict, match="block_ids.bin: already exists with different"):
    pub.publish(s, "index", "8", dict(files, **{"block_ids.bin": b"other bytes"}))
  assert pub.read_latest(s, "index") is None


def test_publish_refuses_older_or_same_version(storage_root, tmp_path):
  s = Storage.open(storage_root)
  pub.publish(s, "index", "000010", {"a": b"1"})
  for v in ["000009", "10", "000010"]:
    with pytest.raises(pub.PublishConflict, match="not older than"):
      pub.publish(s, "index", v, {"a": b"2"})
  pub.publish(s, "index", "000009", {"a": b"2"}, allow_older=True)  # an explicit rollback
  assert pub.read_latest(s, "index").version == "000009"
  with pytest.raises(pub.PublishError, match="invalid file name"):
    pub.publish(s, "index", "11", {"manifest.json": b"x"})
  with pytest.raises(pub.PublishError, match="not JSON-serialisable"):
    pub.publish(s, "index", "11", {"a": b"x"}, {"loss": float("nan")})
  with pytest.raises(RealmError, match="no-such-file.bin: no such local file"):
    pub.publish(s, "index", "11", {"a": b"x", "b": tmp_path / "no-such-file.bin"})
  assert pub.read_latest(s, "index").version == "000009"


def test_corrupted_file_is_refused_naming_it(storage_root, tmp_path):
  s = Storage.open(storage_root)
  files = _files(tmp_path, "k")
  pub.publish(s, "index", "3", files)
  opened = pub.open_version(s, "index", "3")  # verified before the corruption
  good = s.read_bytes("index/3/block_ids.bin")
  bad = bytes([good[0] ^ 1]) + good[1:]  # same size, one bit flipped
  s.write_bytes("index/3/block_ids.bin", bad)
  with pytest.raises(pub.CorruptVersion, match=r"index/3/block_ids\.bin") as e:
    pub.open_version(s, "index", "3")
  assert isinstance(e.value, RealmError)
  with pytest.raises(pub.CorruptVersion, match=r"block_ids\.bin"):
    pub.open_latest(s, "index")
  with pytest.raises(pub.CorruptVersion, match=r"block_ids\.bin"):
    opened.read_bytes("block_ids.bin")  # later reads are checked (and pinned on GCS) too
  with pytest.raises(pub.CorruptVersion, match=r"block_ids\.bin"):
    opened.download(tmp_path / "dl")
  assert opened.read_bytes("embeddings.npy") == files["embeddings.npy"]  # others still fine


def test_truncated_file_is_refused(storage_root, tmp_path):
  s = Storage.open(storage_root)
  pub.publish(s, "index", "3", _files(tmp_path, "t"))
  s.write_bytes("index/3/scann/config.pb", b"short")
  with pytest.raises(pub.CorruptVersion, match=r"scann/config\.pb.*5 bytes"):
    pub.open_version(s, "index", "3")


def test_missing_file_or_manifest_is_refused(storage_root, tmp_path):
  s = Storage.open(storage_root)
  pub.publish(s, "index", "4", _files(tmp_path, "m"))
  s.delete("index/4/embeddings.npy")
  with pytest.raises(pub.CorruptVersion, match=r"embeddings\.npy: missing"):
    pub.open_version(s, "index", "4")
  s.write_bytes("index/4/manifest.json", b'{"format": 1, "files": 7}')
  with pytest.raises(pub.CorruptVersion, match="manifest.json: malformed manifest"):
    pub.open_version(s, "index", "4", verify=False)
  s.delete("index/4/manifest.json")
  with pytest.raises(pub.CorruptVersion, match="manifest.json: manifest missing"):
    pub.open_version(s, "index", "4")
  with pytest.raises(pub.CorruptVersion, match="manifest missing"):
    pub.read_latest(s, "index")  # LATEST names a version whose manifest is gone


def test_concurrent_publishers_threads(storage_root):
  """Both read LATEST, both write complete versions, both try to swap: exactly one wins."""
  s = Storage.open(storage_root)
  pub.publish(s, "index", "1", {"x": b"base"})
  barrier = threading.Barrier(2, timeout=60)
  results = {}

  def run(v):
    try:
      pub.publish(Storage.open(storage_root), "index", v, {"x": v.encode()},
                  progress=lambda step: barrier.wait() if step == "manifest" else None)
      results[v] = "won"
    except pub.PublishConflict as e:
      results[v] = e

  threads = [threading.Thread(target=run, args=(v,)) for v in ("2-a", "2-b")]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  winners = [v for v, r in results.items() if r == "won"]
  losers = [r for r in results.values() if r != "won"]
  assert len(winners) == 1 and len(losers) == 1, results
  assert "changed while publishing" in str(losers[0])
  pv = pub.open_latest(s, "index")
  assert pv.version == winners[0] and pv.read_bytes("x") == winners[0].encode()
  # The loser removed its complete version that nothing names: one version of step 2 is left.
  assert pub.list_versions(s, "index", complete_only=False) == ["1", winners[0]]
  assert "is removed" in str(losers[0])


_PUBLISHER = textwrap.dedent("""
    import pathlib, sys, time
    from realm_jax import publish as pub
    from realm_jax.storage import Storage
    root, version, sync = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])

    def rendezvous(step):  # both processes have read LATEST and written a manifest
      if step == "manifest":
        (sync / version).touch()
        deadline = time.monotonic() + 60
        while len(list(sync.iterdir())) < 2 and time.monotonic() < deadline:
          time.sleep(0.01)

    try:
      pub.publish(Storage.open(root), "index", version, {"x": version.encode()},
                  progress=rendezvous)
      print("WON")
    except pub.PublishConflict as e:
      print("CONFLICT", e)
    """)


def test_concurrent_publishers_processes(shared_storage_root, tmp_path):
  s = Storage.open(shared_storage_root)
  pub.publish(s, "index", "1", {"x": b"base"})
  sync = tmp_path / "sync"
  sync.mkdir()
  procs = {v: subprocess.Popen([sys.executable, "-c", _PUBLISHER, shared_storage_root, v,
                                str(sync)], cwd=REPO, stdout=subprocess.PIPE, text=True)
           for v in ("7-p", "7-q")}
  outs = {v: p.communicate(timeout=120)[0].strip() for v, p in procs.items()}
  assert all(p.returncode == 0 for p in procs.values()), outs
  winners = [v for v, o in outs.items() if o == "WON"]
  assert len(winners) == 1, outs
  assert sum(o.startswith("CONFLICT") for o in outs.values()) == 1, outs
  assert pub.open_latest(s, "index").read_bytes("x") == winners[0].encode()


def test_prune_keeps_newest_and_latest(storage_root):
  s = Storage.open(storage_root)
  for step in (1, 2, 3, 4, 5):
    pub.publish(s, "index", f"{step:06d}", {"x": str(step).encode()})
  s.write_bytes("index/000002-crashed/x", b"partial")  # a crashed publish, no manifest
  assert pub.prune(s, "index", keep=2) == ["000001", "000002", "000002-crashed", "000003"]
  assert pub.list_versions(s, "index", complete_only=False) == ["000004", "000005"]
  # LATEST rolled back to an older version: it survives even though it is not among the newest
  pub.publish(s, "index", "000003-r", {"x": b"3r"}, allow_older=True)
  assert pub.prune(s, "index", keep=1) == []  # 4 and 5 are newer than LATEST: never touched
  assert pub.list_versions(s, "index") == ["000003-r", "000004", "000005"]
  pub.publish(s, "index", "000006", {"x": b"6"})
  # a newer complete version that lost a race (or is being published) is not pruned
  pub.publish(s, "index", "000009", {"x": b"9"})
  s.write_bytes("index/000010-inflight/x", b"in progress")
  assert pub.prune(s, "index", keep=1) == ["000003-r", "000004", "000005", "000006"]
  assert pub.list_versions(s, "index", complete_only=False) == ["000009", "000010-inflight"]
  assert pub.open_latest(s, "index").version == "000009"
  with pytest.raises(pub.PublishError, match="keep must be >= 1"):
    pub.prune(s, "index", keep=0)


def test_prune_leaves_a_racing_publishers_version_of_latests_step(storage_root):
  """Two publishers of one step: the loser's version has no manifest while it is written (its
  commit removes it when the swap fails); the winner's prune must not delete it under the loser."""
  s = Storage.open(storage_root)
  for step in (1, 2):
    pub.publish(s, "index", f"{step:06d}-a", {"x": b"a"})
  s.write_bytes("index/000002-b/x", b"being written")  # the loser of step 2, mid-upload
  s.write_bytes("index/000001-c/x", b"partial")  # a crashed publish of an older step
  assert pub.prune(s, "index", keep=1) == ["000001-a", "000001-c"]
  assert pub.list_versions(s, "index", complete_only=False) == ["000002-a", "000002-b"]


def test_reader_never_fails_while_publishing_and_pruning(storage_root):
  """The trainer polls open_latest while the refresher publishes and prunes (keep=1), so the
  version a reader resolved can vanish under it: it must follow LATEST, never error."""
  s = Storage.open(storage_root)
  pub.publish(s, "index", "0", {"a": b"0" * 100, "b": b"x"})
  stop, seen, errors = threading.Event(), [], []

  def reader():
    r = Storage.open(storage_root)
    while not stop.is_set():
      try:
        pv = pub.open_latest(r, "index")  # must always succeed
      except Exception as e:  # noqa: BLE001 - any failure here is a bug
        errors.append(e)
        continue
      seen.append(int(pv.version))
      try:
        assert pv.read_bytes("a") == pv.version.encode() * 100
      except pub.CorruptVersion as e:  # pruned after it was opened: the caller re-polls
        if "missing" not in str(e):
          errors.append(e)

  t = threading.Thread(target=reader)
  t.start()
  try:
    for v in range(1, 13):
      pub.publish(s, "index", str(v), {"a": str(v).encode() * 100, "b": b"x"})
      pub.prune(s, "index", keep=1)
  finally:
    stop.set()
    t.join()
  assert not errors, errors[:3]
  assert seen == sorted(seen) and seen, seen[-5:]  # never goes backwards
  assert pub.list_versions(s, "index") == ["12"]
