"""`realm-jax forward`: one REALM forward pass on random inputs, a quick check of an install."""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("forward", help="Run one REALM forward pass (retriever + encoder) on random inputs")
  p.add_argument("--preset", default="tiny", help="model preset: tiny | minilm | base (default tiny)")
  p.add_argument("--batch", type=int, default=2, help="queries per batch (default 2)")
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from realm_jax.config import get_preset
  from realm_jax.errors import ConfigError
  from realm_jax.models import RealmModel, marginal_log_likelihood, relevance_scores

  if args.batch < 1:
    raise ConfigError(f"--batch must be >= 1, got {args.batch}")
  cfg = get_preset(args.preset)
  b, c = args.batch, cfg.num_candidates
  rng = np.random.default_rng(args.seed)
  model = RealmModel(cfg, rngs=nnx.Rngs(args.seed))
  model.eval()
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

  def ids(*shape):
    return jnp.asarray(rng.integers(1000, cfg.bert.vocab_size, size=shape), jnp.int32)

  @nnx.jit
  def step(model, q, d, j, targets, positions):
    def ones(x):
      return jnp.ones_like(x)
    qe = model.retriever.embed_queries(q, ones(q), 0 * q)
    de = model.retriever.embed_docs(d, ones(d), 0 * d)
    scores = relevance_scores(qe, de)
    logits = model.encoder(j, ones(j), 0 * j, mlm_positions=positions)
    loss, _ = marginal_log_likelihood(logits, targets, jnp.ones_like(targets), scores)
    return loss, scores

  q, d = ids(b, cfg.query_len), ids(b, c, cfg.block_len)
  j = ids(b, c, cfg.query_len + cfg.block_len)
  positions = jnp.broadcast_to(jnp.arange(1, 4, dtype=jnp.int32), (b, c, 3))
  targets = ids(b, 3)
  t0 = time.perf_counter()
  loss, scores = jax.block_until_ready(step(model, q, d, j, targets, positions))
  elapsed = time.perf_counter() - t0
  print(f"realm-jax forward: preset={args.preset} params={n_params / 1e6:.1f}M devices={jax.device_count()} "
        f"({jax.devices()[0].platform})")
  print(f"  queries={b} candidates={c} query_len={cfg.query_len} block_len={cfg.block_len}")
  print(f"  relevance scores[0] = {np.array2string(np.asarray(scores[0]), precision=3)}")
  print(f"  marginal MLM loss = {float(loss):.4f} (compile + run {elapsed:.1f}s)")
  return 0
