"""ScaNN searcher: recall against a numpy brute force, exclusions, serialization round trips
through a local directory, every storage backend and a published index version."""

import json
import shutil

import numpy as np
import pytest

from realm_jax import publish
from realm_jax.errors import RealmError
from realm_jax.retrieval import scann_index
from realm_jax.storage import Storage
from tests.helpers.ranking import assert_top_k


def _clustered(n, centers, rng, noise=0.25):
  """Rows near random cluster centres: the shape of real embedding clouds, where trees work."""
  pick = rng.integers(0, len(centers), n)
  return (centers[pick] + noise * rng.standard_normal((n, centers.shape[1]))).astype(np.float32)


def _brute_force(q, db, k):
  scores = q.astype(np.float64) @ db.astype(np.float64).T
  top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
  return np.take_along_axis(top, order, axis=1)


def _recall(ids, ref):
  return np.mean([len(set(a.tolist()) & set(b.tolist())) / ref.shape[1] for a, b in zip(ids, ref)])


@pytest.fixture(scope="module")
def big():
  """100k x 128 clustered corpus, 300 queries, and the searcher built with default settings."""
  rng = np.random.default_rng(0)
  centers = rng.standard_normal((1000, 128)).astype(np.float32)
  db, q = _clustered(100_000, centers, rng), _clustered(300, centers, rng)
  return db, q, scann_index.build_searcher(db)


@pytest.fixture(scope="module")
def small_tree():
  """A 12k-row tree searcher: every file kind of the big one, quick to copy around."""
  rng = np.random.default_rng(1)
  centers = rng.standard_normal((100, 32)).astype(np.float32)
  db, q = _clustered(12_000, centers, rng), _clustered(50, centers, rng)
  index = scann_index.build_searcher(db, scann_index.ScannConfig(training_sample_size=12_000))
  assert index.info.kind == "tree_ah"
  return db, q, index


def test_recall_at_10_vs_brute_force(big):
  db, q, index = big
  assert index.info.kind == "tree_ah" and index.info.num_leaves == 316  # ~sqrt(100k)
  assert (index.info.num_rows, index.info.dim) == (100_000, 128)
  res = index.search(q, 10)
  assert res.ids.shape == res.scores.shape == (300, 10) and res.ids.dtype == np.int32
  recall = _recall(res.ids, _brute_force(q, db, 10))
  # The default searches 20% of the leaves: 0.995 (k-means starts at random: +-0.002 between builds).
  assert recall >= 0.98, recall
  # The scores are exact inner products (float32 reorder), best first.
  # ScaNN's exact float32 reorder vs numpy's: 128-d scores of magnitude ~100, rounding ~1e-4.
  np.testing.assert_allclose(res.scores, np.einsum("bd,bkd->bk", q, db[res.ids]), rtol=1e-4,
                             atol=1e-3)
  assert np.all(np.diff(res.scores, axis=1) <= 1e-5)
  parallel = index.search(q, 10, parallel=True)
  np.testing.assert_array_equal(parallel.ids, res.ids)


def test_exclusions_are_honoured(big):
  db, q, index = big
  ref = _brute_force(q, db, 12)
  exclude = np.stack([ref[:, 0], ref[:, 2], np.full(len(q), -1)], axis=1)
  exclude[0] = -1  # a query with nothing excluded
  res = index.search(q, 10, exclude_ids=exclude)
  for b in range(len(q)):
    assert not set(res.ids[b].tolist()) & set(exclude[b][exclude[b] >= 0].tolist()), b
    assert len(set(res.ids[b].tolist())) == 10
  masked = [[i for i in ref[b] if i not in exclude[b]][:10] for b in range(len(q))]
  assert _recall(res.ids, np.asarray(masked)) >= 0.98
  np.testing.assert_array_equal(res.ids[0], index.search(q[:1], 10).ids[0])
  one_d = index.search(q, 10, exclude_ids=ref[:, 0])  # [B] is one exclusion per query
  assert not np.any(one_d.ids == ref[:, :1])


def test_brute_force_fallback_is_exact_and_pads():
  rng = np.random.default_rng(2)
  db = rng.standard_normal((500, 16)).astype(np.float32)
  q = rng.standard_normal((7, 16)).astype(np.float32)
  index = scann_index.build_searcher(db)
  assert index.info.kind == "brute_force" and index.info.num_leaves == 0
  # Gaussian 16-d rows: scores up to ~50, float32 summation-order error <= 16 * 2^-24 * 50 ~ 5e-5.
  res = index.search(q, 5)
  assert_top_k(res.ids, q, db, 5, atol=1e-4, scores=res.scores)
  tiny = scann_index.build_searcher(db[:6])
  exclude = np.array([[0, -1], [-1, -1]])
  res = tiny.search(q[:2], 8, exclude_ids=exclude)  # 5 and 6 rows left: -1 / -inf after them
  assert_top_k(res.ids, q[:2], db[:6], 8, atol=1e-4, exclude=exclude, scores=res.scores)
  assert np.all(np.isneginf(res.scores[0, 5:])) and np.all(np.isfinite(res.scores[0, :5]))


def test_save_load_local_dir_identical(big, tmp_path):
  _, q, index = big
  saved = scann_index.save_searcher(index, tmp_path / "searcher")
  info = json.loads((saved / scann_index.INFO_FILE).read_text())
  assert info["num_rows"] == 100_000 and info["dim"] == 128 and info["kind"] == "tree_ah"
  assert info["num_leaves"] == 316 and info["reorder"] == index.info.reorder
  assert not list(tmp_path.glob(".searcher.tmp-*"))  # no staging leftovers
  moved = tmp_path / "elsewhere"
  shutil.move(saved, moved)  # relative paths: the directory can move
  loaded = scann_index.load_searcher(moved)
  shutil.rmtree(moved)  # everything is in memory once loaded
  exclude = np.arange(len(q))[:, None]
  for kwargs in [{}, {"exclude_ids": exclude}]:
    a, b = index.search(q, 10, **kwargs), loaded.search(q, 10, **kwargs)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
  assert loaded.info == index.info


def test_storage_round_trip_identical(small_tree, storage_root):
  _, q, index = small_tree
  storage = Storage.open(storage_root)
  names = scann_index.save_to_storage(index, storage, "index/7/scann")
  assert scann_index.INFO_FILE in names and "scann_assets.pbtxt" in names
  assert storage.list("index/7/scann") == [f"index/7/scann/{n}" for n in names]
  loaded = scann_index.load_from_storage(storage, "index/7/scann")
  exclude = np.arange(len(q))[:, None]
  a, b = index.search(q, 10, exclude_ids=exclude), loaded.search(q, 10, exclude_ids=exclude)
  np.testing.assert_array_equal(a.ids, b.ids)
  np.testing.assert_array_equal(a.scores, b.scores)
  with pytest.raises(RealmError, match="already exists"):  # a saved searcher is never replaced
    scann_index.save_to_storage(index, storage, "index/7/scann")


def test_published_version_round_trip(small_tree, tmp_path):
  _, q, index = small_tree
  storage = Storage.open(str(tmp_path / "root"))
  local = scann_index.save_searcher(index, tmp_path / "s")
  publish.publish(storage, "index", publish.new_version(3), publish.files_from_dir(local, "scann"))
  loaded = scann_index.load_published(publish.open_latest(storage, "index"))
  np.testing.assert_array_equal(index.search(q, 10).ids, loaded.search(q, 10).ids)


def test_refuses_bad_directories_and_inputs(small_tree, tmp_path):
  db, q, index = small_tree
  saved = scann_index.save_searcher(index, tmp_path / "s")
  with pytest.raises(RealmError, match="already exists"):
    scann_index.save_searcher(index, saved)
  with pytest.raises(RealmError, match="missing"):
    scann_index.load_searcher(tmp_path / "nowhere")
  (saved / "scann_docids.pkl").write_bytes(b"not loaded")
  with pytest.raises(RealmError, match="pickle"):
    scann_index.load_searcher(saved)
  (saved / "scann_docids.pkl").unlink()
  (saved / scann_index.INFO_FILE).write_text("{\"num_rows\": 3}")
  with pytest.raises(RealmError, match=scann_index.INFO_FILE):
    scann_index.load_searcher(saved)
  with pytest.raises(RealmError, match=r"queries must be \[batch, 32\]"):
    index.search(q[:, :8], 10)
  bad = db[:20].copy()
  bad[13, 4] = np.nan
  with pytest.raises(RealmError, match="row 13 is not finite"):
    scann_index.build_searcher(bad)
