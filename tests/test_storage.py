"""Storage on a local directory, a real fake-gcs-server and memory://: round trips, create-only
writes, compare-and-swap, crash atomicity, cross-process visibility, orbax on gs://."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import ml_dtypes
import numpy as np
import pytest

from realm_jax import storage as storage_lib
from realm_jax.errors import RealmError
from realm_jax.storage import GenerationMismatch, ObjectExists, ObjectNotFound, Storage, StorageError

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_bytes_json_array_round_trip(storage_root):
  s = Storage.open(storage_root)
  blob = os.urandom(70_001)
  info = s.write_bytes("a/b/blob.bin", blob)
  assert info.size == len(blob) and info.crc32c == storage_lib.crc32c_hex(blob)
  assert s.read_bytes("a/b/blob.bin") == blob
  assert s.stat("a/b/blob.bin").size == len(blob)
  assert s.stat("a/b/missing") is None and s.stat("a/b") is None  # a prefix is not an object

  obj = {"name": "ünïcode", "ints": [1, 2, 3], "nested": {"x": 1.5, "none": None}}
  s.write_json("meta.json", obj)
  assert s.read_json("meta.json") == obj

  rng = np.random.default_rng(0)
  arrays = {"f32": rng.normal(size=(7, 5)).astype(np.float32),
            "i64": rng.integers(-2**40, 2**40, size=(3, 2, 4)),
            "empty": np.zeros((0, 128), np.float16), "scalar": np.array(3.25)}
  for name, a in arrays.items():
    s.write_array(f"arr/{name}.npy", a)
  for name, a in arrays.items():
    b = s.read_array(f"arr/{name}.npy")
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b), name
  bf = rng.normal(size=(4, 3)).astype(ml_dtypes.bfloat16)
  s.write_array("arr/bf16.npy", bf)
  back = s.read_array("arr/bf16.npy", dtype=ml_dtypes.bfloat16)
  assert back.dtype == bf.dtype and np.array_equal(back.view(np.uint16), bf.view(np.uint16))


def test_byte_range_reads(storage_root):
  s = Storage.open(storage_root)
  blob = os.urandom(100_003)
  info = s.write_bytes("big/blob.bin", blob)
  for start, length in [(0, 10), (5, 70_000), (99_990, 13), (99_990, 500), (100_003, 7), (123, 0)]:
    assert s.read_range("big/blob.bin", start, length) == blob[start:start + length], (start, length)
  if info.generation is not None:  # GCS: pinned to the object's version
    assert s.read_range("big/blob.bin", 7, 9, generation=info.generation) == blob[7:16]
    with pytest.raises(ObjectNotFound):
      s.read_range("big/blob.bin", 7, 9, generation=info.generation + 1)
  with pytest.raises(ObjectNotFound):
    s.read_range("big/missing.bin", 0, 4)
  with pytest.raises(StorageError, match="bad byte range"):
    s.read_range("big/blob.bin", -1, 4)


def test_list_listdir_exists_delete(storage_root):
  s = Storage.open(storage_root)
  names = ["index/1/a.npy", "index/1/sub/b.bin", "index/10/a.npy", "index/LATEST", "top.txt"]
  for n in names:
    s.write_bytes(n, n.encode())
  assert s.list() == sorted(names)
  assert s.list("index/1") == ["index/1/a.npy", "index/1/sub/b.bin"]  # not index/10
  assert s.listdir() == ["index", "top.txt"]
  assert s.listdir("index") == ["1", "10", "LATEST"]
  assert s.listdir("nothing/here") == [] and s.list("nothing") == []
  assert s.exists("index/1") and s.exists("top.txt") and not s.exists("index/2")
  assert s.delete("index/1") == 2  # a prefix, recursively; a sibling sharing a name prefix stays
  assert s.list("index") == ["index/10/a.npy", "index/LATEST"]
  assert s.delete("top.txt") == 1 and s.delete("top.txt") == 0
  assert s.list() == ["index/10/a.npy", "index/LATEST"]


def test_exclusive_write_never_overwrites(storage_root, tmp_path):
  s = Storage.open(storage_root)
  s.write_bytes("x.bin", b"first", exclusive=True)
  with pytest.raises(ObjectExists, match="x.bin") as e:
    s.write_bytes("x.bin", b"second", exclusive=True)
  assert isinstance(e.value, RealmError) and isinstance(e.value, FileExistsError)
  local = tmp_path / "src.bin"
  local.write_bytes(b"third")
  with pytest.raises(ObjectExists):
    s.put_file(local, "x.bin", exclusive=True)
  with pytest.raises(ObjectExists):
    s.write_json("x.bin", {"a": 1}, exclusive=True)
  assert s.read_bytes("x.bin") == b"first"
  s.write_bytes("x.bin", b"overwrite")  # non-exclusive writes replace
  assert s.read_bytes("x.bin") == b"overwrite"


def test_large_exclusive_upload(storage_root, tmp_path):
  """Above 8 MiB google-cloud-storage switches to a resumable upload, where fake-gcs-server
  ignores ifGenerationMatch (real GCS honours it): create-only must still hold."""
  big = tmp_path / "big.bin"
  data = os.urandom(9 << 20)
  big.write_bytes(data)
  s = Storage.open(storage_root)
  info = s.put_file(big, "v/big.bin", exclusive=True)
  assert (info.size, info.crc32c) == storage_lib.file_crc32c(big)
  with pytest.raises(ObjectExists):
    s.put_file(big, "v/big.bin", exclusive=True)
  with pytest.raises(ObjectExists):
    s.write_bytes("v/big.bin", data[:100], exclusive=True)
  assert s.stat("v/big.bin").size == len(data)
  assert s.get_file("v/big.bin", tmp_path / "back.bin").read_bytes() == data


def test_compare_and_swap(storage_root):
  s = Storage.open(storage_root)
  assert s.read_with_generation("ptr") == (None, 0)
  s.write_bytes("ptr", b"v1", if_generation_match=0)
  data, g1 = s.read_with_generation("ptr")
  assert data == b"v1" and g1 != 0
  with pytest.raises(ObjectExists):
    s.write_bytes("ptr", b"v1b", if_generation_match=0)
  s.write_bytes("ptr", b"v2", if_generation_match=g1)
  with pytest.raises(GenerationMismatch, match="ptr"):  # stale generation loses
    s.write_bytes("ptr", b"v3", if_generation_match=g1)
  data, g2 = s.read_with_generation("ptr")
  assert data == b"v2" and g2 != g1
  assert s.read_bytes("ptr", generation=g2) == b"v2"
  with pytest.raises(ObjectNotFound):  # reads pinned to a replaced generation fail
    s.read_bytes("ptr", generation=g1)


def test_missing_and_invalid_paths(storage_root):
  s = Storage.open(storage_root)
  with pytest.raises(ObjectNotFound, match="nope.bin") as e:
    s.read_bytes("dir/nope.bin")
  assert isinstance(e.value, FileNotFoundError)
  for bad in ["../escape", "/abs", "a//b", "a/./b", ""]:
    with pytest.raises(StorageError, match="invalid storage path"):
      s.write_bytes(bad, b"x")
  with pytest.raises(StorageError, match="invalid storage path"):
    s.delete("")  # refusing to wipe the whole root


def test_json_and_array_errors_name_the_file(storage_root):
  s = Storage.open(storage_root)
  s.write_bytes("bad.json", b'{"a": 1,,}')
  with pytest.raises(StorageError, match=r"bad\.json: not valid JSON.*line 1"):
    s.read_json("bad.json")
  with pytest.raises(StorageError, match="not JSON-serialisable"):
    s.write_json("nan.json", {"loss": float("nan")})
  assert not s.exists("nan.json")
  with pytest.raises(StorageError, match="without pickle"):
    s.write_array("obj.npy", np.array([{"a": 1}], dtype=object))
  s.write_bytes("junk.npy", b"not an array")
  with pytest.raises(StorageError, match=r"junk\.npy: not a valid \.npy"):
    s.read_array("junk.npy")


def test_upload_and_download_dir(storage_root, tmp_path):
  src = tmp_path / "src"
  files = {"dataset.npy": os.urandom(1000), "sub/hashed.npy": os.urandom(33),
           "sub/deeper/scann_config.pb": b"cfg"}
  for rel, data in files.items():
    (src / rel).parent.mkdir(parents=True, exist_ok=True)
    (src / rel).write_bytes(data)
  s = Storage.open(storage_root)
  infos = s.upload_dir(src, "index/7/scann")
  assert sorted(infos) == sorted(files)
  assert s.list("index/7/scann") == sorted(f"index/7/scann/{r}" for r in files)
  out = s.download_dir("index/7/scann", tmp_path / "dst")
  got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
  assert got == files
  with pytest.raises(ObjectNotFound):
    s.download_dir("index/8", tmp_path / "none")


def test_uri_and_roots(tmp_path):
  root = tmp_path / "r"
  a, b = Storage.open(str(root)), Storage.open(f"file://{root}")
  a.write_bytes("k/v.txt", b"same root")
  assert b.read_bytes("k/v.txt") == b"same root"
  assert a.uri("k/v.txt") == str(root / "k/v.txt") and a.local_path("k") == root / "k"
  assert Storage.open("gs://bkt/run/").uri("x/y") == "gs://bkt/run/x/y"
  assert Storage.open("gs://bkt").uri("x") == "gs://bkt/x"
  with pytest.raises(StorageError, match="not a local directory"):
    Storage.open("memory://m").local_path()
  with pytest.raises(StorageError, match="unsupported storage URI"):
    Storage.open("s3://bucket/x")


def test_local_write_is_atomic_when_the_writer_is_killed(tmp_path):
  """SIGKILL a process in the middle of a large write: the final name never appears."""
  root = tmp_path / "root"
  big = tmp_path / "big.bin"
  with open(big, "wb") as f:
    f.truncate(400 << 20)  # sparse: cheap to create, slow enough to copy
  script = textwrap.dedent(f"""
      from realm_jax.storage import Storage
      Storage.open({str(root)!r}).put_file({str(big)!r}, "index/1/big.bin", exclusive=True)
      """)
  proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
  deadline = time.monotonic() + 60
  target_dir = root / "index" / "1"
  while not (target_dir.is_dir() and any(p.name.startswith(".realm-tmp-") and p.stat().st_size
                                         for p in target_dir.iterdir())):
    assert proc.poll() is None, "writer finished before it could be interrupted"
    assert time.monotonic() < deadline
    time.sleep(0.005)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  s = Storage.open(root)
  assert not (target_dir / "big.bin").exists()
  assert s.list() == [] and not s.exists("index/1/big.bin")  # the temp file is never listed
  s.put_file(big, "index/1/big.bin", exclusive=True)  # and a retry succeeds
  assert s.stat("index/1/big.bin").size == 400 << 20


def test_other_processes_see_writes(shared_storage_root):
  """A subprocess (inheriting the emulator environment) and this process share one root; no
  listing cache hides the other's writes."""
  s = Storage.open(shared_storage_root)
  s.write_bytes("from_parent/a.txt", b"parent")
  assert s.list() == ["from_parent/a.txt"]  # populate any listing cache first
  script = textwrap.dedent(f"""
      from realm_jax.storage import Storage
      s = Storage.open({shared_storage_root!r})
      assert s.read_bytes("from_parent/a.txt") == b"parent"
      s.write_bytes("from_child/b.txt", b"child")
      s.delete("from_parent/a.txt")
      """)
  subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=120)
  assert s.list() == ["from_child/b.txt"]
  assert s.listdir() == ["from_child"]
  assert s.read_bytes("from_child/b.txt") == b"child"


def test_emulator_environment_is_validated(gcs_server, monkeypatch):
  assert os.environ["STORAGE_EMULATOR_HOST"] == gcs_server.endpoint
  storage_lib.check_emulator_environment()  # the fixture's environment is complete
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "http://127.0.0.1:1")
  with pytest.raises(StorageError, match="TENSORSTORE_GCS_HTTP_URL"):
    Storage.open(gcs_server.new_bucket())
  monkeypatch.delenv("EPATH_USE_TF")
  with pytest.raises(StorageError, match="EPATH_USE_TF"):
    storage_lib.check_emulator_environment()


def test_orbax_checkpoint_manager_round_trip(shared_storage_root):
  """The trainer's checkpoints: orbax CheckpointManager on gs:// (tensorstore + gcsfs through the
  emulator) and on a local root: save two steps, keep one, restore exactly."""
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  s = Storage.open(shared_storage_root)
  state = {"params": {"w": jnp.arange(24, dtype=jnp.float32).reshape(4, 6),
                      "b": jnp.ones((6,), jnp.bfloat16)},
           "step": jnp.array(7, jnp.int32)}
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
  with ocp.CheckpointManager(s.uri("checkpoints"), options=options) as mngr:
    mngr.save(1, args=ocp.args.StandardSave(jax.tree.map(lambda x: x * 0, state)))
    mngr.save(2, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()
  assert any(p.startswith("checkpoints/2/") for p in s.list("checkpoints"))
  assert not s.exists("checkpoints/1")  # max_to_keep=1 deleted it through the same storage
  with ocp.CheckpointManager(s.uri("checkpoints")) as reader:
    assert reader.latest_step() == 2
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = reader.restore(2, args=ocp.args.StandardRestore(abstract))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_local_writes_survive_a_concurrent_delete_of_their_directory(tmp_path):
  """A second process deletes a directory over and over (a publisher cleaning staged files) while
  this one writes create-only into it: every write either lands whole or raises ObjectNotFound
  (a FileNotFoundError, which a publisher of the same step treats as "the other one won"), never
  another error. pathlib's `mkdir(exist_ok=True)` raises FileExistsError when the directory it
  found present is gone by the time it checks; that must not surface."""
  root = tmp_path / "root"
  s = Storage.open(root)
  script = textwrap.dedent(f"""
      import pathlib, time
      from realm_jax.storage import Storage, StorageError
      s = Storage.open({str(root)!r})
      pathlib.Path({str(tmp_path / "deleting")!r}).touch()
      while True:  # until killed
        try:
          s.delete("work/job")
        except StorageError:  # "Directory not empty": a file landed while it was deleting
          pass
        time.sleep(0.0005)
      """)
  proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
  try:
    deadline = time.monotonic() + 120
    while not (tmp_path / "deleting").exists():
      assert proc.poll() is None and time.monotonic() < deadline
      time.sleep(0.01)
    landed = missing = 0
    while landed + missing < 5000 or not (landed and missing):  # the deletes interleave with the writes
      path = f"work/job/emb-{landed + missing:06d}.npy"
      try:
        s.write_bytes(path, b"x" * 100, exclusive=True)
        landed += 1
      except ObjectNotFound:
        missing += 1
      assert time.monotonic() < deadline, (landed, missing)
  finally:
    proc.kill()
    proc.wait()
  s.write_bytes("work/job/after.npy", b"y", exclusive=True)
  assert s.read_bytes("work/job/after.npy") == b"y"
