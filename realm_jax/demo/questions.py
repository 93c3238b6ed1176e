"""Open-QA questions the demo's Wikipedia excerpt can answer, picked from the real question sets.

A question is kept when it names the title of one of the excerpt's articles and one of its
answers occurs in a block of that article, and that answer is specific (found in few blocks, so
a hit in the top 5 means retrieval found the right text, not a common word).
"""

from __future__ import annotations

import collections
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np

from realm_jax.data import qa
from realm_jax.data.blocks import Block
from realm_jax.data.qa import QAExample

QUESTION_SETS = ("nq-test", "nq-dev", "wq-test", "ct-test", "trivia-dev", "trivia-test")


def _title_pattern(title: str) -> re.Pattern | None:
  """Whole-phrase, case-insensitive match of an article title (without a parenthesised
  qualifier); None for titles too short to identify an article ("A", "Art")."""
  name = re.sub(r"\s*\(.*\)$", "", title).strip()
  if len(name) < 4:
    return None
  return re.compile(r"\b" + re.escape(name.lower()) + r"\b")


class AnswerMatcher:
  """`qa.has_answer` over a fixed set of blocks, with each block tokenized once: a token
  sequence occurs in a block iff its space-joined form occurs in the block's space-joined tokens."""

  def __init__(self, blocks: Sequence[Block]):
    self.texts = [unicodedata.normalize("NFD", b.text) for b in blocks]
    self.joined = [" " + " ".join(qa.simple_tokenize(t)) + " " for t in self.texts]

  def hits(self, example: QAExample, rows: Iterable[int] | None = None) -> list[int]:
    """Rows (of the blocks given at construction) that contain an answer of `example`."""
    rows = range(len(self.texts)) if rows is None else rows
    if example.answer_type == "regex":
      return [i for i in rows if qa.has_answer(self.texts[i], example.answers, "regex")]
    targets = [" " + " ".join(t) + " " for a in example.answers
               if (t := qa.simple_tokenize(unicodedata.normalize("NFD", a)))]
    return [i for i in rows if any(t in self.joined[i] for t in targets)]


def select_questions(blocks: Sequence[Block], examples: Iterable[QAExample],
                     max_answer_block_fraction: float = 0.02) -> list[QAExample]:
  """The examples answerable from `blocks` (see the module docstring), in input order."""
  rows_by_title: dict[str, list[int]] = collections.defaultdict(list)
  for i, b in enumerate(blocks):
    rows_by_title[b.title].append(i)
  patterns = [(p, t) for t in rows_by_title if (p := _title_pattern(t)) is not None]
  matcher = AnswerMatcher(blocks)
  limit = max(1, int(max_answer_block_fraction * len(blocks)))
  keep, seen = [], set()
  for ex in examples:
    key = ex.question.strip().lower()
    if key in seen:
      continue
    for pattern, title in patterns:
      if pattern.search(key) and matcher.hits(ex, rows_by_title[title]):
        if len(matcher.hits(ex)) <= limit:
          keep.append(ex)
          seen.add(key)
        break
  return keep


def split(examples: Sequence[QAExample], test_fraction: float,
          seed: int = 0) -> tuple[list[QAExample], list[QAExample]]:
  """A deterministic train/test split."""
  order = np.random.default_rng(seed).permutation(len(examples))
  n_test = max(1, int(round(test_fraction * len(examples))))
  test = sorted(order[:n_test])
  train = sorted(order[n_test:])
  return [examples[i] for i in train], [examples[i] for i in test]
