"""Duplicate candidates are skipped, as the original example generator does
(`example_generator.generate_queries_and_candidates`: an example whose retrieved documents hold
one uid twice, the uid being a hash of title and body, is dropped). Top-k over the index never
returns one id twice, but two ids can hold the same text; and the query's own block, excluded by
id, can have a copy under another id."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.train_step import make_inputs  # noqa: E402
from realm_jax.config import get_preset  # noqa: E402
from realm_jax.models import RealmModel  # noqa: E402
from realm_jax.retrieval import mips  # noqa: E402
from realm_jax.train import device_corpus, realm_step  # noqa: E402

NUM_BLOCKS = 12
# (own block, retrieved ids) per example; block 5 is a copy of block 3.
EXAMPLES = [
    (0, [3, 5, 7]),  # 3 and 5: the same text twice -> skipped
    (1, [4, 6, 8]),  # distinct texts -> kept
    (2, [9, -1, -1]),  # too few blocks (-1 twice is not a duplicate) -> kept
    (3, [5, 6, 7]),  # 5 is a copy of the query's own block 3 -> skipped
    (-1, [3, 4, 6]),  # own block unknown (another query corpus), distinct texts -> kept
]
SKIPPED = [True, False, False, True, False]


def _setup():
  cfg = get_preset("tiny", query_len=16, block_len=32, num_candidates=4)
  rng = np.random.default_rng(0)
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,))
  doc, _, batch, sp = make_inputs(cfg, len(EXAMPLES), NUM_BLOCKS, rng)
  doc[5] = doc[3]
  corpus = device_corpus.place_host_rows(doc.astype(np.uint16), mesh, sp)
  index = mips.shard_rows(rng.normal(size=(NUM_BLOCKS, cfg.retriever_dim)).astype(np.float32), mesh)
  batch["block_id"] = np.array([own for own, _ in EXAMPLES], np.int32)
  batch["candidate_ids"] = np.array([ids for _, ids in EXAMPLES], np.int32)  # the host-retrieval path
  model = RealmModel(cfg, rngs=nnx.Rngs(0))
  model.eval()  # deterministic: the same example gives the same loss in any batch
  return model, {k: jnp.asarray(v) for k, v in batch.items()}, corpus, index, doc


@nnx.jit(static_argnames="skip")
def _loss(model, batch, corpus, index, skip=True):
  return realm_step.realm_loss(model, batch, corpus, index, skip_duplicates=skip)


def _rows(batch, keep):
  return {k: v[np.asarray(keep)] for k, v in batch.items()}


def test_duplicate_candidates_against_the_token_rows():
  _, batch, _, _, doc = _setup()
  ids = np.asarray(batch["candidate_ids"])
  own_ids = np.asarray(batch["block_id"])
  tokens = np.where((ids >= 0)[..., None], doc[np.maximum(ids, 0)], 0)
  own = np.where((own_ids >= 0)[:, None], doc[np.maximum(own_ids, 0)], 0)
  got = realm_step.duplicate_candidates(jnp.asarray(tokens), jnp.asarray(ids >= 0), jnp.asarray(own),
                                        jnp.asarray(own_ids >= 0))
  assert np.asarray(got).tolist() == SKIPPED
  # The uid the original hashes is the text: blocks are duplicates only where their texts are equal.
  texts = {i: doc[i].tobytes() for i in range(NUM_BLOCKS)}
  assert sum(texts[i] == texts[j] for i in range(NUM_BLOCKS) for j in range(i)) == 1


def test_examples_with_duplicate_candidates_are_skipped_in_the_step():
  model, batch, corpus, index, _ = _setup()
  loss, metrics = _loss(model, batch, corpus, index)
  kept = [i for i, s in enumerate(SKIPPED) if not s]
  # The oracle: the same step over the kept examples alone, without the check.
  want, want_metrics = _loss(model, _rows(batch, kept), corpus, index, skip=False)
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["mlm_accuracy"]), float(want_metrics["mlm_accuracy"]), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["duplicate_skipped"]), SKIPPED.count(True) / len(SKIPPED), rtol=1e-6)
  # (Their targets weigh 0 in the loss, so they get no gradient either.)
  # Without the check every example counts (the behaviour before), and the loss differs.
  everything, off = _loss(model, batch, corpus, index, skip=False)
  assert abs(float(everything) - float(loss)) > 1e-3 and float(off["duplicate_skipped"]) == 0.0
