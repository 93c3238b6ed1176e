"""Checking a top-k result against a float64 brute force without depending on how near-ties break.

Two float paths (another CPU's SIMD width, another summation order, ScaNN's kernels vs numpy's)
give dot products that differ in the last bits, so rows whose scores are closer than that swap
places from one machine to the next. What is meaningful, and what these checks assert:
- every returned id really has a score within `atol` of the brute-force score at its rank (the
  result is the k best up to `atol`, in order);
- where a rank is separated from its neighbours (and the first row left out) by more than `atol`,
  the id there is exactly the brute-force id: only genuine near-ties may differ;
- no id repeats, none is excluded, and -1 appears exactly where no row is left.

How to choose `atol`: a float32 dot product of d terms is off by at most ~d * 2^-24 * sum|q_i x_i|
(summation order), and ScaNN or XLA may also reorder or fuse; each caller states its bound.
"""

from __future__ import annotations

import numpy as np


def brute_force_scores(q: np.ndarray, db: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
  """`[B, N]` float64 inner products, -inf at each query's excluded ids (`exclude` `[B, E]`, -1 = none)."""
  scores = np.asarray(q, np.float64) @ np.asarray(db, np.float64).T
  if exclude is not None:
    exclude = np.asarray(exclude).reshape(len(scores), -1)
    for b, row in enumerate(exclude):
      scores[b, row[row >= 0]] = -np.inf
  return scores


def assert_top_k(ids, q, db, k: int, *, atol: float, exclude=None, scores=None) -> None:
  """Asserts `ids` `[B, k]` is the top k of `q @ db.T` up to near-ties closer than `atol`
  (see the module docstring); `scores`, when given, must be each returned row's score within `atol`."""
  ids = np.asarray(ids)
  assert ids.shape == (len(q), k), (ids.shape, (len(q), k))
  full = brute_force_scores(q, db, exclude)
  order = np.argsort(-full, axis=1, kind="stable")
  ref_ids = np.pad(order[:, :k], ((0, 0), (0, max(0, k - order.shape[1]))), constant_values=-1)
  ref = np.take_along_axis(full, order[:, :k + 1], axis=1)  # one past k: the first row left out
  ref = np.pad(ref, ((0, 0), (0, k + 1 - ref.shape[1])), constant_values=-np.inf)
  valid = np.isfinite(ref[:, :k])
  np.testing.assert_array_equal(ids == -1, ~valid, err_msg="-1 must appear exactly where no row is left")
  for b in range(len(q)):
    row = ids[b][valid[b]]
    assert len(set(row.tolist())) == len(row), f"query {b}: duplicate ids {row}"
    assert np.all(np.isfinite(full[b, row])), f"query {b}: an excluded id was returned: {row}"
  got = np.where(valid, np.take_along_axis(full, np.maximum(ids, 0), axis=1), -np.inf)
  np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, ref[:, :k], 0), rtol=0, atol=atol,
                             err_msg="the returned rows' true scores are not the k best at their ranks")
  with np.errstate(invalid="ignore"):  # -inf - -inf past the valid ranks
    gap_before = np.concatenate([np.full((len(q), 1), np.inf), ref[:, :k - 1] - ref[:, 1:k]], axis=1)
    gap_after = ref[:, :k] - ref[:, 1:k + 1]
  separated = valid & (gap_before > atol) & (np.nan_to_num(gap_after, nan=np.inf) > atol)
  bad = np.argwhere(separated & (ids != ref_ids))
  assert not len(bad), (f"ids differ from the brute force where no near-tie explains it (query, rank): "
                        f"{bad[:5].tolist()}, got {ids[tuple(bad[0])]} want {ref_ids[tuple(bad[0])]}")
  if scores is not None:
    scores = np.asarray(scores, np.float64)
    np.testing.assert_allclose(scores[valid], got[valid], rtol=0, atol=atol,
                               err_msg="the returned scores are not the rows' scores")
