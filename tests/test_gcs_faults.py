"""GCS faults: an index publish, an index load and checkpoint save/restore through a proxy in front of
fake-gcs-server (`tests/helpers/gcs_fault_proxy.py`) that answers 5xx, resets connections, drops
responses after the server acted, and delays. Each test counts the faults the proxy injected and
checks the data against its source.

The code under test runs in a subprocess whose emulator environment points at the proxy
(tensorstore reads its endpoint once per process); the checks read the bucket directly.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np

from realm_jax import publish as pub
from realm_jax.storage import Storage, emulator_environment
from tests.helpers.gcs_fault_proxy import FaultProxy

REPO = pathlib.Path(__file__).resolve().parents[1]


# -- the child process: runs one operation against the root it is given -------------------------


def _child_publish(root: str, src: str, version: str) -> None:
  storage = Storage.open(root)
  pub.publish(storage, "index", version, pub.files_from_dir(src), {"from": "child"})


def _child_load(root: str, out: str) -> None:
  from realm_jax.retrieval import index as index_lib
  loaded = index_lib.load_index(Storage.open(root))
  np.save(out, loaded.embeddings)
  print(json.dumps({"version": loaded.info.version}))


def _model(seed: int):
  import optax
  from flax import nnx

  from realm_jax.models import RealmModel
  from realm_jax.train.config import load_config
  cfg = load_config("smoke", [])
  model = RealmModel(cfg.model, rngs=nnx.Rngs(seed))
  return cfg, model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)


def _params(model) -> dict[str, np.ndarray]:
  from flax import nnx
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in flat}


def _child_save(root: str, step: str, out: str) -> None:
  from realm_jax.train.checkpoints import Checkpoints
  cfg, model, optimizer = _model(int(step))
  ckpt = Checkpoints(Storage.open(root).uri("checkpoints"), keep=10, async_save=False)
  ckpt.remove_leftovers(print)  # as a resumed trainer does
  ckpt.save(int(step), model, optimizer, {"pos": int(step)}, {"config": cfg.to_dict()})
  ckpt.close()
  np.savez(out, **_params(model))


def _child_restore(root: str, steps: str, out: str) -> None:
  """Restores each of `steps` (comma-separated; `latest`: the newest) into a fresh model and saves
  its parameters as `out-<step>.npz`."""
  from realm_jax.train.checkpoints import Checkpoints
  _, model, optimizer = _model(999)
  ckpt = Checkpoints(Storage.open(root).uri("checkpoints"), read_only=True)
  print(json.dumps({"latest": ckpt.latest_step(), "steps": ckpt.all_steps(), "leftovers": ckpt.leftovers()}))
  for step in steps.split(","):
    step = ckpt.latest_step() if step == "latest" else int(step)
    data, meta = ckpt.restore(step, model, optimizer)
    assert data == {"pos": step} and meta["step"] == step, (data, meta)
    np.savez(f"{out}-{step}.npz", **_params(model))


def main(argv: list[str]) -> None:
  from realm_jax import logs
  from realm_jax.errors import RealmError
  logs.configure("info")  # as the CLI does
  try:
    {"publish": _child_publish, "load": _child_load, "save": _child_save,
     "restore": _child_restore}[argv[0]](*argv[1:])
  except RealmError as e:  # what the CLI prints: one line
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _run(proxy: FaultProxy, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
  env = {**os.environ, **emulator_environment(proxy.endpoint), "PYTHONPATH": str(REPO)}
  return subprocess.run(
      [sys.executable, "-c", "import sys; from tests.test_gcs_faults import main; main(sys.argv[1:])",
       *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> None:
  assert proc.returncode == 0, proc.stderr[-4000:]


def _source(tmp_path: pathlib.Path, name: str, seed: int) -> pathlib.Path:
  rng = np.random.default_rng(seed)
  d = tmp_path / name
  (d / "scann").mkdir(parents=True)
  for rel, n in [("a.bin", 3000), ("b.bin", 70_000), ("c.bin", 10), ("scann/config.pb", 500)]:
    (d / rel).write_bytes(rng.bytes(n))
  return d


def _tree(d: pathlib.Path) -> dict[str, bytes]:
  return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def _one_line(proc: subprocess.CompletedProcess) -> str:
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-4000:])
  lines = proc.stderr.strip().splitlines()
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
  for line in lines:  # else only the libraries' own records, one line each (Python's, tensorstore's C++ ones)
    assert line in errors or re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (ERROR|WARNING) |[IWE]\d{4} ", line), (
        proc.stderr[-4000:])
  return errors[0]


# -- the tests ----------------------------------------------------------------------------------


def test_publish_through_5xx_resets_lost_responses_and_delays(gcs_server, tmp_path):
  """Every kind of fault on the writes of one publish: the publish succeeds through the clients'
  retries, LATEST names the new version, and every file is byte for byte its source. A write whose
  response was lost (the server created the object, the client saw a reset) is retried and meets
  its own object: that must not read as another publisher's."""
  root = gcs_server.new_bucket("publish") + "/run"
  storage = Storage.open(root)
  pub.publish(storage, "index", "1", pub.files_from_dir(_source(tmp_path, "v1", 1)))
  src = _source(tmp_path, "v2", 2)
  up = r"^POST /upload/storage/v1/b/[^/]+/o\?.*name=run/index/"
  with FaultProxy(gcs_server.endpoint) as proxy:
    proxy.add("503", up + r"2/a\.bin")
    proxy.add("reset", up + r"2/b\.bin")
    proxy.add("drop", up + r"2/c\.bin")
    proxy.add("delay", up + r"2/scann/config\.pb", delay_s=1.0)
    proxy.add("drop", up + r"2/manifest\.json")
    proxy.add("500", r"^GET /download/.*/run/index/LATEST")
    proxy.add("drop", up + r"LATEST")
    proc = _run(proxy, "publish", root, str(src), "2")
    _ok(proc)
    assert {k: proxy.count(k) for k in ("503", "500", "reset", "drop", "delay")} == {
        "503": 1, "500": 1, "reset": 1, "drop": 3, "delay": 1}, proxy.injected
  assert pub.list_versions(storage, "index") == ["1", "2"]
  latest = pub.open_latest(storage, "index")  # verifies every file against the manifest
  assert latest.version == "2" and latest.metadata == {"from": "child"}
  assert {n: latest.read_bytes(n) for n in latest.manifest.files} == _tree(src)


def test_index_load_through_faults_returns_the_published_embeddings(gcs_server, tmp_path):
  """The trainer's loader (`load_index`) through 5xx, resets, lost responses and delays on every
  kind of read it makes: the embeddings equal a fault-free load's, bit for bit."""
  from realm_jax.retrieval import index as index_lib
  from realm_jax.retrieval.embed import make_embed_fn
  from tests.test_embed import CFG, make_corpus, make_embedder

  root = gcs_server.new_bucket("load") + "/run"
  storage = Storage.open(root)
  corpus = make_corpus(storage, tmp_path, num_docs=6, shard_blocks=4)
  embedder = make_embedder()
  info = index_lib.build_and_publish_index(storage, embedder, corpus, CFG, step=5,
                                           embed_fn=make_embed_fn(embedder, batch_size=8))
  expected = index_lib.load_index(storage).embeddings
  assert len(info.shards) >= 2 and expected.shape[0] == corpus.num_blocks
  with FaultProxy(gcs_server.endpoint) as proxy:
    proxy.add("503", r"^GET /download/.*/run/index/LATEST")
    proxy.add("reset", r"^GET /download/.*/run/index/.*/manifest\.json")
    proxy.add("500", r"^GET /download/.*/run/index/.*/manifest\.json")  # the retried manifest read (after the reset)
    proxy.add("drop", r"^GET /download/.*/run/index/.*/embeddings/", times=1)
    proxy.add("503", r"^GET /download/.*/run/index/.*/embeddings/", after=1)
    proxy.add("delay", r"^GET /download/.*/run/index/.*/embeddings/", delay_s=1.0)
    proc = _run(proxy, "load", root, str(tmp_path / "loaded.npy"))
    _ok(proc)
    assert {k: proxy.count(k) for k in ("503", "500", "reset", "drop", "delay")} == {
        "503": 2, "500": 1, "reset": 1, "drop": 1, "delay": 1}, proxy.injected
    proxy.clear()  # a shard the store refuses (403, not retried): one line naming it
    proxy.add("403", r"^GET /download/.*/run/index/.*/embeddings/emb-00001\.npy", times=None)
    line = _one_line(_run(proxy, "load", root, str(tmp_path / "refused.npy")))
    assert f"{root}/index/{info.version}/embeddings/emb-00001.npy" in line and "403" in line, line
    assert not (tmp_path / "refused.npy").exists()
  assert json.loads(proc.stdout.strip().splitlines()[-1])["version"] == info.version
  np.testing.assert_array_equal(np.load(tmp_path / "loaded.npy"), expected)


def test_a_refused_publish_fails_in_one_line_and_keeps_latest(gcs_server, tmp_path):
  """A store that refuses the LATEST write (403, which no client retries): the publish stops with
  one line naming the gs:// object, and LATEST still names the previous complete version."""
  root = gcs_server.new_bucket("refused") + "/run"
  storage = Storage.open(root)
  v1 = _source(tmp_path, "v1", 1)
  pub.publish(storage, "index", "1", pub.files_from_dir(v1))
  up = r"^POST /upload/storage/v1/b/[^/]+/o\?.*name=run/"
  with FaultProxy(gcs_server.endpoint) as proxy:
    proxy.add("403", up + r"index/LATEST", times=None)
    line = _one_line(_run(proxy, "publish", root, str(_source(tmp_path, "v2", 2)), "2"))
    assert f"{root}/index/LATEST" in line and "403" in line, line
    assert proxy.count("403") >= 1
    latest = pub.open_latest(storage, "index")
    assert latest.version == "1" and {n: latest.read_bytes(n) for n in latest.manifest.files} == _tree(v1)


def test_checkpoint_save_and_restore_through_faults(gcs_server, tmp_path):
  """A trainer checkpoint written and read back through 5xx, resets, lost responses and delays on
  orbax/tensorstore's requests and on the checksum manifest: the restored parameters equal the
  saved model's, and the step is sealed and verifies. A save the store refuses (403 on its data,
  which no client retries) stops in one line naming the gs:// path and the last good step; the
  half-written step is never restored, and a resumed save removes it and writes the step again."""
  from realm_jax.train import sealing
  from realm_jax.train.checkpoints import Checkpoints

  root = gcs_server.new_bucket("ckpt") + "/run"
  up = r"^POST /upload/storage/v1/b/[^/]+/o\?.*name=run/checkpoints/"
  with FaultProxy(gcs_server.endpoint, seed=3) as proxy:
    proxy.add("503", up + r"2/.*/d/", times=2)
    proxy.add("reset", up + r"2/.*/d/", times=1)
    proxy.add("503", up + r"2/realm_manifest\.json")
    proxy.add("drop", up + r"2/realm_manifest\.json")
    proxy.add("delay", up + r"2/meta/", delay_s=0.5)
    _ok(_run(proxy, "save", root, "2", str(tmp_path / "saved-2.npz")))
    assert {k: proxy.count(k) for k in ("503", "reset", "drop", "delay")} == {
        "503": 3, "reset": 1, "drop": 1, "delay": 1}, proxy.injected
    sealing.verify(Storage.open(root + "/checkpoints"), 2, None)

    proxy.clear()
    proxy.add("403", up + r"4/.*/d/", times=None)
    line = _one_line(_run(proxy, "save", root, "4", str(tmp_path / "refused.npz")))
    assert proxy.count("403") >= 1
    assert f"{root}/checkpoints" in line and "step 4" in line, line
    assert "the newest complete checkpoint is step 2" in line, line
    ckpt = Checkpoints(f"{root}/checkpoints", read_only=True)
    assert (ckpt.latest_step(), ckpt.all_steps(), ckpt.leftovers()) == (2, [2], {"4": 4})
    proxy.clear()
    # Saved again as a resumed trainer does, the half-written step removed first. (Orbax's own
    # gcsfs instance had cached the listing: it saw the removed directory and failed with
    # `FileNotFoundError: gs://.../checkpoints/4`.)
    proc = _run(proxy, "save", root, "4", str(tmp_path / "saved-4.npz"))
    _ok(proc)
    assert "an unfinished write of checkpoint step 4" in proc.stdout, proc.stdout

    get = r"^GET /.*run/checkpoints/[24]/"
    before = len(proxy.injected)
    proxy.add("503", get + r".*/d/", times=2)
    proxy.add("reset", get + r".*/d/", times=1)
    proxy.add("500", get + r"realm_manifest\.json")
    proxy.add("delay", get + r"meta/", delay_s=0.5)
    proc = _run(proxy, "restore", root, "2,latest", str(tmp_path / "restored"))
    _ok(proc)
    assert collections.Counter(i.kind for i in proxy.injected[before:]) == {
        "503": 2, "500": 1, "reset": 1, "delay": 1}, proxy.injected[before:]
  assert json.loads(proc.stdout.strip().splitlines()[0]) == {"latest": 4, "steps": [2, 4], "leftovers": {}}
  for step in (2, 4):
    saved, restored = np.load(tmp_path / f"saved-{step}.npz"), np.load(tmp_path / f"restored-{step}.npz")
    assert sorted(saved.files) == sorted(restored.files) and len(saved.files) > 10
    for name in saved.files:
      np.testing.assert_array_equal(restored[name], saved[name], err_msg=f"step {step}: {name}")
