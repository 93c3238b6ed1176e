"""REALM pre-training queries from blocks: salient-span masking, ablation baselines, ICT pairs.

A query is one sentence of a block, `[CLS] sentence [SEP]` padded to `query_len` (96), with some
tokens replaced by [MASK]. Every query example is a dict of fixed-shape numpy arrays:

  input_ids, attention_mask, token_type_ids  int32 [query_len]   the query (segment 0)
  mlm_labels    int32 [query_len]   original id at masked positions, -100 elsewhere (HF's layout)
  mlm_positions int32 [max_masks]   query positions of the masked tokens (0-padded)
  mlm_targets   int32 [max_masks]   their original ids (0-padded)
  mlm_weights   float32 [max_masks] 1 for a real mask, 0 for padding (REALM's original layout)
  mlm_span_ids  int32 [max_masks]   which masked span each position belongs to (-1 padding); the
                                    per-span marginal groups positions by it
  block_id      int64 []            the source block, to exclude trivial retrievals

The knowledge-augmented encoder reads `[CLS] query [SEP] body [SEP]`, which begins with the same
`[CLS] query [SEP]` tokens at the same positions, so `mlm_labels` / `mlm_positions` index the
first `query_len` positions of the joint input unchanged. Masked tokens are always [MASK] for the
salient and random-span maskers (REALM: all of the span's tokens); the random-token baseline uses
BERT's 80/10/10 replacement (random ids are drawn from the block's own tokens, so no [unused]).

ICT examples hold `query_{input_ids,attention_mask,token_type_ids}` [64] (`[CLS] sentence [SEP]`),
`block_{...}` [288] (`[CLS] title [SEP] body [SEP]`, segments 0 / 1), `block_id` (the
pseudo-positive) and `sentence_removed`. Key names follow the model contract (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from realm_jax.data import features
from realm_jax.data.blocks import Block
from realm_jax.data.features import (
  BertSpecials as Specials,  # noqa: F401  (the default ids, by their old name)
  SpecialIds,
)

IGNORE_LABEL = -100


# ----------------------------------------------------------------------------------------------
# Token ranges (the block carries them: `data/blocks.py` derives them from the char offsets).


def sentence_ranges(block: Block) -> list[tuple[int, int]]:
  """Token range of each sentence: the tokens whose first char lies inside the sentence."""
  return [(int(a), int(b)) for a, b in block.sentence_tokens]


def salient_candidates(block: Block, max_masks: int = 10) -> dict[int, list[tuple[int, int]]]:
  """Sentence index -> token ranges of the salient spans inside it with 1..max_masks tokens."""
  sentences = sentence_ranges(block)
  out: dict[int, list[tuple[int, int]]] = {}
  for a, b in block.salient_tokens:
    a, b = int(a), int(b)
    if not 0 < b - a <= max_masks:
      continue
    for i, (sa, sb) in enumerate(sentences):
      if sa <= a and b <= sb:
        out.setdefault(i, []).append((a, b))
        break
  return out


# ----------------------------------------------------------------------------------------------
# Feature layout.


def _window(n: int, width: int, lo: int, hi: int) -> int:
  """Start of a `width`-token window over n tokens that keeps [lo, hi) inside, centred on it."""
  if n <= width:
    return 0
  start = lo - (width - (hi - lo)) // 2
  return int(min(max(start, 0), n - width))


def _query_features(tokens: np.ndarray, masked: np.ndarray, targets: np.ndarray, span_ids: np.ndarray,
                    block_id: int, special: SpecialIds, query_len: int, max_masks: int) -> dict:
  """Lays out `[CLS] tokens [SEP]` + MLM targets; `masked` are indices into `tokens`."""
  n = len(tokens)
  assert n <= query_len - 2 and len(masked) <= max_masks
  input_ids = np.full(query_len, special.pad_id, np.int32)
  input_ids[0] = special.cls_id
  input_ids[1:n + 1] = tokens
  input_ids[n + 1] = special.sep_id
  attention_mask = np.zeros(query_len, np.int32)
  attention_mask[:n + 2] = 1
  positions = np.asarray(masked, np.int32) + 1  # +1 for [CLS]
  labels = np.full(query_len, IGNORE_LABEL, np.int32)
  labels[positions] = targets
  k = len(positions)
  def pad(x, v, dt):
    return np.concatenate([np.asarray(x, dt), np.full(max_masks - k, v, dt)])
  return {
      "input_ids": input_ids,
      "attention_mask": attention_mask,
      "token_type_ids": np.zeros(query_len, np.int32),
      "mlm_labels": labels,
      "mlm_positions": pad(positions, 0, np.int32),
      "mlm_targets": pad(targets, 0, np.int32),
      "mlm_weights": pad(np.ones(k), 0, np.float32),
      "mlm_span_ids": pad(span_ids, -1, np.int32),
      "block_id": np.int64(block_id),
  }


def _nonempty_sentences(block: Block) -> list[tuple[int, int]]:
  return [(a, b) for a, b in sentence_ranges(block) if b > a]


# ----------------------------------------------------------------------------------------------
# Maskers.


def salient_span_query(block: Block, rng: np.random.Generator, special: SpecialIds,
                       query_len: int = 96, max_masks: int = 10) -> dict | None:
  """REALM's query: one sentence with a salient span, all of the span's tokens masked.

  Picks a sentence uniformly among those holding a usable span (1..max_masks tokens), then one
  of its spans uniformly. Returns None when the block has none (the pipeline skips it).
  """
  candidates = salient_candidates(block, max_masks)
  if not candidates:
    return None
  sentence = sorted(candidates)[rng.integers(len(candidates))]
  spans = candidates[sentence]
  a, b = spans[rng.integers(len(spans))]
  sa, sb = sentence_ranges(block)[sentence]
  start = sa + _window(sb - sa, query_len - 2, a - sa, b - sa)
  stop = min(sb, start + query_len - 2)
  tokens = block.body_ids[start:stop].copy()
  masked = np.arange(a - start, b - start)
  targets = tokens[masked].copy()
  tokens[masked] = special.mask_id
  return _query_features(tokens, masked, targets, np.zeros(len(masked), np.int32), block.block_id,
                         special, query_len, max_masks)


def _random_sentence(block: Block, rng: np.random.Generator, width: int) -> np.ndarray | None:
  """Token ids of a random non-empty sentence, cut to a random `width`-token window."""
  sentences = _nonempty_sentences(block)
  if not sentences:
    return None
  sa, sb = sentences[rng.integers(len(sentences))]
  start = sa + (int(rng.integers(sb - sa - width + 1)) if sb - sa > width else 0)
  return block.body_ids[start:min(sb, start + width)].copy()


def _mask_budget(n: int, mask_prob: float, max_masks: int) -> int:
  return int(min(max_masks, n, max(1, round(mask_prob * n))))


def random_token_query(block: Block, rng: np.random.Generator, special: SpecialIds,
                       query_len: int = 96, max_masks: int = 10, mask_prob: float = 0.15) -> dict | None:
  """Ablation baseline: BERT-style uniform token masking of a random sentence (capped)."""
  tokens = _random_sentence(block, rng, query_len - 2)
  if tokens is None:
    return None
  k = _mask_budget(len(tokens), mask_prob, max_masks)
  masked = np.sort(rng.choice(len(tokens), size=k, replace=False))
  targets = tokens[masked].copy()
  action = rng.random(k)  # BERT: 80% [MASK], 10% a random token, 10% unchanged.
  replace = rng.choice(block.body_ids, size=k)
  tokens[masked] = np.where(action < 0.8, special.mask_id, np.where(action < 0.9, replace, targets))
  return _query_features(tokens, masked, targets, np.arange(k, dtype=np.int32), block.block_id,
                         special, query_len, max_masks)


def random_span_query(block: Block, rng: np.random.Generator, special: SpecialIds,
                      query_len: int = 96, max_masks: int = 10, mask_prob: float = 0.15,
                      geometric_p: float = 0.2) -> dict | None:
  """Ablation baseline: SpanBERT-style random spans (length ~ Geometric(0.2), <= budget) -> [MASK].

  Spans are sampled over WordPiece tokens (SpanBERT used whole words) until about `mask_prob` of
  the sentence (at least one token, at most `max_masks`) is masked.
  """
  tokens = _random_sentence(block, rng, query_len - 2)
  if tokens is None:
    return None
  n = len(tokens)
  budget = _mask_budget(n, mask_prob, max_masks)
  owner = np.full(n, -1, np.int32)
  spans = 0
  for _ in range(10 * budget):  # bounded retries; overlapping draws are rejected.
    left = budget - int((owner >= 0).sum())
    if left <= 0:
      break
    length = int(min(rng.geometric(geometric_p), left, n))
    start = int(rng.integers(n - length + 1))
    if (owner[start:start + length] >= 0).any():
      continue
    owner[start:start + length] = spans
    spans += 1
  masked = np.flatnonzero(owner >= 0)
  targets = tokens[masked].copy()
  tokens[masked] = special.mask_id
  return _query_features(tokens, masked, targets, owner[masked], block.block_id,
                         special, query_len, max_masks)


MASKERS: dict[str, Callable[..., dict | None]] = {
    "salient": salient_span_query,
    "random_token": random_token_query,
    "random_span": random_span_query,
}


def make_masker(kind: str, special: SpecialIds, **kwargs) -> Callable[[Block, np.random.Generator], dict | None]:
  """A `(block, rng) -> example | None` transform for the input pipeline."""
  if kind not in MASKERS:
    raise ValueError(f"unknown masking {kind!r}; choose one of {sorted(MASKERS)}")
  fn = MASKERS[kind]
  return lambda block, rng: fn(block, rng, special, **kwargs)


# ----------------------------------------------------------------------------------------------
# Inverse Cloze Task (ORQA warm start).


def ict_example(block: Block, rng: np.random.Generator, special: SpecialIds, query_len: int = 64,
                block_len: int = 288, remove_prob: float = 0.9) -> dict | None:
  """ORQA's Inverse Cloze Task pair: a random sentence, and its block without it (p=remove_prob).

  As ORQA's ICT data does, an example whose sentence is to be removed from a one-sentence block is
  dropped (the pseudo-positive block would be empty): returns None then, and for blocks without a
  sentence. One-sentence blocks thus give an example (sentence kept) with p = 1 - remove_prob.
  """
  sentences = _nonempty_sentences(block)
  if not sentences:
    return None
  sa, sb = sentences[rng.integers(len(sentences))]
  query = block.body_ids[sa:min(sb, sa + query_len - 2)]
  removed = bool(rng.random() < remove_prob)
  if removed and len(sentences) == 1:
    return None
  body = np.concatenate([block.body_ids[:sa], block.body_ids[sb:]]) if removed else block.body_ids
  out = {
      "query_input_ids": np.full(query_len, special.pad_id, np.int32),
      "query_attention_mask": np.zeros(query_len, np.int32),
      "query_token_type_ids": np.zeros(query_len, np.int32),
  }
  n = len(query) + 2
  out["query_input_ids"][:n] = np.concatenate([[special.cls_id], query, [special.sep_id]])
  out["query_attention_mask"][:n] = 1
  out.update({f"block_{k}": v for k, v in features.doc_inputs(block.title_ids, body, block_len, special).items()})
  out["block_id"] = np.int64(block.block_id)
  out["sentence_removed"] = np.int32(removed)
  return out
