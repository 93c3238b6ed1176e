"""Sharded device MIPS on 8 emulated CPU devices against a numpy float64 brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from realm_jax.errors import RealmError
from realm_jax.retrieval import mips
from tests.helpers.ranking import assert_top_k


def _reference(q, db, k, exclude=None):
  """Brute force in float64: (ids, scores) of the k best non-excluded rows, best first."""
  scores = q.astype(np.float64) @ db.astype(np.float64).T
  if exclude is not None:
    for b, row in enumerate(exclude):
      scores[b, row[row >= 0]] = -np.inf
  ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  scores = np.take_along_axis(scores, ids, axis=1)
  pad = ((0, 0), (0, k - ids.shape[1]))  # k larger than the corpus: nothing left to return
  return np.pad(ids, pad, constant_values=-1), np.pad(scores, pad, constant_values=-np.inf)


def _check(result, q, db, k, exclude=None):
  """Exact up to near-ties: the returned scores are the k best, and each id really has its score.

  Tolerance: Gaussian rows of <= 32 dims give scores of magnitude <= ~30; a float32 dot product is
  off by at most 32 * 2^-24 * 30 ~ 6e-5 depending on the kernel's summation order (tiles, SIMD
  width), so 1e-4 absolute (plus 1e-5 relative) separates rounding from a wrong row."""
  ids, scores = np.asarray(result.ids), np.asarray(result.scores)
  assert ids.shape == scores.shape == (q.shape[0], k) and ids.dtype == np.int32
  ref_ids, ref_scores = _reference(q, db, k, exclude)
  valid = np.isfinite(ref_scores)
  np.testing.assert_array_equal(ids == -1, ~valid)  # -1 exactly where no row is left
  np.testing.assert_allclose(np.where(valid, scores, 0), np.where(valid, ref_scores, 0),
                             rtol=1e-5, atol=1e-4)
  assert np.all(np.isneginf(scores[~valid]))
  # The returned scores are those of the returned rows: float64 truth, same rounding bound as above.
  true = np.einsum("bd,bkd->bk", q.astype(np.float64), db[np.maximum(ids, 0)].astype(np.float64))
  np.testing.assert_allclose(scores[valid], true[valid], rtol=1e-5, atol=1e-4)
  for b in range(q.shape[0]):
    got = ids[b][ids[b] >= 0]
    assert len(set(got.tolist())) == len(got), f"query {b}: duplicate ids {got}"
    assert got.max(initial=-1) < db.shape[0], f"query {b}: padding row returned"
    if exclude is not None:
      assert not set(got.tolist()) & set(exclude[b].tolist()), f"query {b}: excluded id returned"
  assert_top_k(ids, q, db, k, atol=1e-4, exclude=exclude)  # near-ties aside, the same ids in the same order


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  db = rng.standard_normal((10_003, 32)).astype(np.float32)  # 10_003 = 8 * 1250 + 3
  q = rng.standard_normal((16, 32)).astype(np.float32)
  return q, db


MESHES = [((8,), ("rows",)), ((2, 4), ("data", "model"))]


@pytest.mark.parametrize("shape,axes", MESHES)
def test_exact_on_8_devices_rows_not_divisible(data, shape, axes):
  q, db = data
  mesh = jax.make_mesh(shape, axes)
  index = mips.shard_rows(db, mesh)
  assert index.num_rows == 10_003 and index.embeddings.shape == (10_008, 32)
  assert index.num_shards == 8 and len(index.embeddings.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(index.embeddings)[10_003:], 0)  # zero padding rows
  # Tiles of 256 rows: 4 full tiles + a 226-row remainder per 1251-row shard.
  _check(mips.search(jnp.asarray(q), index, 10, chunk_rows=256), q, db, 10)


def test_all_negative_scores_never_return_padding():
  rng = np.random.default_rng(1)
  db = np.abs(rng.standard_normal((13, 8))).astype(np.float32)  # padded to 16 rows of zeros
  q = -np.abs(rng.standard_normal((3, 8))).astype(np.float32)  # every real score < 0
  index = mips.shard_rows(db, jax.make_mesh((8,), ("rows",)))
  _check(mips.search(jnp.asarray(q), index, 13), q, db, 13)
  _check(mips.search(jnp.asarray(q), index, 16), q, db, 16)  # more than exists: -1 / -inf


@pytest.mark.parametrize("approx", [False, True])
def test_exclusions(data, approx):
  q, db = data
  index = mips.shard_rows(db, jax.make_mesh((2, 4), ("data", "model")))
  ref_ids, _ = _reference(q, db, 8)
  exclude = np.stack([ref_ids[:, 0], ref_ids[:, 3], np.full(len(q), -1)], axis=1).astype(np.int32)
  exclude[0] = [-1, -1, -1]  # a query without exclusions
  res = mips.search(jnp.asarray(q), index, 8, exclude_ids=exclude, chunk_rows=512,
                    approx=approx)
  _check(res, q, db, 8, exclude)
  one = mips.search(jnp.asarray(q), index, 8, exclude_ids=ref_ids[:, 0], chunk_rows=512)  # [B]
  _check(one, q, db, 8, ref_ids[:, :1])


def test_k_larger_than_a_shard():
  rng = np.random.default_rng(2)
  db = rng.standard_normal((50, 16)).astype(np.float32)  # 7 rows per shard, padded to 56
  q = rng.standard_normal((5, 16)).astype(np.float32)
  index = mips.shard_rows(db, jax.make_mesh((8,), ("rows",)))
  _check(mips.search(jnp.asarray(q), index, 20), q, db, 20)  # 20 > 7 rows per shard
  exclude = np.tile(np.arange(5, dtype=np.int32), (5, 1))
  _check(mips.search(jnp.asarray(q), index, 48, exclude_ids=exclude), q, db, 48, exclude)
  _check(mips.search(jnp.asarray(q), index, 60, precision="highest"), q, db, 60)  # > corpus


def test_group_filter_with_tiny_groups_and_tiles(data):
  q, db = data  # many groups per tile, k groups rescored: the exactness argument, stressed
  db = db.copy()
  # Queries 0 and 1: all 12 best rows in one shard, one per group (so 12 groups are needed).
  db[100:292:16] = q[0] * np.linspace(3, 4, 12, dtype=np.float32)[:, None]
  db[5000:5192:16] = q[1] * np.linspace(3, 4, 12, dtype=np.float32)[:, None]
  index = mips.shard_rows(db, jax.make_mesh((8,), ("rows",)))
  for chunk, group in [(64, 4), (1000, 7), (100_000, 16)]:
    _check(mips.search(jnp.asarray(q), index, 12, chunk_rows=chunk, group_size=group), q, db, 12)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_inside_jit_with_batch_sharded_over_data(data, axis_type):
  q, db = data
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
  index = mips.shard_rows(db, mesh)
  rng = np.random.default_rng(3)
  w = rng.standard_normal((32, 32)).astype(np.float32) / np.sqrt(32)
  exclude = rng.integers(-1, 10_003, (16, 2)).astype(np.int32)
  batch = NamedSharding(mesh, P("data"))

  @jax.jit
  def step(x, w, index, exclude):  # a train step: queries computed from the sharded batch
    queries = jnp.tanh(x @ w)
    res = mips.search(queries, index, 8, exclude_ids=exclude, chunk_rows=300)
    return queries, res

  queries, res = step(jax.device_put(q, batch), jnp.asarray(w), index,
                      jax.device_put(exclude, batch))
  _check(res, np.asarray(queries), db, 8, exclude)
  if axis_type == AxisType.Explicit:  # the result is sharded like the query batch
    assert res.ids.sharding.spec[0] == "data"
    # Batch over both axes, exclusions replicated (resharded inside to match the queries).
    both = NamedSharding(mesh, P(("data", "model")))
    queries, res = step(jax.device_put(q, both), jnp.asarray(w), index, jnp.asarray(exclude))
    _check(res, np.asarray(queries), db, 8, exclude)
    assert res.ids.sharding.spec[0] == ("data", "model")


def test_rows_sharded_over_model_only(data):
  q, db = data  # rows replicated over `data`: each data group searches its own queries
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  index = mips.shard_rows(db, mesh, row_axes="model")
  assert index.num_shards == 4 and index.embeddings.shape == (10_004, 32)
  res = jax.jit(lambda q, i: mips.search(q, i, 6, chunk_rows=512))(
      jax.device_put(q, NamedSharding(mesh, P("data"))), index)
  _check(res, q, db, 6)


def test_approx_max_k_recall():
  rng = np.random.default_rng(4)
  db = rng.standard_normal((20_000, 64)).astype(np.float32)
  q = rng.standard_normal((32, 64)).astype(np.float32)
  index = mips.shard_rows(db, jax.make_mesh((8,), ("rows",)))
  res = mips.search(jnp.asarray(q), index, 10, approx=True, recall_target=0.95, chunk_rows=1024)
  ref_ids, _ = _reference(q, db, 10)
  ids = np.asarray(res.ids)
  recall = np.mean([len(set(ids[b]) & set(ref_ids[b])) / 10 for b in range(len(q))])
  assert recall >= 0.95, recall
  # Approximate top-k chooses rows approximately but scores them exactly: float32 dot products of
  # 64 dims differ from numpy's by summation order only (~64 * 2^-24 * |score|), well under 1e-4.
  true = np.einsum("bd,bkd->bk", q, db[ids])
  np.testing.assert_allclose(np.asarray(res.scores), true, rtol=1e-4, atol=1e-4)


def test_bfloat16_embeddings():
  rng = np.random.default_rng(5)
  db = rng.standard_normal((3_001, 32)).astype(np.float32)
  q = rng.standard_normal((4, 32)).astype(np.float32)
  index = mips.shard_rows(db, jax.make_mesh((8,), ("rows",)), dtype=jnp.bfloat16)
  assert index.embeddings.dtype == jnp.bfloat16
  res = mips.search(jnp.asarray(q), index, 5, chunk_rows=128)
  def as_bf16(a):
    return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))
  _check(res, as_bf16(q), as_bf16(db), 5)


def test_place_rows_loads_only_requested_rows():
  db = np.arange(21 * 4, dtype=np.float32).reshape(21, 4)
  calls = []

  def load(start, stop):
    calls.append((start, stop))
    return db[start:stop]

  index = mips.place_rows(21, 4, load, jax.make_mesh((8,), ("rows",)))
  assert index.embeddings.shape == (24, 4) and index.num_rows == 21
  assert sorted(set(calls)) == [(i * 3, i * 3 + 3) for i in range(7)]  # none for padding
  np.testing.assert_array_equal(np.asarray(index.embeddings)[:21], db)
  with pytest.raises(RealmError, match=r"load_rows\(0, 3\) returned shape \(2, 4\)"):
    mips.place_rows(21, 4, lambda a, b: db[a:b - 1], jax.make_mesh((8,), ("rows",)))


def test_bad_arguments_raise_clear_errors(data):
  q, db = data
  index = mips.shard_rows(db[:100], jax.make_mesh((8,), ("rows",)))
  with pytest.raises(RealmError, match=r"queries must be \[batch, 32\], got shape \(16, 31\)"):
    mips.search(jnp.asarray(q[:, :31]), index, 3)
  with pytest.raises(RealmError, match="precision must be"):
    mips.search(jnp.asarray(q), index, 3, precision="fp8")
  with pytest.raises(RealmError, match="k must be >= 1"):
    mips.search(jnp.asarray(q), index, 0)
  with pytest.raises(RealmError, match=r"exclude_ids must be \[16, E\]"):
    mips.search(jnp.asarray(q), index, 3, exclude_ids=np.zeros((15, 1), np.int32))
  with pytest.raises(RealmError, match=r"row_axes \['nope'\] are not axes"):
    mips.shard_rows(db, jax.make_mesh((8,), ("rows",)), row_axes="nope")
