"""The block: REALM's unit of retrieval (<= 288 tokens of one article with its title).

Blocks carry their token ids (without special tokens) and character offsets, so that salient
spans, masked queries and answer spans can be located in token space and decoded back to text.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Block:
  """One block of the corpus. Row `block_id` of the index embeds this block."""

  block_id: int
  title: str
  text: str  # body text (no title)
  title_ids: np.ndarray  # int32 [t] title tokens, no special tokens
  body_ids: np.ndarray  # int32 [b] body tokens, no special tokens
  body_offsets: np.ndarray  # int32 [b, 2] (start, end) char offsets of each body token in `text`
  sentences: np.ndarray  # int32 [s, 2] (start, end) char spans of the sentences in `text`
  salient_spans: np.ndarray  # int32 [m, 2] (start, end) char spans of salient entities/dates in `text`

  def __post_init__(self):
    self.title_ids = np.asarray(self.title_ids, np.int32).reshape(-1)
    self.body_ids = np.asarray(self.body_ids, np.int32).reshape(-1)
    self.body_offsets = np.asarray(self.body_offsets, np.int32).reshape(-1, 2)
    self.sentences = np.asarray(self.sentences, np.int32).reshape(-1, 2)
    self.salient_spans = np.asarray(self.salient_spans, np.int32).reshape(-1, 2)
