"""Open-QA metrics and span bookkeeping against hand-worked examples.

Exact match (ORQA's SQuAD normalisation: articles, punctuation, unicode), CuratedTrec regex
match, recall@k over ranked blocks, the on-device answer location (whole-word token runs) and
reader input layout, and span -> text through character offsets.
"""

import numpy as np

from realm_jax.data.blocks import Block
from realm_jax.data.qa import QAExample
from realm_jax.models.reader import span_candidates
from realm_jax.openqa import features
from realm_jax.openqa.evaluate import first_hit_rank, recall_at, score_records, summarize
from realm_jax.openqa.step import answer_starts, correct_reader_spans, reader_inputs


def _scored(pairs, retrieved_texts=None):
  examples = [QAExample(f"q{i}", "q?", answers, kind) for i, (_, answers, kind) in enumerate(pairs)]
  records = [{"answer": pred, "retrieved": [0, 1, 2]} for pred, _, _ in pairs]
  texts = retrieved_texts or ["nothing here", "still nothing", "nope"]
  score_records(examples, records, lambda b: texts[b])
  return records


def test_exact_match_normalisation_edge_cases():
  cases = [
      ("The Eiffel Tower", ["eiffel tower"], "text", True),  # article and case
      ("eiffel tower.", ["The Eiffel Tower!"], "text", True),  # punctuation on both sides
      ("a  tower", ["Tower"], "text", True),  # "a" and repeated spaces
      ("theory", ["ory"], "text", False),  # "the" only as a whole word
      ("Cafe\u0301", ["Café"], "text", True),  # composed vs decomposed accent (NFD)
      ("Röntgen", ["Rontgen"], "text", False),  # accents are kept, as ORQA
      ("U.S.A", ["usa"], "text", True),
      ("1,000", ["1000"], "text", True),
      ("New York City", ["New York"], "text", False),  # exact, not containment
  ]
  records = _scored([(p, a, k) for p, a, k, _ in cases])
  assert [r["correct"] for r in records] == [want for *_, want in cases]
  summary = summarize("hand", records, [1], 1.0)
  assert summary.exact_match == sum(w for *_, w in cases) / len(cases)


def test_regex_match_for_curatedtrec():
  cases = [
      ("1969", [r"19\d\d"], True),
      ("1969 in July", [r"19\d\d"], True),  # anchored at the start, not a full match (ORQA)
      ("in 1969", [r"19\d\d"], False),
      ("Mount Everest", [r"(Mt\.?|Mount) Everest"], True),
      ("mt everest", [r"(Mt\.?|Mount) Everest"], True),  # case-insensitive
      ("Everest", [r"(unbalanced", "Everest"], True),  # a bad pattern never matches, the next does
      ("K2", [r"(unbalanced"], False),
  ]
  records = _scored([(p, a, "regex") for p, a, _ in cases])
  assert [r["correct"] for r in records] == [want for *_, want in cases]


def test_recall_at_k_from_first_hit_rank():
  texts = ["Paris is in France.", "He was born in Parisian suburbs.", "Born in Paris, 1900."]
  ex = QAExample("q", "where?", ["Paris"])
  assert first_hit_rank(texts, ex) == 1
  assert first_hit_rank(texts[1:], ex) == 2  # "Parisian" is not the token "paris"
  assert first_hit_rank(texts[1:2], ex) is None
  assert first_hit_rank(["It was 1969."], QAExample("q", "when?", [r"19\d\d"], "regex")) == 1
  ranks = [1, 3, None, 20, 100, 101]
  assert [recall_at(ranks, k) for k in (1, 5, 20, 100)] == [1 / 6, 2 / 6, 3 / 6, 4 / 6]
  records = _scored([("x", ["nothing"], "text"), ("y", ["Paris"], "text")], texts)
  assert [r["first_hit_rank"] for r in records] == [None, 1]
  assert summarize("s", records, [1, 5], 1.0).recall == {1: 0.5, 5: 0.5}


def test_answer_located_as_whole_word_token_runs():
  # tokens: 10 11 12 11 12 99(##cont) 11 12 | pad
  body = np.array([[[10, 11, 12, 11, 12, 99, 11, 12, 0, 0]]], np.int32)  # [Q=1, K=1, Lb=10]
  answers = np.array([[[11, 12, -1], [10, -1, -1], [-1, -1, -1]]], np.int32)  # [Q=1, A=3, T=3]
  cont = np.zeros(128, bool)
  cont[99] = True
  m = np.asarray(answer_starts(body, answers, cont))[0, 0]  # [A, Lb]
  assert np.flatnonzero(m[0]).tolist() == [1, 6]  # not at 3: "11 12" continues with ##99
  assert np.flatnonzero(m[1]).tolist() == [0]
  assert not m[2].any()  # empty answer rows never match


def test_reader_inputs_layout_and_correct_spans():
  query = np.array([[101, 7, 8, 102, 0, 0]], np.int32)  # [CLS] q q [SEP]
  qmask = (query != 0).astype(np.int32)
  bodies = np.array([[[20, 21, 22, 23, 0], [30, 31, 32, 33, 34]]], np.int32)  # [Q=1, R=2, Lb=5]
  out = {k: np.asarray(v) for k, v in reader_inputs(query, qmask, bodies, 10, 0, 102).items()}
  assert out["input_ids"][0, 0].tolist() == [101, 7, 8, 102, 20, 21, 22, 23, 102, 0]
  assert out["input_ids"][0, 1].tolist() == [101, 7, 8, 102, 30, 31, 32, 33, 34, 102]  # exactly fits
  assert out["token_type_ids"][0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 0]
  assert out["block_mask"][0, 1].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 0]
  assert out["offset"].tolist() == [4] and out["kept"].tolist() == [[4, 5]]
  short = {k: np.asarray(v) for k, v in reader_inputs(query, qmask, bodies, 8, 0, 102).items()}
  assert short["input_ids"][0, 1].tolist() == [101, 7, 8, 102, 30, 31, 32, 102]  # body truncated
  answers = np.array([[[20, 21], [33, 34]]], np.int32)
  match = answer_starts(bodies, answers, np.zeros(128, bool))
  starts, ends = span_candidates(8, 3)
  correct = np.asarray(correct_reader_spans(match, answers, starts, ends, short["offset"], short["kept"]))
  spans = [[(int(starts[s]), int(ends[s])) for s in np.flatnonzero(correct[0, r])] for r in range(2)]
  assert spans == [[(4, 5)], []]  # "33 34" was cut off by the truncation in block 1


def test_span_text_uses_character_offsets():
  block = Block(0, "T", "Born in São Paulo, 1900.", [1], [5, 6, 7, 8, 9, 10, 11],
                [[0, 4], [5, 7], [8, 11], [12, 17], [17, 18], [19, 23], [23, 24]], [[0, 24]], [])
  assert features.span_text(block, 2, 3) == "São Paulo"
  assert features.span_text(block, 5, 5) == "1900"
  assert features.span_text(block, 3, 9) == ""  # past the block: no text
