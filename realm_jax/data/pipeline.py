"""Input pipeline on grain: deterministic, sharded per JAX process, resumable, prefetched.

`make_loader(source, transform, batch_size, seed)` turns any random-access source (`len` +
`__getitem__`, e.g. the corpus' blocks) into batches of `transform(element, rng)` outputs:

  source -> this process' shard (a contiguous run of records, equal sizes on all processes, so a
            process loads only the records of its own shards)
         -> global shuffle, reshuffled each epoch (grain index_shuffle; no buffer)
         -> transform with a per-element numpy Generator (seeded by seed, shard, epoch, index)
         -> drop None (examples the transform cannot make, e.g. a block without salient spans)
         -> repeat (num_epochs, None = forever) -> batch (numpy, stacked) -> thread prefetch

Everything is a pure function of (seed, shard, position), so the iterator state is one integer
per process: `get_state()` returns a JSON-serialisable dict and `set_state()` on a fresh loader
built with the same arguments continues with exactly the batches an uninterrupted run would have
produced. State from a different seed, batch size or sharding is refused, not silently misread.
Multi-host note: dropping None makes the per-process batch count per epoch data-dependent, so
train with `num_epochs=None` and count steps; a finite epoch may end on one process first.
"""

from __future__ import annotations

import atexit
import weakref
from typing import Any, Callable, Protocol, Sequence

import grain
import numpy as np

from realm_jax.errors import RealmError

STATE_FORMAT = "realm-jax/loader-state/1"

# Open loaders, closed at exit: grain 0.2.18's iterators fail noisily if their prefetch threads
# are stopped during interpreter teardown (from `__del__`, after module globals are gone).
_OPEN_LOADERS: "weakref.WeakSet[Loader]" = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
  for loader in list(_OPEN_LOADERS):
    loader.close()


class LoaderStateError(RealmError):
  """A saved iterator state does not belong to this loader's configuration."""


class RandomAccessSource(Protocol):
  """Anything with a length and integer indexing (grain's RandomAccessDataSource)."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Any: ...


def process_shard() -> tuple[int, int]:
  """(this process' index, number of processes) from JAX, for per-host sharding."""
  import jax  # imported lazily: the loader is also used by tools that never touch devices.

  return jax.process_index(), jax.process_count()


def shard_indices(num_records: int, shard_index: int, shard_count: int) -> range:
  """Record indices of one shard: the `shard_index`-th of `shard_count` equal contiguous runs (the
  last `num_records % shard_count` records belong to no shard)."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} must be in [0, {shard_count})")
  per_shard = num_records // shard_count
  return range(shard_index * per_shard, (shard_index + 1) * per_shard)


def _seeds(seed: int, shard_index: int) -> tuple[int, int]:
  """Independent 32-bit seeds for shuffling and for the transform, distinct per shard."""
  shuffle_seed, map_seed = np.random.SeedSequence([seed, shard_index]).generate_state(2)
  return int(shuffle_seed), int(map_seed)


class Loader:
  """An iterator of batches with `get_state()` / `set_state()` for exact resumption."""

  def __init__(self, dataset: grain.IterDataset, config: dict):
    self._dataset = dataset
    self._config = config
    self._iterator = iter(dataset)
    _OPEN_LOADERS.add(self)

  @property
  def config(self) -> dict:
    """The arguments that determine the stream (checked when a state is restored)."""
    return dict(self._config)

  def __iter__(self) -> "Loader":
    return self

  def __next__(self) -> Any:
    return next(self._iterator)

  def get_state(self) -> dict:
    """JSON-serialisable position of the stream (what has been consumed, not what is prefetched)."""
    return {"format": STATE_FORMAT, "config": self.config, "iterator": self._iterator.get_state()}

  def set_state(self, state: dict) -> None:
    """Continues from a state saved by `get_state()` of a loader with the same configuration."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
      raise LoaderStateError(f"not a loader state (expected format {STATE_FORMAT!r}): {str(state)[:200]}")
    saved = state.get("config", {})
    diff = {k: (saved.get(k), v) for k, v in self._config.items() if saved.get(k) != v}
    if diff:
      detail = ", ".join(f"{k}: saved {a!r} != now {b!r}" for k, (a, b) in diff.items())
      raise LoaderStateError(f"the saved input-pipeline state was made by a different loader ({detail})")
    self.close()
    iterator = iter(self._dataset)
    iterator.set_state(state["iterator"])
    self._iterator = iterator

  def close(self) -> None:
    """Stops the prefetch threads and drops the iterator (later `next` raises StopIteration)."""
    iterator, self._iterator = self._iterator, iter(())
    close = getattr(iterator, "close", None)
    if close is not None:
      close()

  def __enter__(self) -> "Loader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def make_loader(source: RandomAccessSource | Sequence,
                transform: Callable[[Any, np.random.Generator], Any | None],
                batch_size: int,
                seed: int,
                *,
                num_epochs: int | None = None,
                shuffle: bool = True,
                shard_index: int | None = None,
                shard_count: int | None = None,
                drop_remainder: bool = True,
                num_threads: int = 2,
                prefetch_elements: int = 16,
                prefetch_batches: int = 2) -> Loader:
  """Batches of `transform(source[i], rng)` for this process' shard; see the module docstring.

  `shard_index`/`shard_count` default to `jax.process_index()`/`jax.process_count()`.
  `num_threads` workers run the transform and keep `prefetch_elements` ready; a background
  thread keeps `prefetch_batches` batches ready (0 disables it).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  if shard_index is None or shard_count is None:
    default_index, default_count = process_shard()
    shard_index = default_index if shard_index is None else shard_index
    shard_count = default_count if shard_count is None else shard_count
  indices = shard_indices(len(source), shard_index, shard_count)
  if len(indices) == 0:
    raise RealmError(f"the source has {len(source)} records: too few for {shard_count} shards")
  shuffle_seed, map_seed = _seeds(seed, shard_index)

  ds = grain.MapDataset.source(source)
  ds = ds[indices.start:indices.stop:indices.step]
  if shuffle:
    ds = ds.shuffle(seed=shuffle_seed)
  ds = ds.random_map(transform, seed=map_seed)
  ds = ds.repeat(num_epochs)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_elements))
  it = it.batch(batch_size, drop_remainder=drop_remainder)
  if prefetch_batches > 0:
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch_batches)
  config = {"num_records": len(source), "seed": seed, "batch_size": batch_size, "shuffle": shuffle,
            "num_epochs": num_epochs, "shard_index": shard_index, "shard_count": shard_count,
            "drop_remainder": drop_remainder}
  return Loader(it, config)
