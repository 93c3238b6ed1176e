"""REALM train step throughput: ours (jit, retrieval on device) vs the HF PyTorch pieces.

One command: `python benchmarks/train_step.py [--presets tiny minilm] [--batch 2] [--iters 5]`.
Ours: the full step of `realm_jax.train.realm_step.realm_loss` (query embed, exact MIPS over a
row-sharded index, candidate re-embedding, encoder, marginal loss) forward+backward + optimizer,
jitted over the (model, optimizer) state as the trainer does. HF: `RealmScorer` (query + the
candidates) + `RealmKnowledgeAugEncoder` with labels, forward+backward + AdamW, candidates given
(HF has no in-step retrieval). Both in training mode (dropout on). The sides take turns (see
below), so load from other jobs hits both alike; every timed step is printed, with a steadiness
check (slowest / fastest), and the 1-minute load average before and after.
`--breakdown` also times our step's parts.

By default each side runs alone, in its own worker process, and the sides take turns by rounds
(`--rounds`: ours, then HF, then ours, ...; each round compiles / warms up again). With both
sides in one process, or in two processes alive at once, our MiniLM step slowed from 8.5-9.0 s
to 11-16 s after HF's first steps, and kept slowing, while HF's stayed at ~10.2 s: XLA:CPU
re-faults ~2 million pages (~8 GB) of temporaries every step, and with HF's ~5 GB held next to
it those faults got slower. The ratio then measured that interference, not either step.
`--same-process` keeps the one-process alternation for comparison.

Both sides' workers start with the same glibc malloc settings: by default (`--malloc kept`) those
of `realm_jax.host_memory`, which the `realm-jax` command applies to itself (freed memory kept for
reuse rather than unmapped); `--malloc system` gives both glibc's defaults. Each side's timed line
ends with its page faults and kernel seconds per step.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from realm_jax import host_memory
from realm_jax.config import get_preset
from realm_jax.convert.hf import hf_config_dict
from realm_jax.data.masking import Specials
from realm_jax.models import RealmModel, marginal_log_likelihood
from realm_jax.retrieval import mips
from realm_jax.train import device_corpus, realm_step
from realm_jax.train.optimizer import bert_adamw


def _seconds(fn) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def _time(fn, iters: int, warmup: int = 2) -> float:
  """Median seconds of `iters` calls after `warmup` (compile) calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  return statistics.median(_seconds(fn) for _ in range(iters))


def make_inputs(cfg, batch: int, num_blocks: int, rng):
  sp = Specials()
  lq, lb = cfg.query_len, cfg.block_len
  doc = np.zeros((num_blocks, lb), np.int32)
  body = np.zeros((num_blocks, lb), np.int32)
  for i in range(num_blocks):
    t, b = rng.integers(1000, 30000, 4), rng.integers(1000, 30000, lb - 8)
    d = np.concatenate([[sp.cls_id], t, [sp.sep_id], b, [sp.sep_id]])
    doc[i, :len(d)] = d
    body[i, :len(b) + 1] = np.concatenate([b, [sp.sep_id]])
  q = np.zeros((batch, lq), np.int32)
  q[:, 0], q[:, 1:lq - 1], q[:, lq - 1] = sp.cls_id, rng.integers(1000, 30000, (batch, lq - 2)), sp.sep_id
  q[:, 5:8] = sp.mask_id
  batch_d = dict(input_ids=q, attention_mask=np.ones_like(q), token_type_ids=np.zeros_like(q),
                 mlm_positions=np.tile(np.array([5, 6, 7] + [0] * 7, np.int32), (batch, 1)),
                 mlm_targets=rng.integers(1000, 30000, (batch, 10)).astype(np.int32),
                 mlm_weights=np.tile(np.array([1.0] * 3 + [0.0] * 7, np.float32), (batch, 1)),
                 block_id=np.zeros(batch, np.int32))
  return doc, body, batch_d, sp


def step_parts(cfg, batch, num_blocks, rng, mesh):
  """What one REALM training step runs on: (graphdef, state of model + AdamW, batch, device corpus,
  index), the state and batch replicated on `mesh`, and `step(state, batch) -> (state, loss)`."""
  doc, body, b, sp = make_inputs(cfg, batch, num_blocks, rng)
  corpus = device_corpus.place_host_rows(doc.astype(np.uint16), mesh, sp)
  index = mips.shard_rows(rng.normal(size=(num_blocks, cfg.retriever_dim)).astype(np.float32), mesh)
  model = RealmModel(cfg, rngs=nnx.Rngs(0))
  model.train()
  opt = nnx.Optimizer(model, bert_adamw(1e-5), wrt=nnx.Param)
  # On the mesh from the start, as the trainer's place_state does: the state the step returns is
  # on the mesh, and an unmeshed first state would make the second call compile again.
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  b = jax.device_put({k: jnp.asarray(v) for k, v in b.items()}, replicated)
  graphdef, state = nnx.split((model, opt))
  state = jax.device_put(state, replicated)

  def step(state, b):
    model, opt = nnx.merge(graphdef, state)
    (loss, _), grads = nnx.value_and_grad(lambda m: realm_step.realm_loss(m, b, corpus, index), has_aux=True)(model)
    opt.update(model, grads)
    return nnx.state((model, opt)), loss

  return graphdef, state, b, corpus, index, step


def ours_step(cfg, batch, num_blocks, rng):
  """A zero-argument callable running one of our train steps (state carried between calls)."""
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  graphdef, state, b, corpus, index, step = step_parts(cfg, batch, num_blocks, rng, mesh)
  step = jax.jit(step)

  box = {"state": state}

  def run():
    box["state"], loss = step(box["state"], b)
    return loss

  def breakdown(iters: int) -> dict[str, float]:
    """Each part as its own jitted forward+backward (retrieval forward only)."""
    m, _ = nnx.merge(graphdef, box["state"])
    c = cfg.num_candidates
    q_emb = m.retriever.embed_queries(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    ids = realm_step.retrieve_candidates(q_emb, index, b["block_id"], c, False)
    cand = jnp.concatenate([realm_step.null_document(corpus, batch), device_corpus.gather_rows(corpus.tokens, ids)], 1)
    bodies = device_corpus.body_from_doc(cand, corpus.sep_id, corpus.pad_id)
    joint = device_corpus.joint_inputs(b["input_ids"], b["attention_mask"], bodies, corpus.pad_id)
    pos = jnp.broadcast_to(b["mlm_positions"][:, None], (batch, c, 10))
    parts = {
        "query embed": nnx.jit(lambda m: nnx.grad(lambda m: m.retriever.embed_queries(
            b["input_ids"], b["attention_mask"], b["token_type_ids"]).sum())(m)),
        "retrieval": jax.jit(lambda q: realm_step.retrieve_candidates(q, index, b["block_id"], c, False)),
        "candidate embed": nnx.jit(lambda m: nnx.grad(lambda m: m.retriever.embed_docs(
            *device_corpus.doc_inputs_from_tokens(cand, corpus.pad_id, corpus.sep_id)).sum())(m)),
        "encoder": nnx.jit(lambda m: nnx.grad(lambda m: marginal_log_likelihood(
            m.encoder(*joint, mlm_positions=pos), b["mlm_targets"], b["mlm_weights"], jnp.zeros((batch, c)))[0])(m)),
    }
    return {name: _time(lambda fn=fn, arg=(q_emb if name == "retrieval" else m): fn(arg), iters)
            for name, fn in parts.items()}

  return run, breakdown


def hf_step(cfg, batch, rng, threads: int, dtype: str = "float32"):
  """A zero-argument callable running one HF PyTorch train step."""
  import torch
  import transformers
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  hc = transformers.RealmConfig(**hf_config_dict(cfg))
  scorer, encoder = transformers.RealmScorer(hc).train(), transformers.RealmKnowledgeAugEncoder(hc).train()
  params = list(scorer.parameters()) + list(encoder.parameters())
  opt = torch.optim.AdamW(params, lr=1e-5)
  c, lq, lb = cfg.num_candidates, cfg.query_len, cfg.block_len
  q = torch.from_numpy(rng.integers(1000, 30000, (batch, lq)))
  cand = torch.from_numpy(rng.integers(1000, 30000, (batch, c, lb)))
  joint = torch.from_numpy(rng.integers(1000, 30000, (batch * c, lq + lb)))
  labels = torch.from_numpy(rng.integers(1000, 30000, (batch, lq + lb)))
  mlm_mask = torch.zeros(batch, lq + lb)
  mlm_mask[:, 5:8] = 1

  def run():
    opt.zero_grad()
    # bfloat16: PyTorch's CPU autocast (oneDNN bfloat16 matmuls; float32 parameters and AdamW)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      scores = scorer(q, candidate_input_ids=cand).relevance_score
      out = encoder(joint, relevance_score=scores, labels=labels, mlm_mask=mlm_mask)
    out.loss.backward()
    opt.step()
    return None

  return run


def _worker(side: str, preset: str, batch: int, candidates: int, blocks: int, threads: int, dtype: str,
            conn) -> None:
  """One side in its own process: builds its step, then answers "step" (seconds of one step),
  "breakdown" (ours: the parts' seconds) and "stop"."""
  cfg = get_preset(preset, num_candidates=candidates, **{"bert.dtype": dtype})
  rng = np.random.default_rng(0)
  breakdown = None
  if side == "ours":
    fn, breakdown = ours_step(cfg, batch, blocks, rng)
  else:
    make_inputs(cfg, batch, blocks, rng)  # the same random stream as in one process
    fn = hf_step(cfg, batch, rng, threads, dtype)
  conn.send("ready")
  while (msg := conn.recv()) != "stop":
    if msg == "step":
      r0 = resource.getrusage(resource.RUSAGE_SELF)
      t = _seconds(fn)
      r1 = resource.getrusage(resource.RUSAGE_SELF)
      conn.send((t, r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime))
    else:
      conn.send(breakdown(msg[1]))


class _Side:
  """A worker process running one side; `step()` returns the seconds of one step."""

  def __init__(self, side: str, preset: str, args):
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    self.conn, child = ctx.Pipe()
    self.kernel: list[tuple[int, float]] = []
    self.proc = ctx.Process(target=_worker, args=(side, preset, args.batch, args.candidates, args.blocks,
                                                  args.threads, args.dtype, child), daemon=True)
    self.proc.start()
    if self.conn.recv() != "ready":
      raise RuntimeError(f"the {side} worker did not start")

  def step(self) -> float:
    """Seconds of one step; its page faults and kernel seconds go to `kernel` ([faults, s])."""
    self.conn.send("step")
    t, faults, sys_s = self.conn.recv()
    self.kernel.append((faults, sys_s))
    return t

  def breakdown(self, iters: int) -> dict[str, float]:
    self.conn.send(("breakdown", iters))
    return self.conn.recv()

  def close(self) -> None:
    self.conn.send("stop")
    self.proc.join(timeout=60)
    if self.proc.is_alive():
      self.proc.kill()


def _fmt(times: list[float]) -> str:
  return " ".join(f"{t * 1e3:.0f}" for t in times)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--presets", nargs="+", default=["tiny", "minilm"])
  ap.add_argument("--batch", type=int, default=2, help="queries per step")
  ap.add_argument("--candidates", type=int, default=8, help="candidates per query (null document included)")
  ap.add_argument("--blocks", type=int, default=4096, help="blocks in the device index")
  ap.add_argument("--iters", type=int, default=5, help="timed steps per side (alternating)")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (compile)")
  ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  ap.add_argument("--breakdown", action="store_true", help="also time our step's parts")
  ap.add_argument("--rounds", type=int, default=2, help="turns per side, each in a fresh worker (default 2)")
  ap.add_argument("--same-process", action="store_true",
                  help="run both sides in this process (they interfere: see the module docstring)")
  ap.add_argument("--malloc", choices=("kept", "system"), default="kept",
                  help="glibc malloc of both sides' workers: `kept` (realm_jax.host_memory's settings, as "
                  "the realm-jax command runs) or the system default (every step faults its temporaries in)")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                  help="compute dtype of both sides (bfloat16: ours `bert.dtype`, HF under torch.autocast)")
  args = ap.parse_args()
  # Both sides' workers start with the same allocator settings (read by glibc when a process starts).
  os.environ.pop("GLIBC_TUNABLES", None)
  if args.malloc == "kept":
    os.environ.update(host_memory.child_environment())
  print(f"load average (1 min) before: {os.getloadavg()[0]:.2f}", flush=True)
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; batch {args.batch} queries x "
        f"{args.candidates} candidates; index {args.blocks} blocks; {args.warmup} warm-up steps, then "
        f"{args.iters} timed steps per side; torch threads {args.threads}; " + (
            "one process, alternating steps" if args.same_process
            else f"each side alone in its own process, {args.rounds} rounds each") +
        f"; malloc {args.malloc}" + (
            "" if args.same_process or args.malloc == "system" or "GLIBC_TUNABLES" in os.environ
            else " (not applied on this host: see realm_jax/host_memory.py)"))
  for preset in args.presets:
    cfg = get_preset(preset, num_candidates=args.candidates, **{"bert.dtype": args.dtype})
    warm = {"ours": [], "hf": []}
    times = {"ours": [], "hf": []}
    kernel = {"ours": [], "hf": []}  # (page faults, kernel seconds) of each timed step
    sides = []
    if args.same_process:
      rng = np.random.default_rng(0)
      ours_fn, breakdown = ours_step(cfg, args.batch, args.blocks, rng)
      hf_fn = hf_step(cfg, args.batch, rng, args.threads, args.dtype)
      step = {"ours": functools.partial(_seconds, ours_fn), "hf": functools.partial(_seconds, hf_fn)}
      for side in ("ours", "hf"):
        warm[side] += [step[side]() for _ in range(args.warmup)]
      for _ in range(args.iters):
        for side in ("ours", "hf"):
          times[side].append(step[side]())
    else:
      per_round = [args.iters // args.rounds + (r < args.iters % args.rounds) for r in range(args.rounds)]
      for n in per_round:
        for side in ("ours", "hf"):
          worker = _Side(side, preset, args)
          warm[side] += [worker.step() for _ in range(args.warmup)]
          times[side] += [worker.step() for _ in range(n)]
          kernel[side] += worker.kernel[-n:] if n else []
          worker.close()
      if args.breakdown:  # a fresh worker of ours, after the timed rounds, alone
        sides.append(_Side("ours", preset, args))
        for _ in range(args.warmup):
          sides[0].step()
        breakdown = sides[0].breakdown
    t_ours, t_hf = statistics.median(times["ours"]), statistics.median(times["hf"])
    print(f"\n{preset} ({cfg.query_len} + {cfg.block_len} tokens, {args.dtype}): ours {args.batch / t_ours:.3f} ex/s "
          f"({t_ours * 1e3:.0f} ms/step) | HF PyTorch {args.batch / t_hf:.3f} ex/s ({t_hf * 1e3:.0f} ms/step) | "
          f"ratio ours/HF = {t_hf / t_ours:.2f}x")
    for side in ("ours", "hf"):
      ts = times[side]
      print(f"  {side:4s} warm-up ms: {_fmt(warm[side]):>16s} | timed ms: {_fmt(ts)} | slowest/fastest "
            f"{max(ts) / min(ts):.2f}" + (f" | per step: {statistics.median(f for f, _ in kernel[side]):,.0f} page "
                                          f"faults, {statistics.median(k for _, k in kernel[side]):.2f} s in the kernel"
                                          if kernel[side] else ""))
    if args.breakdown:
      parts = breakdown(args.iters)
      total = sum(parts.values())
      for name, t in parts.items():
        print(f"  {name:16s} {t * 1e3:8.1f} ms  ({100 * t / total:4.1f}% of the parts)")
    for side in sides:
      side.close()
  print(f"load average (1 min) after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
