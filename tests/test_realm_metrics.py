"""The REALM step's metrics against numpy: the original code's retrieval utility (marginal vs null
document, per masked token) and the top-1 utility (best-scored retrieved block vs null, per example)."""

import jax.numpy as jnp
import numpy as np

from realm_jax.models import marginal_log_likelihood
from realm_jax.train.realm_step import realm_metrics


def _log_softmax(x, axis):
  x = x - x.max(axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis, keepdims=True))


def test_retrieval_utility_is_the_marginal_over_the_null_document_per_token():
  rng = np.random.default_rng(0)
  b, c, m, v = 3, 5, 4, 11  # candidate 0 is the null document
  logits = rng.normal(size=(b, c, m, v)).astype(np.float32) * 2
  targets = rng.integers(0, v, (b, m)).astype(np.int32)
  weights = np.ones((b, m), np.float32)
  weights[0, 2:] = 0  # example 0 has two masked tokens, example 2 none
  weights[2] = 0
  scores = rng.normal(size=(b, c)).astype(np.float32) * 3
  _, aux = marginal_log_likelihood(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), jnp.asarray(scores))
  batch = {"mlm_weights": jnp.asarray(weights), "mlm_targets": jnp.asarray(targets)}
  ids = jnp.asarray(rng.integers(0, 100, (b, c - 1)), jnp.int32)
  got = realm_metrics(jnp.asarray(logits), jnp.asarray(scores), aux, batch, ids, jnp.float32(0))

  lp = np.take_along_axis(_log_softmax(logits.astype(np.float64), -1), targets[:, None, :, None], -1)[..., 0]
  lpz = _log_softmax(scores.astype(np.float64), -1)
  marginal = np.log(np.exp(lpz[:, :, None] + lp).sum(1))  # [B, M]
  want_token = ((marginal - lp[:, 0]) * weights).sum() / weights.sum()
  span = (lp * weights[:, None]).sum(-1)  # [B, C]
  top1 = 1 + np.argmax(scores[:, 1:], -1)
  has = weights.sum(-1) > 0
  want_top1 = (span[np.arange(b), top1] - span[:, 0])[has].mean()
  # float32 logsumexps vs numpy float64 over 5 candidates of O(10) log-probs: ~1e-6 apart; 1e-5 is far
  # below the gap between the two definitions (asserted below) and any wrong axis or mask.
  np.testing.assert_allclose(float(got["retrieval_utility"]), want_token, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(float(got["top1_utility"]), want_top1, atol=1e-5, rtol=1e-5)
  assert abs(want_token - want_top1) > 1e-2  # the two metrics really differ on this batch


def test_own_block_counts_the_queries_that_retrieved_the_block_they_were_made_from():
  """`own_block_known`: queries whose source block is in the retrieval corpus (`block_id` >= 0);
  `own_block_retrieved`: those among them whose candidates hold that block (0 while the
  exclusion works). -1 candidates (too few blocks) and -1 block ids never match each other."""
  b, c, m, v = 4, 3, 1, 7
  logits = jnp.zeros((b, c, m, v))
  scores = jnp.zeros((b, c))
  targets, weights = jnp.zeros((b, m), jnp.int32), jnp.ones((b, m))
  _, aux = marginal_log_likelihood(logits, targets, weights, scores)
  ids = jnp.asarray([[5, 9], [2, 3], [-1, -1], [7, 1]], jnp.int32)
  batch = {"mlm_weights": weights, "mlm_targets": targets, "block_id": jnp.asarray([9, 4, -1, 1], jnp.int32)}
  got = realm_metrics(logits, scores, aux, batch, ids, jnp.float32(0))
  assert float(got["own_block_known"]) == 3 and float(got["own_block_retrieved"]) == 2
  no_ids = realm_metrics(logits, scores, aux, {"mlm_weights": weights, "mlm_targets": targets}, ids, jnp.float32(0))
  assert float(no_ids["own_block_known"]) == 0 and float(no_ids["own_block_retrieved"]) == 0
