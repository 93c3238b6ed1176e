"""The demo's question picking: the fast answer matcher equals DPR's `qa.has_answer` (the
outside reference), and the selection keeps exactly the questions that name an article and have
a specific answer in it."""

import numpy as np

from realm_jax.data import qa
from realm_jax.data.blocks import Block
from realm_jax.data.qa import QAExample
from realm_jax.demo.questions import AnswerMatcher, select_questions, split


def _block(i: int, title: str, text: str) -> Block:
  return Block(i, title, text, np.zeros(0), np.zeros(0), np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0, 2)))


TEXTS = [
    ("Alaska", "The United States purchased Alaska from the Russian Empire on March 30, 1867."),
    ("Alaska", "Juneau is the capital; the state bird is the willow ptarmigan (Lagopus lagopus)."),
    ("Alabama", "Montgomery is the capital of Alabama. Its largest city is Birmingham."),
    ("Acid", "Sulfuric acid is used in car batteries; formic acid occurs in ant venom."),
    ("A", "The letter A is the first letter of the Latin alphabet, Montgomery aside."),
    ("Zürich", "Einstein studied at the ETH in Zürich, graduating in 1900; Café-owners cheered."),
    ("Antacid", "Antacids neutralise stomach acidity."),  # "acid" and "ant" only inside words
]


def test_matcher_equals_has_answer():
  blocks = [_block(i, t, x) for i, (t, x) in enumerate(TEXTS)]
  matcher = AnswerMatcher(blocks)
  examples = [
      QAExample("1", "q", ["1867"]), QAExample("2", "q", ["March 30, 1867"]), QAExample("3", "q", ["montgomery"]),
      QAExample("4", "q", ["Zurich"]), QAExample("5", "q", ["Zürich"]), QAExample("6", "q", ["cafe owners"]),
      QAExample("7", "q", ["Café-owners"]), QAExample("8", "q", ["willow ptarmigan", "Lagopus"]),
      QAExample("9", "q", ["acid used"]), QAExample("10", "q", ["the"]), QAExample("11", "q", ["..."]),
      QAExample("12", "q", [r"willow ptarmigans?|\(Lagopus lagopus\)"], "regex"),
      QAExample("13", "q", [r"\b18\d\d\b"], "regex"), QAExample("14", "q", ["acid"]),
      QAExample("15", "q", ["ant"]),
  ]
  for ex in examples:
    expected = [i for i, b in enumerate(blocks) if qa.has_answer(b.text, ex.answers, ex.answer_type)]
    assert matcher.hits(ex) == expected, ex
    assert matcher.hits(ex, [5, 0, 2]) == [i for i in [5, 0, 2] if i in expected], ex


def test_select_keeps_named_articles_with_specific_answers():
  blocks = [_block(i, t, x) for i, (t, x) in enumerate(TEXTS)]
  examples = [
      QAExample("keep", "What year was Alaska purchased?", ["1867"]),
      QAExample("dup", "what year was alaska purchased?", ["1867"]),  # the same question again
      QAExample("wrong-article", "What is the capital of Alabama?", ["Juneau"]),  # answer not in Alabama
      QAExample("no-title", "Who purchased a large territory in 1867?", ["Russian Empire"]),
      QAExample("short-title", "Which letter comes first in a list?", ["Montgomery"]),  # "A" is too short
      QAExample("common", "What is in Alabama's capital?", ["the"]),  # in every block: not specific
      QAExample("regex", "What is the state bird of Alaska?", [r"willow ptarmigans?"], "regex"),
  ]
  picked = select_questions(blocks, examples, max_answer_block_fraction=0.34)
  assert [e.qid for e in picked] == ["keep", "regex"]


def test_split_is_deterministic_and_disjoint():
  examples = [QAExample(str(i), f"q{i}", ["a"]) for i in range(11)]
  train, test = split(examples, 0.5, seed=3)
  assert len(test) == 6 and len(train) == 5
  assert {e.qid for e in train}.isdisjoint({e.qid for e in test})
  assert split(examples, 0.5, seed=3) == (train, test)
