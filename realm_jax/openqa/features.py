"""Questions and answers -> fixed-shape arrays for the Open-QA step, and predicted spans -> text.

A question becomes the query-tower input `[CLS] question [SEP]` (query_len); the reader input
`[CLS] question [SEP] body [SEP]` is assembled on device from that prefix and the retrieved block's
body, so the question's tokens are the same in both. Answers become token-id rows (padded with -1)
that the step looks for inside the retrieved blocks. Span -> text goes through the block's
`body_offsets` (character offsets of each body token), as ORQA does, so the answer is a slice of
the original text (case and punctuation kept).
"""

from __future__ import annotations

import logging
import re
from typing import Sequence

import numpy as np

from realm_jax.data.blocks import Block
from realm_jax.data.qa import QAExample
from realm_jax.errors import RealmError

log = logging.getLogger("realm_jax.openqa")


class QuestionError(RealmError):
  """A question cannot be used (empty, or not text): names the record."""


def question_ids(example: QAExample, tok, query_len: int) -> np.ndarray:
  """Token ids of the question, truncated (with a warning naming the record) to query_len - 2."""
  text = example.question if isinstance(example.question, str) else None
  if text is None or not text.strip():
    raise QuestionError(f"question {example.qid!r}: empty question")
  ids = np.asarray(tok.encode(text).ids, np.int32)
  if len(ids) == 0:
    raise QuestionError(f"question {example.qid!r}: {text!r} has no tokens")
  if len(ids) > query_len - 2:
    log.warning("question %r has %d tokens; truncated to query_len - 2 = %d: %.80r", example.qid, len(ids),
                query_len - 2, text)
    ids = ids[:query_len - 2]
  return ids


_REGEX_META = re.compile(r"(?<!\\)[\[\]().*+?{}|^$]")


def literal_answers(example: QAExample) -> list[str]:
  """Answer strings usable for token matching: text answers as they are; a regex answer only
  when it is a plain literal (no unescaped metacharacters), with its escapes removed."""
  if example.answer_type != "regex":
    return list(example.answers)
  out = []
  for pattern in example.answers:
    if not _REGEX_META.search(pattern):
      out.append(re.sub(r"\\(.)", r"\1", pattern))
  return out


def answer_ids(example: QAExample, tok, max_answers: int, max_tokens: int) -> np.ndarray:
  """`[max_answers, max_tokens]` int32 answer token rows, -1 padded; duplicates and answers longer
  than `max_tokens` are dropped (a truncated answer could match the wrong text)."""
  out = np.full((max_answers, max_tokens), -1, np.int32)
  seen: set[tuple[int, ...]] = set()
  row = 0
  for text in literal_answers(example):
    ids = tuple(int(i) for i in tok.encode(text).ids)
    if not ids or len(ids) > max_tokens or ids in seen:
      continue
    seen.add(ids)
    out[row, :len(ids)] = ids
    row += 1
    if row == max_answers:
      break
  return out


def encode_questions(examples: Sequence[QAExample], tok, query_len: int, *, max_answers: int = 8,
                     max_answer_tokens: int = 16, with_answers: bool = True) -> dict[str, np.ndarray]:
  """A host batch: query inputs `[Q, query_len]` (+ `answer_ids` `[Q, A, T]`)."""
  q = len(examples)
  ids = np.full((q, query_len), int(tok.pad_id), np.int32)
  mask = np.zeros((q, query_len), np.int32)
  for i, ex in enumerate(examples):
    qids = question_ids(ex, tok, query_len)
    ids[i, 0] = tok.cls_id
    ids[i, 1:1 + len(qids)] = qids
    ids[i, 1 + len(qids)] = tok.sep_id
    mask[i, :len(qids) + 2] = 1
  out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
  if with_answers:
    out["answer_ids"] = (np.stack([answer_ids(ex, tok, max_answers, max_answer_tokens) for ex in examples])
                         if q else np.zeros((0, max_answers, max_answer_tokens), np.int32))
  return out


def pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads every array to `size` rows by repeating the last one (results of padding are dropped)."""
  n = len(batch["input_ids"])
  if n == size:
    return batch
  return {k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)]) for k, v in batch.items()}


def body_table(blocks: Sequence[Block], length: int, pad_id: int) -> np.ndarray:
  """`[N, length]` int32 body token ids of every block (no special tokens), padded with pad_id."""
  out = np.full((len(blocks), length), pad_id, np.int32)
  for i, b in enumerate(blocks):
    ids = np.asarray(b.body_ids[:length], np.int32)
    out[i, :len(ids)] = ids
  return out


def continuation_table(tok, size: int) -> np.ndarray:
  """bool `[size]`: token ids that continue a word (WordPiece `##x`); a match may not be followed
  by one, so "Paris" does not match inside "Parisian"."""
  out = np.zeros(size, bool)
  for i in range(min(size, tok.vocab_size)):
    piece = tok.id_to_token(i)
    out[i] = bool(piece) and piece.startswith("##")
  return out


def span_text(block: Block, start: int, end: int) -> str:
  """Text of body tokens `start..end` (inclusive), cut from the block's original text."""
  n = len(block.body_offsets)
  if not 0 <= start <= end < n:
    return ""
  return block.text[int(block.body_offsets[start, 0]):int(block.body_offsets[end, 1])]
