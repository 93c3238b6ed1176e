"""grain loader: determinism, per-epoch shuffling, disjoint process shards, exact resumption."""

import json
import time

import numpy as np
import pytest

from realm_jax.data import masking, pipeline
from tests.test_masking import SPECIAL, wikipedia_blocks


class Records:
  """A random-access source (len + __getitem__) that is not a Python list."""

  def __init__(self, n: int):
    self.n = n

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> int:
    if not 0 <= i < self.n:
      raise IndexError(i)
    return i


def noisy(x: int, rng: np.random.Generator):
  """Drops every 5th record and draws a random number, like a masker would."""
  if x % 5 == 0:
    return None
  return {"x": np.int64(x), "r": rng.integers(1 << 30)}


def plain(x: int, rng: np.random.Generator):
  return {"x": np.int64(x)}


def take(loader, n):
  return [next(loader) for _ in range(n)]


def same(a: list, b: list) -> bool:
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_same_seed_same_batches_other_seed_other_batches():
  with pipeline.make_loader(Records(200), noisy, 8, seed=3, shard_index=0, shard_count=1) as a, \
       pipeline.make_loader(Records(200), noisy, 8, seed=3, shard_index=0, shard_count=1) as b, \
       pipeline.make_loader(Records(200), noisy, 8, seed=4, shard_index=0, shard_count=1) as c:
    first, second, other = take(a, 12), take(b, 12), take(c, 12)
  assert same(first, second)
  assert not same(first, other)
  assert all(batch["x"].shape == (8,) and batch["x"].dtype == np.int64 for batch in first)
  assert all((batch["x"] % 5 != 0).all() for batch in first)  # None examples are dropped


def test_each_epoch_is_a_fresh_permutation():
  n, bs = 40, 4
  with pipeline.make_loader(Records(n), plain, bs, seed=0, num_epochs=3, shard_index=0, shard_count=1) as loader:
    xs = np.concatenate([batch["x"] for batch in loader])
  assert len(xs) == 3 * n
  epochs = xs.reshape(3, n)
  for epoch in epochs:
    assert sorted(epoch) == list(range(n))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  assert not np.array_equal(epochs[0], np.arange(n))
  with pipeline.make_loader(Records(n), plain, bs, seed=0, num_epochs=1, shuffle=False,
                            shard_index=0, shard_count=1) as ordered:
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in ordered]), np.arange(n))


def test_transform_randomness_differs_between_epochs():
  with pipeline.make_loader(Records(16), noisy, 4, seed=1, num_epochs=2, shuffle=False,
                            shard_index=0, shard_count=1) as loader:
    batches = list(loader)
  assert len(batches) == 6  # 12 kept records per epoch, 3 batches each
  first = {int(x): int(r) for b in batches[:3] for x, r in zip(b["x"], b["r"])}
  second = {int(x): int(r) for b in batches[3:] for x, r in zip(b["x"], b["r"])}
  assert first.keys() == second.keys() and first != second


@pytest.mark.parametrize("stop_after", [1, 7, 13])
def test_state_round_trips_through_json(stop_after):
  kwargs = dict(batch_size=6, seed=11, shard_index=1, shard_count=2)
  with pipeline.make_loader(Records(50), noisy, **kwargs) as reference:
    expected = take(reference, stop_after + 10)  # 20 kept records per epoch: crosses epochs
  with pipeline.make_loader(Records(50), noisy, **kwargs) as interrupted:
    head = take(interrupted, stop_after)
    time.sleep(0.05)  # let the prefetch threads run ahead of what was consumed
    saved = json.dumps(interrupted.get_state())
  assert same(head, expected[:stop_after])
  with pipeline.make_loader(Records(50), noisy, **kwargs) as resumed:
    resumed.set_state(json.loads(saved))
    assert same(take(resumed, 10), expected[stop_after:])


def test_state_from_another_configuration_is_refused():
  with pipeline.make_loader(Records(50), plain, 4, seed=1, shard_index=0, shard_count=2) as loader:
    next(loader)
    state = loader.get_state()
  with pipeline.make_loader(Records(50), plain, 4, seed=2, shard_index=0, shard_count=2) as other:
    with pytest.raises(pipeline.LoaderStateError, match="seed: saved 1 != now 2"):
      other.set_state(state)
  with pipeline.make_loader(Records(50), plain, 4, seed=1, shard_index=1, shard_count=2) as other:
    with pytest.raises(pipeline.LoaderStateError, match="shard_index"):
      other.set_state(state)
    with pytest.raises(pipeline.LoaderStateError, match="not a loader state"):
      other.set_state({"next_index": 3})


def test_processes_get_disjoint_equal_shards():
  n, count = 103, 4
  seen = []
  for index in range(count):
    with pipeline.make_loader(Records(n), plain, 5, seed=0, num_epochs=1, shard_index=index,
                              shard_count=count, drop_remainder=False) as loader:
      seen.append({int(x) for b in loader for x in b["x"]})
  assert [len(s) for s in seen] == [n // count] * count
  for i in range(count):
    for j in range(i + 1, count):
      assert not seen[i] & seen[j]
  assert set().union(*seen) == set(range(n // count * count))
  assert [pipeline.shard_indices(n, i, count) for i in range(count)] == [range(0, 25), range(25, 50), range(50, 75),
                                                                         range(75, 100)]  # contiguous runs
  assert seen[3] == set(range(75, 100))
  with pytest.raises(Exception, match="too few"):
    pipeline.make_loader(Records(3), plain, 1, seed=0, shard_index=0, shard_count=4)


def test_default_shard_is_the_jax_process():
  import jax

  with pipeline.make_loader(Records(10), plain, 2, seed=0, num_epochs=1) as loader:
    config = loader.config
    xs = sorted(int(x) for b in loader for x in b["x"])
  assert (config["shard_index"], config["shard_count"]) == (jax.process_index(), jax.process_count())
  assert xs == list(range(10))


def test_blocks_to_realm_batches():
  blocks = wikipedia_blocks()
  masker = masking.make_masker("salient", SPECIAL)
  with pipeline.make_loader(blocks, masker, 8, seed=5, shard_index=0, shard_count=1) as loader:
    batches = take(loader, 4)
    state = loader.get_state()
    more = take(loader, 2)
  for batch in batches:
    assert batch["input_ids"].shape == (8, 96) and batch["input_ids"].dtype == np.int32
    assert batch["mlm_positions"].shape == (8, 10) and batch["block_id"].shape == (8,)
    assert (batch["input_ids"][:, 0] == SPECIAL.cls_id).all()
    assert ((batch["input_ids"] == SPECIAL.mask_id).sum(1) == batch["mlm_weights"].sum(1)).all()
  ids = {int(i) for b in batches for i in b["block_id"]}
  assert ids <= {b.block_id for b in blocks} and len(ids) > 20
  with pipeline.make_loader(blocks, masker, 8, seed=5, shard_index=0, shard_count=1) as resumed:
    resumed.set_state(state)
    assert same(take(resumed, 2), more)
