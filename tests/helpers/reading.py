"""Teaches a knowledge-augmented encoder to *read* before REALM: fill the masked city of a query
from a block put next to it, on invented people disjoint from a test's.

This stands in for the BERT initialisation of the real REALM encoder (which can already copy from
its context) without giving it any of the test's facts. Each example shows the person's own block
(`own_block`), the null document (`null_block`) or another person's block. The learning test
first teaches copying (own blocks only), then hedging (30% own, 20% null, 50% someone else's): a
reader that copies every block with full confidence makes every wrong candidate far worse than
the null document, and REALM's retriever then only learns to pick the null document.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from realm_jax.data import masking
from realm_jax.data.corpus import CorpusReader
from realm_jax.train import device_corpus

_QUERY_KEYS = ("input_ids", "attention_mask", "mlm_positions", "mlm_targets", "mlm_weights")


def body_rows(blocks, block_len: int, tok) -> np.ndarray:
  """`[n, block_len]` int32 `body [SEP] pad...` rows: what the encoder reads of each block."""
  doc = device_corpus.host_token_rows(blocks, block_len, tok)
  return np.asarray(device_corpus.body_from_doc(jnp.asarray(doc), tok.sep_id, tok.pad_id))


def fact_queries(storage, query_len: int, prefix: str = "queries", seed: int = 0,
                 max_masks: int = 1) -> dict[str, np.ndarray]:
  """The salient-span query (the city masked, up to `max_masks` tokens) of every block of a
  fact-query corpus, stacked."""
  reader = CorpusReader(storage, prefix)
  tok = reader.tokenizer()
  rng = np.random.default_rng(seed)
  feats = [masking.salient_span_query(block, rng, tok, query_len=query_len, max_masks=max_masks)
           for block in reader.iter_blocks()]
  return {k: np.stack([f[k] for f in feats]) for k in feats[0]}


def encoder_nll(encoder, queries: dict, bodies: jnp.ndarray, pad_id: int) -> jnp.ndarray:
  """Mean masked-token NLL of the encoder reading `[CLS] query [SEP] body [SEP]`."""
  ids, mask, segments = device_corpus.joint_inputs(queries["input_ids"], queries["attention_mask"],
                                                   bodies[:, None, :], pad_id)
  logits = encoder(ids, mask, segments, mlm_positions=queries["mlm_positions"][:, None, :])[:, 0]
  w = queries["mlm_weights"]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, queries["mlm_targets"])
  return (nll * w).sum() / w.sum()


def teach_reading(encoder, storage, *, query_len: int, block_len: int, steps: int = 600, batch: int = 32,
                  learning_rate: float = 1e-3, own_block: float = 0.5, null_block: float = 0.2,
                  seed: int = 0, max_masks: int = 1) -> list[float]:
  """Trains `encoder` in place on the people of `storage` (a `build_fact_corpora` root) and
  returns the loss every 50 steps. Each example reads its own block (`own_block`), the null
  document (`null_block`) or another person's block."""
  knowledge = CorpusReader(storage, "corpus")
  tok = knowledge.tokenizer()
  queries = fact_queries(storage, query_len, max_masks=max_masks)
  blocks = list(knowledge.iter_blocks())
  bodies = body_rows(blocks, block_len, tok)
  null = np.full_like(bodies[0], tok.pad_id)
  null[0] = tok.sep_id
  people = len(blocks)
  owner = np.arange(len(queries["input_ids"])) // (len(queries["input_ids"]) // people)

  opt = nnx.Optimizer(encoder, optax.adamw(learning_rate), wrt=nnx.Param)

  @nnx.jit
  def step(encoder, opt, q, body):
    loss, grads = nnx.value_and_grad(lambda e: encoder_nll(e, q, body, tok.pad_id))(encoder)
    opt.update(encoder, grads)
    return loss

  rng = np.random.default_rng(seed)
  losses = []
  for s in range(steps):
    i = rng.integers(0, len(owner), batch)
    kind = rng.random(batch)
    other = (owner[i] + rng.integers(1, people, batch)) % people
    body = np.where((kind < own_block)[:, None], bodies[owner[i]], bodies[other])
    body = np.where((kind >= 1 - null_block)[:, None], null, body)
    loss = step(encoder, opt, {k: jnp.asarray(queries[k][i]) for k in _QUERY_KEYS}, jnp.asarray(body))
    if s % 50 == 0 or s == steps - 1:
      losses.append(float(loss))
  return losses


def reading_accuracy(encoder, storage, *, query_len: int, block_len: int, max_masks: int = 1) -> dict[str, float]:
  """Accuracy of the masked city on the people of `storage` (held out from teaching) when the
  encoder reads their own block (`own`), the next person's block (`other`) or the null document,
  and the mean negative log-likelihood of the city in each case (`own_nll`, ...: how confident)."""
  knowledge = CorpusReader(storage, "corpus")
  tok = knowledge.tokenizer()
  queries = fact_queries(storage, query_len, max_masks=max_masks)
  bodies = body_rows(list(knowledge.iter_blocks()), block_len, tok)
  null = np.full_like(bodies[0], tok.pad_id)
  null[0] = tok.sep_id
  n, nq = len(bodies), len(queries["input_ids"])
  owner = np.arange(nq) // (nq // n)
  q = {k: jnp.asarray(queries[k]) for k in _QUERY_KEYS}
  w = queries["mlm_weights"] > 0
  out = {}
  for name, body in (("own", bodies[owner]), ("other", bodies[(owner + 1) % n]), ("null", np.stack([null] * nq))):
    ids, mask, segments = device_corpus.joint_inputs(q["input_ids"], q["attention_mask"], jnp.asarray(body)[:, None, :],
                                                     tok.pad_id)
    logits = encoder(ids, mask, segments, mlm_positions=q["mlm_positions"][:, None, :])[:, 0]
    out[name] = float((np.asarray(jnp.argmax(logits, -1)) == queries["mlm_targets"])[w].mean())
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, q["mlm_targets"])
    out[f"{name}_nll"] = float(np.asarray(nll)[w].mean())
  return out
