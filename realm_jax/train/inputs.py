"""The trainer's input: corpus blocks -> masked queries (or ICT pairs) -> the global batch.

`CorpusRecords` holds the blocks this process's input shards read (token rows and spans, no text;
`process_record_range` says which), `example_transform` turns one block into one example
(`data/masking.py`), `ShardedLoader` splits the global batch into `data_shards` grain loaders and
reads this process's share, and `global_batch` puts the local rows onto the mesh.
"""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding

from realm_jax.data import masking
from realm_jax.data.blocks import Block
from realm_jax.data.corpus import CorpusReader
from realm_jax.data.pipeline import make_loader
from realm_jax.errors import ConfigError
from realm_jax.train.config import TrainConfig

# Example fields the step does not read (host-side bookkeeping of the masker).
_HOST_ONLY = ("mlm_labels", "sentence_removed")


def check_data_shards(data_shards: int, global_batch: int) -> None:
  """`data_shards` must split over the processes and divide the (micro-)batch."""
  procs = jax.process_count()
  if data_shards % procs or global_batch % data_shards:
    raise ConfigError(f"data_shards ({data_shards}) must be a multiple of the process count ({procs}) "
                      f"and divide the micro-batch ({global_batch})")


def process_record_range(num_records: int, data_shards: int) -> tuple[int, int]:
  """[lo, hi): the records this process's input shards cover (`pipeline.shard_indices` runs of
  the shards `ShardedLoader` gives it: contiguous, so together one contiguous run)."""
  per, per_shard = data_shards // jax.process_count(), num_records // data_shards
  pid = jax.process_index()
  return pid * per * per_shard, (pid + 1) * per * per_shard


class CorpusRecords:
  """Random access, by global block id, to the blocks this process's input shards read: their
  token rows and spans, loaded once (no text, nothing of the other processes' blocks)."""

  def __init__(self, corpus: CorpusReader, lo: int, hi: int):
    self.num_records, self.lo, self.hi = corpus.num_blocks, lo, hi
    self.view = corpus.training_view(lo, hi)

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, i: int) -> Block:
    if not self.lo <= i < self.hi:
      raise IndexError(f"block {i} is not among this process's input blocks [{self.lo}, {self.hi})")
    return self.view[i - self.lo]


def example_transform(cfg: TrainConfig, specials: masking.SpecialIds) -> Callable:
  """`(block, rng) -> example | None`: a salient-span (or baseline) masked query, or an ICT pair."""
  if cfg.task == "ict":
    return lambda block, rng: masking.ict_example(block, rng, specials, query_len=cfg.model.query_len,
                                                  block_len=cfg.model.block_len, remove_prob=cfg.ict_remove_prob)
  return masking.make_masker(cfg.masking, specials, query_len=cfg.model.query_len, max_masks=cfg.max_masks)


class ShardedLoader:
  """The global batch as `data_shards` loaders (one per input shard), this process reading its
  contiguous share; its local batch is their batches concatenated in shard order. The global batch
  depends on `data_shards` only, so 1 process and N processes see exactly the same examples."""

  def __init__(self, source, transform: Callable, global_batch: int, seed: int, data_shards: int):
    check_data_shards(data_shards, global_batch)
    per, pid = data_shards // jax.process_count(), jax.process_index()
    self.loaders = [make_loader(source, transform, global_batch // data_shards, seed,
                                shard_index=s, shard_count=data_shards)
                    for s in range(pid * per, (pid + 1) * per)]

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    iters = [iter(loader) for loader in self.loaders]
    while True:
      parts = [next(i) for i in iters]
      yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict:
    return {"shards": [loader.get_state() for loader in self.loaders]}

  def set_state(self, state: dict) -> None:
    if len(state.get("shards", [])) != len(self.loaders):
      raise ConfigError(f"the checkpoint's input state has {len(state.get('shards', []))} shards for this "
                        f"process, the run has {len(self.loaders)}: resume with the same data_shards and processes")
    for loader, s in zip(self.loaders, state["shards"]):
      loader.set_state(s)

  def close(self) -> None:
    for loader in self.loaders:
      loader.close()


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, same_corpus: bool) -> dict[str, jax.Array]:
  """This process's rows as one global batch on the mesh. `block_id` (excluded from retrieval) only
  means something when queries come from the retrieval corpus; otherwise it becomes -1."""
  keep = {k: v for k, v in local.items() if k not in _HOST_ONLY}
  if "block_id" in keep:
    ids = keep["block_id"]
    keep["block_id"] = ids.astype(np.int32) if same_corpus else np.full_like(ids, -1, np.int32)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in keep.items()}
