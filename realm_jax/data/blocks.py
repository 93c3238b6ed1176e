"""The block: REALM's unit of retrieval (<= 288 tokens of one article with its title).

Blocks carry their token ids (without special tokens), character offsets and, derived from them,
the token ranges of their sentences and salient spans: training needs only the token side, so the
corpus stores it apart from the text (`data/shards.py`), and a trainer never loads the text.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def sentence_token_ranges(body_offsets: np.ndarray, sentences: np.ndarray) -> np.ndarray:
  """int32 [s, 2]: the tokens of each sentence, those whose first char lies inside it."""
  starts = np.asarray(body_offsets, np.int64).reshape(-1, 2)[:, 0]
  spans = np.asarray(sentences, np.int64).reshape(-1, 2)
  return np.stack([np.searchsorted(starts, spans[:, 0], "left"),
                   np.searchsorted(starts, spans[:, 1], "left")], axis=-1).astype(np.int32).reshape(-1, 2)


def char_span_token_ranges(body_offsets: np.ndarray, spans: np.ndarray) -> np.ndarray:
  """int32 [m, 2]: half-open ranges of the body tokens overlapping each char span (empty if none)."""
  offsets = np.asarray(body_offsets, np.int64).reshape(-1, 2)
  spans = np.asarray(spans, np.int64).reshape(-1, 2)
  first = np.searchsorted(offsets[:, 1], spans[:, 0], side="right")
  stop = np.searchsorted(offsets[:, 0], spans[:, 1], side="left")
  return np.stack([first, np.maximum(first, stop)], axis=-1).astype(np.int32).reshape(-1, 2)


@dataclasses.dataclass
class Block:
  """One block of the corpus. Row `block_id` of the index embeds this block.

  `sentence_tokens` / `salient_tokens` are computed from the char offsets when not given (and
  again whenever `body_offsets`, `sentences` or `salient_spans` is reassigned); a block read for
  training (`text=None`) has them and the token ids only."""

  block_id: int
  title: str | None
  text: str | None  # body text (no title); None for a training view without text
  title_ids: np.ndarray  # int32 [t] title tokens, no special tokens
  body_ids: np.ndarray  # int32 [b] body tokens, no special tokens
  body_offsets: np.ndarray | None  # int32 [b, 2] (start, end) char offsets of each body token in `text`
  sentences: np.ndarray | None  # int32 [s, 2] (start, end) char spans of the sentences in `text`
  salient_spans: np.ndarray | None  # int32 [m, 2] char spans of salient entities/dates in `text`
  sentence_tokens: np.ndarray | None = None  # int32 [s, 2] body-token range of each sentence
  salient_tokens: np.ndarray | None = None  # int32 [m, 2] body-token range of each salient span

  def __post_init__(self):
    self.title_ids = np.asarray(self.title_ids, np.int32).reshape(-1)
    self.body_ids = np.asarray(self.body_ids, np.int32).reshape(-1)
    for name in ("body_offsets", "sentences", "salient_spans", "sentence_tokens", "salient_tokens"):
      value = getattr(self, name)
      if value is not None:  # not `setattr`: that would derive the token ranges once per field
        object.__setattr__(self, name, np.asarray(value, np.int32).reshape(-1, 2))
    if self.sentence_tokens is None:
      self.sentence_tokens = sentence_token_ranges(self.body_offsets, self.sentences)
    if self.salient_tokens is None:
      self.salient_tokens = char_span_token_ranges(self.body_offsets, self.salient_spans)

  def __setattr__(self, name: str, value) -> None:
    super().__setattr__(name, value)
    if name in _CHAR_FIELDS and "salient_tokens" in self.__dict__ and value is not None:
      super().__setattr__(name, np.asarray(value, np.int32).reshape(-1, 2))
      super().__setattr__("sentence_tokens", sentence_token_ranges(self.body_offsets, self.sentences))
      super().__setattr__("salient_tokens", char_span_token_ranges(self.body_offsets, self.salient_spans))


_CHAR_FIELDS = ("body_offsets", "sentences", "salient_spans")
