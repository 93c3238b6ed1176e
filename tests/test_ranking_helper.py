"""The near-tie-tolerant top-k check used across the suite must still catch wrong rankings."""

import numpy as np
import pytest

from tests.helpers.ranking import assert_top_k


@pytest.fixture
def data():
  db = np.array([[3.0], [2.0], [2.0 + 1e-7], [1.0], [0.0]])  # rows 1 and 2 are a near-tie
  return np.array([[1.0]]), db


def test_exact_and_near_tie_swaps_pass(data):
  q, db = data
  assert_top_k([[0, 2, 1]], q, db, 3, atol=1e-6)
  assert_top_k([[0, 1, 2]], q, db, 3, atol=1e-6, scores=[[3.0, 2.0, 2.0]])


@pytest.mark.parametrize("ids,match", [
    ([[1, 0, 2]], "k best"),  # separated ranks swapped
    ([[0, 2, 3]], "k best"),  # a worse row instead of a near-tied one
    ([[0, 2, 2]], "duplicate"),
    ([[0, 2, -1]], "-1"),
])
def test_wrong_rankings_fail(data, ids, match):
  q, db = data
  with pytest.raises(AssertionError, match=match):
    assert_top_k(ids, q, db, 3, atol=1e-6)


def test_excluded_ids_and_wrong_scores_fail(data):
  q, db = data
  with pytest.raises(AssertionError, match="excluded"):
    assert_top_k([[0, 1]], q, db, 2, atol=1e-6, exclude=[[1]])
  assert_top_k([[0, 2, 3, 4, -1]], q, db, 5, atol=1e-6, exclude=[[1]])  # -1 where no row is left
  with pytest.raises(AssertionError, match="returned scores"):
    assert_top_k([[0, 1]], q, db, 2, atol=1e-6, scores=[[3.0, 1.5]])
