"""Retrieve-and-read on the mesh: the ORQA fine-tuning loss and the prediction, one jit each.

Read top to bottom:
1. embed the questions with the query tower (trained);
2. retrieve the top `beam` blocks from the frozen index (exact MIPS on the mesh, no gradient);
   their retriever logits are recomputed as q . e from the gathered (frozen) embeddings, so the
   gradient reaches the query tower. Answering may instead take the ids and scores that the index
   version's ScaNN searcher found on the host (`searcher_hits`; no embeddings on the mesh);
3. look the answers' token ids up in every retrieved block (on device): a block "has the answer"
   when an answer's tokens occur as a whole-word run in its body;
4. read the top `reader_beam_size` blocks: `[CLS] question [SEP] body [SEP]` built on device, span
   logits (width <= max_span_width, inside the body) plus the block's retriever logit;
5. losses: -log sum over blocks with an answer (retriever, over the whole beam) and -log sum over
   (block, span) pairs matching an answer (reader); prediction = argmax over (block, span);
6. `train_step`: gradients of the trained parameters (the document tower stays frozen), one update.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from realm_jax.models.microbatch import map_rows, rows_per_step
from realm_jax.models.reader import openqa_losses, predict_span, span_candidates
from realm_jax.retrieval import mips
from realm_jax.train.device_corpus import gather_rows

if TYPE_CHECKING:
  from realm_jax.openqa.config import FinetuneConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ReaderCorpus:
  """What the step needs of the corpus, on the mesh: frozen embeddings and body tokens by row."""

  embeddings: mips.RowShardedEmbeddings | None  # float32 [N, D], the published index (None: ScaNN on the host)
  bodies: mips.RowShardedEmbeddings  # int32 [N, Lb] body ids, pad_id after the body
  continuation: jax.Array  # bool [V] word-continuation token ids (replicated)
  pad_id: int = dataclasses.field(metadata=dict(static=True))
  sep_id: int = dataclasses.field(metadata=dict(static=True))

  @property
  def num_blocks(self) -> int:
    return self.bodies.num_rows


def place_reader_corpus(embeddings: np.ndarray, bodies: np.ndarray, continuation: np.ndarray, mesh: Mesh,
                        specials) -> ReaderCorpus:
  """Host tables -> a ReaderCorpus whose rows are sharded over every mesh axis."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return ReaderCorpus(mips.shard_rows(np.asarray(embeddings, np.float32), mesh),
                      mips.shard_rows(np.asarray(bodies, np.int32), mesh),
                      jax.device_put(np.asarray(continuation, bool), replicated),
                      int(specials.pad_id), int(specials.sep_id))


def reader_inputs(query_ids: jax.Array, query_mask: jax.Array, bodies: jax.Array, reader_len: int,
                  pad_id: int, sep_id: int) -> dict[str, jax.Array]:
  """`[CLS] question [SEP] body [SEP]` per read block, from the query-tower input.

  query `[Q, Lq]` (`[CLS] q [SEP]` + padding), bodies `[Q, R, Lb]` -> `[Q, R, reader_len]` arrays
  plus `offset` `[Q]` (position of body token 0) and `kept` `[Q, R]` (body tokens that fit).
  """
  q, r, lb = bodies.shape
  lq = query_ids.shape[-1]
  n_q = query_mask.sum(-1).astype(jnp.int32)  # [Q]: [CLS] q [SEP]
  pos = jnp.arange(reader_len, dtype=jnp.int32)[None, :]  # [1, L]
  in_q = pos < n_q[:, None]  # [Q, L]
  q_part = jnp.take_along_axis(query_ids, jnp.broadcast_to(jnp.clip(pos, 0, lq - 1), (q, reader_len)), axis=-1)
  body_len = (bodies != pad_id).sum(-1).astype(jnp.int32)  # [Q, R]
  kept = jnp.minimum(body_len, reader_len - n_q[:, None] - 1)  # [Q, R]
  idx = (pos - n_q[:, None])[:, None, :]  # [Q, 1, L]: body token index at each position
  in_body = (idx >= 0) & (idx < kept[..., None])  # [Q, R, L]
  last_sep = idx == kept[..., None]
  body_part = jnp.take_along_axis(bodies, jnp.broadcast_to(jnp.clip(idx, 0, lb - 1), (q, r, reader_len)), axis=-1)
  tail = jnp.where(in_body, body_part, jnp.where(last_sep, sep_id, pad_id))
  ids = jnp.where(in_q[:, None, :], q_part[:, None, :], tail)
  second = in_body | last_sep
  return {"input_ids": ids.astype(jnp.int32), "attention_mask": (in_q[:, None, :] | second).astype(jnp.int32),
          "token_type_ids": second.astype(jnp.int32), "block_mask": in_body.astype(jnp.int32),
          "offset": n_q, "kept": kept}


def answer_starts(bodies: jax.Array, answers: jax.Array, continuation: jax.Array) -> jax.Array:
  """bool `[Q, K, A, Lb]`: answer `a` occurs in block `k`'s body starting at token `i`, as whole
  words (the token after it does not continue a word). bodies `[Q, K, Lb]`, answers `[Q, A, T]`
  (-1 padded; an all -1 row never matches)."""
  q, k, lb = bodies.shape
  t = answers.shape[-1]
  padded = jnp.concatenate([bodies, jnp.full((q, k, t + 1), -2, bodies.dtype)], axis=-1)  # [Q, K, Lb+T+1]
  match = jnp.ones((q, k, answers.shape[1], lb), bool)
  for j in range(t):
    tok = padded[:, :, None, j:j + lb]  # [Q, K, 1, Lb]
    want = answers[:, None, :, j, None]  # [Q, 1, A, 1]
    match &= (want < 0) | (tok == want)
  length = (answers >= 0).sum(-1).astype(jnp.int32)  # [Q, A]
  after_idx = jnp.arange(lb, dtype=jnp.int32)[None, None, :] + length[:, :, None]  # [Q, A, Lb]
  after = jax.vmap(lambda p, i: p[:, i], in_axes=(0, 0))(padded, after_idx)  # [Q, K, A, Lb]
  continues = jnp.take(continuation, jnp.clip(after, 0, continuation.shape[0] - 1)) & (after >= 0)
  return match & ~continues & (length > 0)[:, None, :, None]


def correct_reader_spans(match: jax.Array, answers: jax.Array, starts: jax.Array, ends: jax.Array,
                         offset: jax.Array, kept: jax.Array) -> jax.Array:
  """bool `[Q, R, S]`: span s (reader positions) covers exactly an answer occurrence in the body."""
  length = (answers >= 0).sum(-1).astype(jnp.int32)  # [Q, A]
  body_start = starts[None, :] - offset[:, None]  # [Q, S]
  width = (ends - starts + 1)[None, :]
  inside = (body_start[:, None, :] >= 0) & (body_start[:, None, :] + width[:, None, :] <= kept[..., None])  # [Q,R,S]
  q, r, a, lb = match.shape
  gathered = jnp.take_along_axis(match, jnp.broadcast_to(jnp.clip(body_start, 0, lb - 1)[:, None, None, :],
                                                         (q, r, a, body_start.shape[-1])), axis=-1)  # [Q,R,A,S]
  right_len = length[:, None, :, None] == width[:, None, None, :]  # [Q, 1, A, S]
  return jnp.any(gathered & right_len, axis=2) & inside


def retrieve(model: nnx.Module, batch: dict[str, jax.Array], corpus: ReaderCorpus, beam: int,
             step_tokens: int | None = None, devices: int = 1, ids: jax.Array | None = None,
             scores: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(query embeddings `[Q, D]`, block ids `[Q, beam]` (-1 past the corpus), logits `[Q, beam]`
  as q . e with the gradient to q). `step_tokens`: the query tower runs over micro-batches of at
  most that many tokens a device (inference on CPU, `models/microbatch.py`). `ids` `[Q, beam]`
  found elsewhere replace the on-device search; their logits are computed here from the gathered
  embeddings, unless their `scores` `[Q, beam]` come too (`searcher_hits`: inference without the
  embeddings on the mesh; no gradient reaches the query tower then)."""
  inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  rows = rows_per_step(inputs[0].shape[0], inputs[0].shape[-1], devices, step_tokens)
  q_emb = map_rows(model.retriever.embed_queries, inputs, rows)
  if scores is not None:
    return q_emb, ids, jnp.where(ids >= 0, scores, -1e9)
  if ids is None:
    ids = mips.search(jax.lax.stop_gradient(q_emb), corpus.embeddings, beam).ids
  emb = gather_rows(corpus.embeddings, ids)  # [Q, beam, D], frozen
  logits = jnp.einsum("qd,qkd->qk", q_emb, emb)
  return q_emb, ids, jnp.where(ids >= 0, logits, -1e9)


@functools.partial(jax.jit, static_argnums=0)
def _query_embeddings(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
  return nnx.merge(graphdef, state).retriever.embed_queries(batch["input_ids"], batch["attention_mask"],
                                                             batch["token_type_ids"])


def searcher_hits(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array], searcher, beam: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Host-side retrieval (`--retrieval scann`): the questions' embeddings from the query tower
  (jitted), then `searcher.search` (a `scann_index.PartitionedSearcher`) on the host. int32 ids
  `[Q, beam]`, best first, -1 where the corpus has no more rows, and their float32 inner products
  (ScaNN rescores its candidates exactly): the `ids` and `scores` of `retrieve`."""
  q = np.asarray(jax.device_get(_query_embeddings(graphdef, state, batch)), np.float32)
  found = searcher.search(q, beam)
  return np.asarray(found.ids, np.int32), np.asarray(found.scores, np.float32)


def read(model: nnx.Module, batch: dict[str, jax.Array], corpus: ReaderCorpus, read_ids: jax.Array,
         read_logits: jax.Array, step_tokens: int | None = None, devices: int = 1) -> dict[str, jax.Array]:
  """Span logits of the read blocks (`[Q, R, S]`, retriever logit added) and their inputs.
  `step_tokens`: the reader runs over micro-batches of questions (inference on CPU)."""
  cfg = model.config
  bodies = gather_rows(corpus.bodies, read_ids)  # [Q, R, Lb]
  inputs = reader_inputs(batch["input_ids"], batch["attention_mask"], bodies, cfg.reader_len, corpus.pad_id,
                         corpus.sep_id)
  x = tuple(inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids", "block_mask"))
  rows = rows_per_step(x[0].shape[0], x[0].shape[1] * x[0].shape[2], devices, step_tokens)
  starts, ends = span_candidates(cfg.reader_len, cfg.max_span_width)
  logits = map_rows(lambda *t: model.reader(*t)[0], x, rows)
  starts, ends = jnp.asarray(starts), jnp.asarray(ends)
  logits = logits + read_logits[..., None]
  logits = jnp.where((read_ids >= 0)[..., None], logits, jnp.finfo(jnp.float32).min)
  return {"logits": logits, "starts": starts, "ends": ends, "bodies": bodies, **inputs}


def finetune_loss(model: nnx.Module, batch: dict[str, jax.Array], corpus: ReaderCorpus, beam: int
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ORQA's loss for a batch of questions (see the module docstring) and training metrics."""
  r = model.config.reader_beam_size
  _, ids, logits = retrieve(model, batch, corpus, beam)
  beam_bodies = gather_rows(corpus.bodies, ids)  # [Q, K, Lb]
  match = answer_starts(beam_bodies, batch["answer_ids"], corpus.continuation)  # [Q, K, A, Lb]
  has_answer = jnp.any(match, axis=(2, 3)) & (ids >= 0)  # [Q, K]
  out = read(model, batch, corpus, ids[:, :r], logits[:, :r])
  correct = correct_reader_spans(match[:, :r], batch["answer_ids"], out["starts"], out["ends"], out["offset"],
                                 out["kept"])
  losses = openqa_losses(logits, has_answer, out["logits"], correct)
  pred = predict_span(out["logits"], out["starts"], out["ends"])
  hit = jnp.take_along_axis(correct.reshape(correct.shape[0], -1),
                            (pred["block"] * correct.shape[-1] + _span_index(pred, out))[:, None], axis=1)[:, 0]
  def f(x):
    return x.astype(jnp.float32)
  metrics = {"loss": losses["loss"], "retriever_loss": jnp.mean(losses["retriever_loss"]),
             "reader_loss": jnp.mean(losses["reader_loss"]),
             "span_accuracy": jnp.mean(f(hit)),  # the predicted span matches an answer (token level)
             "beam_recall": jnp.mean(f(jnp.any(has_answer, -1))),
             "reader_recall": jnp.mean(f(jnp.any(has_answer[:, :r], -1))),
             "top1_has_answer": jnp.mean(f(has_answer[:, 0]))}
  return losses["loss"], metrics


def trained_params(share_embedders: bool, train_query_tower: bool = True) -> nnx.filterlib.Filter:
  """What fine-tuning trains: everything but a separate document tower (its index is frozen).
  A shared tower is the query tower too (NNX files it under `doc_embedder`), so it is trained.
  Without `train_query_tower`, only the reader."""
  if not train_query_tower:
    return nnx.All(nnx.Param, nnx.PathContains("reader"))
  if share_embedders:
    return nnx.Param
  return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("doc_embedder")))


def train_step(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array], corpus: ReaderCorpus, *,
               cfg: FinetuneConfig, beam: int) -> tuple[nnx.State, dict[str, Any]]:
  """One optimizer step on a batch of questions: the loss above, gradients of the trained
  parameters only, the update. The fine-tuner jits it with the state donated (`train/loop.py`)."""
  model, optimizer = nnx.merge(graphdef, state)
  wrt = nnx.DiffState(0, trained_params(cfg.model.share_embedders, cfg.train_query_tower))
  (_, metrics), grads = nnx.value_and_grad(finetune_loss, argnums=wrt, has_aux=True)(model, batch, corpus, beam)
  metrics["grad_norm"] = optax.tree.norm(grads)
  optimizer.update(model, grads)
  return nnx.state((model, optimizer)), metrics


def _span_index(pred: dict[str, jax.Array], out: dict[str, jax.Array]) -> jax.Array:
  """Index of the predicted (start, end) among the span candidates."""
  hit = (out["starts"][None, :] == pred["start"][:, None]) & (out["ends"][None, :] == pred["end"][:, None])
  return jnp.argmax(hit, axis=-1)


def predict(model: nnx.Module, batch: dict[str, jax.Array], corpus: ReaderCorpus, beam: int,
            with_logits: bool = False, step_tokens: int | None = None, devices: int = 1,
            ids: jax.Array | None = None, scores: jax.Array | None = None) -> dict[str, jax.Array]:
  """Answers of a batch: retrieved ids/scores `[Q, beam]`, the best (block, span) of the top
  `reader_beam_size`, as body token indices (`start`, `end`) of block `block_id`. `step_tokens`
  and `devices` (the batch's shards): towers over micro-batches, see `read`. `ids`: the blocks
  and `scores` retrieved on the host (`searcher_hits`) instead of on the mesh."""
  r = model.config.reader_beam_size
  _, ids, logits = retrieve(model, batch, corpus, beam, step_tokens, devices, ids=ids, scores=scores)
  out = read(model, batch, corpus, ids[:, :r], logits[:, :r], step_tokens, devices)
  pred = predict_span(out["logits"], out["starts"], out["ends"])
  block_id = jnp.take_along_axis(ids, pred["block"][:, None], axis=1)[:, 0]
  offset = out["offset"]
  result = {"ids": ids, "scores": logits, "block": pred["block"], "block_id": block_id,
            "start": pred["start"] - offset, "end": pred["end"] - offset, "score": pred["score"],
            "retriever_score": jnp.take_along_axis(logits, pred["block"][:, None], axis=1)[:, 0]}
  result["reader_score"] = result["score"] - result["retriever_score"]
  if with_logits:
    result.update(logits=out["logits"], starts=out["starts"], ends=out["ends"], offset=offset,
                  reader_input_ids=out["input_ids"])
  return result
