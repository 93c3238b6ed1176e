"""The demo's reading warm start: teaches the knowledge-augmented encoder to fill a masked salient
span from a document put next to the query, on the demo's own corpus, before REALM pre-training.

In the paper the encoder starts as BERT, whose MLM head already reads; the packaged MiniLM comes
without its MLM head, and an encoder that cannot read gives the retriever no signal (the control
of `tests/test_realm_learning.py`). The queries are REALM's own (a sentence of a block with one
salient span masked, `masking.salient_span_query`); each is read next to

- another block that contains the masked span (`gold`: what REALM's retriever should find; the
  query's own block is excluded from REALM's candidates, so it is not the one to learn from),
- the query's own block (`own`, a little: the easiest copy),
- a random block (`other`) or the null document (`null`): the encoder must hedge, not copy every
  block with full confidence, or each wrong candidate is far worse than the null document and the
  retriever only learns to pick the null document.

Queries whose span no other block contains read a random block instead of a gold one. Reading
accuracy is measured on the queries of held-out blocks (never trained on) with a gold block and
with the null document.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from realm_jax.data import masking
from realm_jax.data.blocks import Block
from realm_jax.train import device_corpus
from realm_jax.train.optimizer import bert_adamw, warmup_linear_decay

QUERY_KEYS = ("input_ids", "attention_mask", "mlm_positions", "mlm_targets", "mlm_weights")


@dataclasses.dataclass(frozen=True)
class ReadingMix:
  """Share of examples reading each kind of document (the rest: a random block)."""

  gold: float = 0.5
  own: float = 0.1
  null: float = 0.15


def body_rows(blocks: Sequence[Block], block_len: int, specials) -> np.ndarray:
  """int32 `[n, block_len]`: each block's `body [SEP]`, padded (the encoder's block part, as
  `train/device_corpus.py` cuts it from the stored row on device)."""
  body = np.full((len(blocks), block_len), specials.pad_id, np.int32)
  for i, b in enumerate(blocks):
    ids = np.asarray(b.body_ids[:block_len - 1], np.int32)
    body[i, :len(ids)] = ids
    body[i, len(ids)] = specials.sep_id
  return body


class ReadingData:
  """Salient-span queries of the corpus, each with the other blocks that contain its span."""

  def __init__(self, blocks: Sequence[Block], tok, block_len: int, query_len: int, max_masks: int,
               queries_per_block: int, held_out_every: int, seed: int):
    self.pad_id, self.sep_id = int(tok.pad_id), int(tok.sep_id)
    self.bodies = body_rows(blocks, block_len, tok)
    postings: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for i, body in enumerate(self.bodies):
      for pos, t in enumerate(body):
        postings[int(t)].append((i, pos))
    rng = np.random.default_rng(seed)
    feats, gold, owner = [], [], []
    for i, block in enumerate(blocks):
      for _ in range(queries_per_block):
        f = masking.salient_span_query(block, rng, tok, query_len=query_len, max_masks=max_masks)
        if f is None:
          break
        k = int(f["mlm_weights"].sum())
        target = f["mlm_targets"][:k]
        found = sorted({b for b, pos in postings[int(target[0])]
                        if b != i and np.array_equal(self.bodies[b, pos:pos + k], target)})
        feats.append(f)
        gold.append(found)
        owner.append(i)
    self.queries = {k: np.stack([f[k] for f in feats]) for k in QUERY_KEYS}
    self.gold, self.owner = gold, np.asarray(owner)
    held = self.owner % held_out_every == held_out_every - 1
    self.train_rows, self.test_rows = np.flatnonzero(~held), np.flatnonzero(held)
    self.null = np.full(block_len, self.pad_id, np.int32)
    self.null[0] = self.sep_id

  @property
  def gold_fraction(self) -> float:
    """Share of queries whose span another block contains."""
    return float(np.mean([bool(g) for g in self.gold]))

  def bodies_for(self, rows: np.ndarray, kinds: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    out = np.empty((len(rows), self.bodies.shape[1]), np.int32)
    n = len(self.bodies)
    for j, (r, kind) in enumerate(zip(rows, kinds)):
      if kind == "gold" and self.gold[r]:
        out[j] = self.bodies[self.gold[r][rng.integers(len(self.gold[r]))]]
      elif kind == "own":
        out[j] = self.bodies[self.owner[r]]
      elif kind == "null":
        out[j] = self.null
      else:  # another block (one that is not the query's own)
        out[j] = self.bodies[(self.owner[r] + rng.integers(1, n)) % n]
    return out


def _nll_and_accuracy(encoder, q: dict, body: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array]:
  """Masked-token NLL and accuracy of the encoder reading `[CLS] query [SEP] body [SEP]`."""
  ids, mask, segments = device_corpus.joint_inputs(q["input_ids"], q["attention_mask"], body[:, None, :], pad_id)
  logits = encoder(ids, mask, segments, mlm_positions=q["mlm_positions"][:, None, :])[:, 0]
  w = q["mlm_weights"]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), q["mlm_targets"])
  correct = (jnp.argmax(logits, -1) == q["mlm_targets"]).astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  return (nll * w).sum() / n, (correct * w).sum() / n


def reading_accuracy(encoder, data: ReadingData, batch: int = 64) -> dict[str, float]:
  """Masked-token accuracy on the held-out queries that have a gold block: reading a gold block,
  and the null document (what the encoder knows without a document)."""
  rows = np.asarray([r for r in data.test_rows if data.gold[r]])
  if not len(rows):
    return {}
  encoder.eval()
  fn = nnx.jit(lambda e, q, b: _nll_and_accuracy(e, q, b, data.pad_id)[1])
  rng = np.random.default_rng(0)
  out = {}
  for kind in ("gold", "null"):
    hits, total = 0.0, 0.0
    for i in range(0, len(rows), batch):
      r = rows[i:i + batch]
      r = np.pad(r, (0, batch - len(r)), mode="edge") if len(r) < batch else r  # one compiled shape
      w = data.queries["mlm_weights"][r].sum()
      acc = fn(encoder, {k: jnp.asarray(data.queries[k][r]) for k in QUERY_KEYS},
               jnp.asarray(data.bodies_for(r, [kind] * len(r), rng)))
      hits, total = hits + float(acc) * float(w), total + float(w)
    out[kind] = float(hits / max(total, 1.0))
  encoder.train()
  return out


def teach_reading(encoder, data: ReadingData, *, steps: int, batch: int, learning_rate: float,
                  mix: ReadingMix = ReadingMix(), seed: int = 0,
                  on_step: Callable[[int, int], None] | None = None) -> list[float]:
  """Trains `encoder` in place (BERT's AdamW, warmup then linear decay); returns the loss of every
  step."""
  tx = bert_adamw(warmup_linear_decay(learning_rate, steps, max(1, steps // 10)))
  opt = nnx.Optimizer(encoder, tx, wrt=nnx.Param)

  @nnx.jit
  def step(encoder, opt, q, body):
    (loss, _), grads = nnx.value_and_grad(lambda e: _nll_and_accuracy(e, q, body, data.pad_id), has_aux=True)(encoder)
    opt.update(encoder, grads)
    return loss

  rng = np.random.default_rng(seed)
  kinds = np.array(["gold", "own", "null", "other"])
  p = np.array([mix.gold, mix.own, mix.null, 1.0 - mix.gold - mix.own - mix.null])
  losses = []
  encoder.train()
  for s in range(steps):
    rows = rng.choice(data.train_rows, batch)
    body = data.bodies_for(rows, kinds[rng.choice(4, batch, p=p)], rng)
    loss = step(encoder, opt, {k: jnp.asarray(data.queries[k][rows]) for k in QUERY_KEYS}, jnp.asarray(body))
    losses.append(float(loss))
    if on_step:
      on_step(s + 1, steps)
  return losses
