"""Fixed-length model inputs from token ids (pure numpy), shared by trainer, refresher and reader.

Every builder returns int32 `input_ids`, `attention_mask` (1 = token) and `token_type_ids`
(segment 0 for `[CLS] first [SEP]`, 1 for `second [SEP]`), padded with [PAD] to a fixed length:
- document tower  `[CLS] title [SEP] body [SEP]`      (`doc_inputs`, block_len = 288)
- null document   `[CLS] [SEP] [SEP]`                 (`null_doc_inputs`)
- knowledge-augmented encoder `[CLS] query [SEP] body [SEP]`, query_len + block_len = 96 + 288
- ORQA reader     `[CLS] question [SEP] body [SEP]`   (`reader_inputs`, 320) plus the map from
  each position to its body token and the mask of positions inside the block (span candidates).
Token ids never include special tokens; over-long inputs are truncated (body first).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

from realm_jax.errors import ConfigError


class SpecialIds(Protocol):
  """The special-token ids the input builders and maskers need (any `Tokenizer` qualifies)."""

  cls_id: int
  sep_id: int
  pad_id: int
  mask_id: int


@dataclasses.dataclass(frozen=True)
class BertSpecials:
  """bert-base-uncased special ids, the default when no tokenizer is at hand."""

  cls_id: int = 101
  sep_id: int = 102
  pad_id: int = 0
  mask_id: int = 103


def _specials(tok: SpecialIds | None) -> tuple[int, int, int]:
  tok = tok if tok is not None else BertSpecials()
  return int(tok.cls_id), int(tok.sep_id), int(tok.pad_id)


def _pair(first: np.ndarray, second: np.ndarray, length: int, first_max: int,
          tok: SpecialIds | None) -> tuple[dict[str, np.ndarray], int, int]:
  """`[CLS] first [SEP] second [SEP]` in `length`; first <= first_max tokens, second gets the rest.

  Returns the features, the start position of `second` and how many of its tokens fit.
  """
  cls, sep, pad = _specials(tok)
  if length < 3:
    raise ConfigError(f"input length {length} cannot hold [CLS] [SEP] [SEP]")
  first = np.asarray(first, np.int32).reshape(-1)[:max(0, min(first_max, length - 3))]
  second = np.asarray(second, np.int32).reshape(-1)
  start = len(first) + 2
  kept = min(len(second), length - start - 1)
  n = start + kept + 1
  ids = np.full(length, pad, np.int32)
  ids[0] = cls
  ids[1:start - 1] = first
  ids[start - 1] = sep
  ids[start:start + kept] = second[:kept]
  ids[n - 1] = sep
  mask = np.zeros(length, np.int32)
  mask[:n] = 1
  types = np.zeros(length, np.int32)
  types[start:n] = 1
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}, start, kept


def doc_inputs(title_ids: np.ndarray, body_ids: np.ndarray, block_len: int = 288,
               tok: SpecialIds | None = None) -> dict[str, np.ndarray]:
  """Document-tower input `[CLS] title [SEP] body [SEP]`, shape [block_len]."""
  return _pair(title_ids, body_ids, block_len, block_len, tok)[0]


def null_doc_inputs(block_len: int = 288, tok: SpecialIds | None = None) -> dict[str, np.ndarray]:
  """The null document (empty title and body) that REALM always scores as candidate 0."""
  empty = np.zeros(0, np.int32)
  return doc_inputs(empty, empty, block_len, tok)


def query_block_inputs(query_ids: np.ndarray, body_ids: np.ndarray, query_len: int = 96,
                       block_len: int = 288, tok: SpecialIds | None = None) -> dict[str, np.ndarray]:
  """Knowledge-augmented encoder input `[CLS] query [SEP] body [SEP]`, [query_len + block_len].

  The query keeps at most query_len - 2 tokens, so query positions (and its masks) sit at the
  same places as in the query-tower input `[CLS] query [SEP]`.
  """
  return _pair(query_ids, body_ids, query_len + block_len, query_len - 2, tok)[0]


def reader_inputs(question_ids: np.ndarray, body_ids: np.ndarray, reader_len: int = 320,
                  tok: SpecialIds | None = None) -> dict[str, np.ndarray]:
  """ORQA reader input `[CLS] question [SEP] body [SEP]` [reader_len], with span bookkeeping.

  Extra outputs: `token_to_body` int32 (index of the body token at each position, -1 outside the
  body) and `block_mask` int32 (1 where a position holds a body token: spans start/end there).
  """
  out, start, kept = _pair(question_ids, body_ids, reader_len, reader_len, tok)
  to_body = np.full(reader_len, -1, np.int32)
  to_body[start:start + kept] = np.arange(kept, dtype=np.int32)
  out["token_to_body"] = to_body
  out["block_mask"] = (to_body >= 0).astype(np.int32)
  return out


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def batch_doc_inputs(title_ids: Sequence[np.ndarray], body_ids: Sequence[np.ndarray],
                     block_len: int = 288, tok: SpecialIds | None = None) -> dict[str, np.ndarray]:
  """`doc_inputs` over many blocks: arrays [B, block_len]."""
  if len(title_ids) != len(body_ids):
    raise ValueError(f"{len(title_ids)} titles but {len(body_ids)} bodies")
  if not len(body_ids):
    z = np.zeros((0, block_len), np.int32)
    return {"input_ids": z, "attention_mask": z.copy(), "token_type_ids": z.copy()}
  return _stack([doc_inputs(t, b, block_len, tok) for t, b in zip(title_ids, body_ids)])


def _rows_and_cols(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """For ragged rows of `lengths`: the row of each element and its index within the row."""
  rows = np.repeat(np.arange(len(lengths)), lengths)
  starts = np.cumsum(lengths) - lengths
  return rows, np.arange(int(lengths.sum())) - np.repeat(starts, lengths)


def ragged_doc_inputs(title_flat: np.ndarray, title_splits: np.ndarray, body_flat: np.ndarray,
                      body_splits: np.ndarray, block_len: int = 288,
                      tok: SpecialIds | None = None) -> dict[str, np.ndarray]:
  """`doc_inputs` for many blocks given as flat token arrays + row splits (a corpus shard's
  columns), without a Python loop per block: [B, block_len], equal to `batch_doc_inputs`."""
  cls, sep, pad = _specials(tok)
  if block_len < 3:
    raise ConfigError(f"input length {block_len} cannot hold [CLS] [SEP] [SEP]")
  title_splits, body_splits = np.asarray(title_splits, np.int64), np.asarray(body_splits, np.int64)
  n = len(title_splits) - 1
  t_keep = np.minimum(np.diff(title_splits), block_len - 3)
  b_keep = np.minimum(np.diff(body_splits), block_len - 3 - t_keep)
  ids = np.full((n, block_len), pad, np.int32)
  ids[:, 0] = cls
  rows, cols = _rows_and_cols(t_keep)
  ids[rows, 1 + cols] = title_flat[title_splits[rows] + cols]
  ids[np.arange(n), t_keep + 1] = sep
  rows, cols = _rows_and_cols(b_keep)
  ids[rows, t_keep[rows] + 2 + cols] = body_flat[body_splits[rows] + cols]
  total = t_keep + b_keep + 3
  ids[np.arange(n), total - 1] = sep
  pos = np.arange(block_len)[None, :]
  mask = (pos < total[:, None]).astype(np.int32)
  types = ((pos >= (t_keep + 2)[:, None]) & (pos < total[:, None])).astype(np.int32)
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def blocks_doc_inputs(blocks: Sequence, block_len: int = 288,
                      tok: SpecialIds | None = None) -> dict[str, np.ndarray]:
  """`doc_inputs` of `Block`s (anything with `title_ids` and `body_ids`): [B, block_len].

  A corpus `BlockShard` takes the vectorised path over its token rows (about 10x faster).
  """
  if hasattr(blocks, "doc_inputs"):
    return blocks.doc_inputs(block_len, tok if tok is not None else BertSpecials())
  return batch_doc_inputs([b.title_ids for b in blocks], [b.body_ids for b in blocks], block_len, tok)


def batch_query_block_inputs(query_ids: Sequence[np.ndarray], body_ids: Sequence[np.ndarray],
                             query_len: int = 96, block_len: int = 288,
                             tok: SpecialIds | None = None) -> dict[str, np.ndarray]:
  """`query_block_inputs` for pairs (query i, body i): [B, query_len + block_len]."""
  if len(query_ids) != len(body_ids):
    raise ValueError(f"{len(query_ids)} queries but {len(body_ids)} bodies")
  return _stack([query_block_inputs(q, b, query_len, block_len, tok) for q, b in zip(query_ids, body_ids)])


def batch_reader_inputs(question_ids: Sequence[np.ndarray], body_ids: Sequence[np.ndarray],
                        reader_len: int = 320, tok: SpecialIds | None = None) -> dict[str, np.ndarray]:
  """`reader_inputs` for pairs (question i, body i): [B, reader_len]."""
  if len(question_ids) != len(body_ids):
    raise ValueError(f"{len(question_ids)} questions but {len(body_ids)} bodies")
  return _stack([reader_inputs(q, b, reader_len, tok) for q, b in zip(question_ids, body_ids)])
