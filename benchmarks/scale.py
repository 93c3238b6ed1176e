"""Scale rehearsal: N blocks, P trainer processes x D devices, the refresher beside them.

One command:
  python benchmarks/scale.py --blocks 200000 --processes 2 --devices-per-process 2 --json s.json

It runs, in a fresh work directory (removed at the end unless `--keep`):
  1. corpus: a synthetic format-2 corpus of `--blocks` blocks of `--block-len` random token ids
     (through `ShardWriter`, the writer `realm-jax corpus build` uses; no tokenizer or tagger, whose
     cost is the documents', not the scale's), two salient spans per block;
  2. index: the first index version, embedded by P processes with the run's initial document
     tower and published by process 0 (`build_and_publish_index`, what a trainer's bootstrap does);
  3. trainer: P processes x D devices (`jax.distributed` on localhost), `index_refresh=async` with
     `max_index_staleness=2` and a checkpoint every step, so that before step 4 the trainer waits
     for, and swaps in, a version the refresher embedded from one of its checkpoints;
  4. refresher: P processes (`Refresher`, one version), started once the trainer's first step is
     done, so that the trainer's start-up is measured without it.
Each process reads storage through a wrapper that counts the bytes of every object it reads.

The JSON (`--json`) holds `blocks`, `processes`, `devices_per_process`, `block_len`,
`corpus_build_seconds`, `index_publish_seconds`, `index_bytes`, `trainer` (per process:
`peak_rss_bytes`, `startup_seconds` = launch -> first step done, `step_seconds` = median of the
steps that did not wait for an index, `swap_seconds` = reading the swapped-in version's rows,
`swap_bytes_read`, `swap_share_bytes` = the version's bytes of that process's rows) and
`refresher` (per process: `peak_rss_bytes`, `blocks_per_second` over its own shards).

The towers default to a micro BERT (`--tower micro`: 1 layer, hidden 32) so that embedding N
blocks on 2 CPU cores takes minutes; the index rows are 128-d float32 as in the paper, so every
memory and byte figure is the real one. `--tower tiny` uses the smoke preset's towers.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

TOWERS = {
    "micro": ["model.bert.hidden_size=32", "model.bert.num_layers=1", "model.bert.num_heads=1",
              "model.bert.intermediate_size=64", "model.span_hidden_size=16"],
    "tiny": [],
}


def overrides(args) -> list[str]:
  batch = max(8, args.processes * args.devices_per_process)
  return TOWERS[args.tower] + [
      f"model.block_len={args.block_len}", f"batch_size={batch}", "num_train_steps=1000", "warmup_steps=1",
      "log_every=1", "checkpoint_every=1", "async_checkpointing=false", "index_refresh=async",
      "index_poll_seconds=0.5", "max_index_staleness=2", f"data_shards={args.processes}", "keep_index_versions=2"]


# -- the child processes ----------------------------------------------------------------------------

CHILD_PRELUDE = """
import json, logging, os, pathlib, resource, sys, time
LAUNCH = float(os.environ["SCALE_LAUNCH"])
ROOT, OUT, OVERRIDES = sys.argv[1], pathlib.Path(sys.argv[2]), json.loads(sys.argv[3])
import jax
from realm_jax.storage import Storage
from realm_jax.storage.local import LocalBackend

from tests.helpers.counting_storage import Counting

backend = Counting(LocalBackend(pathlib.Path(ROOT)))
storage = Storage(ROOT, backend)
messages = []
class Keep(logging.Handler):
  def emit(self, record):
    messages.append((time.time(), record.getMessage()))
logging.getLogger("realm_jax").addHandler(Keep())
logging.getLogger("realm_jax").setLevel(logging.INFO)

def peak_rss():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def write(name, obj):
  (OUT / f"{name}-{jax.process_index()}.json").write_text(json.dumps(obj))
"""

INDEX_CHILD = CHILD_PRELUDE + """
from realm_jax import parallel
from realm_jax.data.corpus import CorpusReader
from realm_jax.retrieval import index as index_lib
from realm_jax.train.config import load_config
from realm_jax.train.trainer import init_model
parallel.initialize_distributed("train")
cfg = load_config("smoke", OVERRIDES)
embedder = parallel.local_copy(init_model(cfg).retriever.doc_embedder)
t0 = time.time()
info = index_lib.build_and_publish_index(storage, embedder, CorpusReader(storage, "corpus"), cfg.model, step=0,
                                         mesh=parallel.local_mesh(), with_scann=False)
write("index", {"seconds": time.time() - t0, "version": info.version, "peak_rss_bytes": peak_rss()})
"""

TRAINER_CHILD = CHILD_PRELUDE + """
from realm_jax.retrieval import mips
from realm_jax.train.config import load_config
from realm_jax.train.trainer import Trainer

steps, loads = [], []
real_step, real_load = Trainer._step, Trainer._load

def timed_step(self, *a, **kw):
  t0 = time.time()
  out = jax.block_until_ready(real_step(self, *a, **kw))
  steps.append((t0, time.time()))
  if len(steps) == 1 and jax.process_index() == 0:
    (OUT / "first-step").write_text("done")
  return out

def timed_load(self, version=None):
  t0 = time.time()
  out = real_load(self, version)
  loads.append({"version": out[0].info.version, "seconds": time.time() - t0})
  return out

Trainer._step, Trainer._load = timed_step, timed_load
trainer = Trainer(load_config("smoke", OVERRIDES), storage, log_fn=lambda m: None, stop_after=4)
result = trainer.run()
ranges = mips.local_row_ranges(trainer.corpus.num_blocks, trainer.mesh)
write("trainer", {"steps": steps, "loads": loads, "versions": result.index_versions,
                  "read_bytes": backend.read_bytes, "rows": [list(r) for r in ranges],
                  "launch": LAUNCH, "peak_rss_bytes": peak_rss()})
"""

REFRESHER_CHILD = CHILD_PRELUDE + """
import re
from realm_jax.refresh.refresher import Refresher, RefreshOptions
result = Refresher(storage, RefreshOptions(max_versions=1, poll_seconds=0.5, with_scann=False),
                   log_fn=lambda m: None).run()
embedded = [re.search(r"embedded (\\d+) blocks in ([0-9.]+) s", m) for _, m in messages]
blocks, seconds = next((int(e.group(1)), float(e.group(2))) for e in embedded if e)
write("refresher", {"versions": [i.version for i in result.published], "blocks": blocks, "embed_seconds": seconds,
                    "peak_rss_bytes": peak_rss()})
"""


def free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Job:
  """P processes of one child script joined by `jax.distributed` on localhost."""

  def __init__(self, script: str, args, root: pathlib.Path, out: pathlib.Path, log: pathlib.Path):
    port, launch = free_port(), time.time()
    self.procs = []
    for pid in range(args.processes):
      env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(args.devices_per_process),
             "SCALE_LAUNCH": repr(launch),
             "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
      if args.processes > 1:  # one process runs as a user runs it: no jax.distributed (and no Gloo)
        env.update({"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(args.processes),
                    "JAX_PROCESS_ID": str(pid)})
      stderr = open(f"{log}-{pid}.log", "w")
      self.procs.append(subprocess.Popen(
          [sys.executable, "-c", script, str(root), str(out), json.dumps(overrides(args))],
          env=env, stdout=stderr, stderr=subprocess.STDOUT))

  def running(self) -> bool:
    return any(p.poll() is None for p in self.procs)

  def wait(self, deadline: float, name: str) -> None:
    while self.running():
      if time.time() > deadline:
        raise TimeoutError(f"{name} did not finish within the time limit")
      failed = [p for p in self.procs if p.poll() not in (None, 0)]
      if failed:
        break
      time.sleep(0.2)
    bad = [(i, p.returncode) for i, p in enumerate(self.procs) if p.wait() != 0]
    if bad:
      raise RuntimeError(f"{name}: processes {bad} failed (logs in the work directory)")

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def build_corpus(root: pathlib.Path, blocks: int, block_len: int, shard_blocks: int, seed: int) -> dict:
  """A format-2 corpus of random token rows through the corpus writer."""
  import numpy as np

  from realm_jax.data.blocks import Block
  from realm_jax.data.corpus import ShardWriter, write_tokenizer
  from realm_jax.data.corpus_reader import MANIFEST
  from realm_jax.data.tokenizer import load_tokenizer
  from realm_jax.storage import Storage

  storage, tok = Storage.open(str(root)), load_tokenizer("minilm")
  writer = ShardWriter(storage, "corpus", shard_blocks, block_len, tok)
  rng = np.random.default_rng(seed)
  body = block_len - 6  # [CLS] 3 title tokens [SEP] body [SEP]
  text = "a " * body
  offsets = np.stack([np.arange(body) * 2, np.arange(body) * 2 + 1], axis=-1).astype(np.int32)
  sentences = np.asarray([[0, len(text)]], np.int32)
  for start in range(0, blocks, 4096):
    n = min(4096, blocks - start)
    ids = rng.integers(1000, 30000, (n, body + 3), dtype=np.int32)
    where = rng.integers(0, body // 2, (n, 2)) * 2 + np.asarray([0, body])  # two spans, one per half
    for i in range(n):
      spans = np.stack([where[i] * 1, where[i] * 1 + 1], axis=-1).astype(np.int32)
      writer.add(Block(block_id=-1, title="t", text=text, title_ids=ids[i, :3], body_ids=ids[i, 3:],
                       body_offsets=offsets, sentences=sentences, salient_spans=spans))
  writer.flush()
  tok_files = write_tokenizer(storage, "corpus", tok)
  manifest = writer.manifest(tok_files, "synthetic", {"documents": blocks}, [])
  storage.write_json(f"corpus/{MANIFEST}", manifest)
  return manifest


def reuse_corpus(kept: pathlib.Path, root: pathlib.Path, args) -> float:
  """Hard-links the corpus of a kept work directory (`--keep`) into this run; returns the build time
  that run recorded."""
  manifest_path = kept / "run" / "corpus" / "manifest.json"
  try:
    manifest = json.loads(manifest_path.read_text())
    recorded = json.loads((kept / "corpus-build.json").read_text())
  except (OSError, ValueError) as e:
    raise RuntimeError(f"{kept}: not a kept scale.py work directory ({e})") from None
  if (manifest["num_blocks"], manifest["block_len"]) != (args.blocks, args.block_len):
    raise RuntimeError(f"{manifest_path}: {manifest['num_blocks']} blocks of {manifest['block_len']} tokens, "
                       f"not {args.blocks} of {args.block_len}")
  shutil.copytree(kept / "run" / "corpus", root / "corpus", copy_function=os.link)
  return recorded["seconds"]


def load_average() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(args, work: pathlib.Path) -> dict:
  root, out = work / "run", work / "results"
  root.mkdir()
  out.mkdir()
  deadline = time.time() + args.timeout
  t0 = time.time()
  if args.corpus_from:
    corpus_seconds = reuse_corpus(pathlib.Path(args.corpus_from), root, args)
  else:
    build_corpus(root, args.blocks, args.block_len, args.shard_blocks, args.seed)
    corpus_seconds = time.time() - t0
    (work / "corpus-build.json").write_text(json.dumps({"seconds": corpus_seconds}))
  print(f"corpus: {args.blocks} blocks in {corpus_seconds:.1f} s (load {load_average()})", flush=True)

  jobs = []
  try:
    job = Job(INDEX_CHILD, args, root, out, work / "index")
    jobs.append(job)
    job.wait(deadline, "index")
    index = json.loads((out / "index-0.json").read_text())
    index_dir = root / "index" / index["version"]
    index_bytes = sum(p.stat().st_size for p in (index_dir / "embeddings").iterdir())
    print(f"index: {index['version']} ({index_bytes / 1e6:.1f} MB) in {index['seconds']:.1f} s "
          f"(load {load_average()})", flush=True)

    trainer = Job(TRAINER_CHILD, args, root, out, work / "trainer")
    jobs.append(trainer)
    while not (out / "first-step").exists():
      if not trainer.running() or time.time() > deadline:
        trainer.wait(deadline, "trainer")
        raise RuntimeError("the trainer stopped before its first step")
      time.sleep(0.2)
    print(f"trainer: first step done (load {load_average()}); starting the refresher", flush=True)
    refresher = Job(REFRESHER_CHILD, args, root, out, work / "refresher")
    jobs.append(refresher)
    trainer.wait(deadline, "trainer")
    refresher.wait(deadline, "refresher")
  finally:
    for job in jobs:
      job.kill()

  trainers, refreshers = [], []
  for pid in range(args.processes):
    t = json.loads((out / f"trainer-{pid}.json").read_text())
    first, swapped = t["loads"][0], t["loads"][-1]
    if len(t["loads"]) < 2 or swapped["version"] == first["version"]:
      raise RuntimeError(f"trainer process {pid} never swapped in a new index version: {t['loads']}")
    emb_prefix = f"index/{swapped['version']}/embeddings/"
    swap_read = sum(v for k, v in t["read_bytes"].items() if k.startswith(f"index/{swapped['version']}/"))
    own_rows = sum(hi - lo for lo, hi in t["rows"])
    version_bytes = sum(p.stat().st_size for p in (root / emb_prefix).iterdir())
    share = version_bytes * own_rows / args.blocks
    waits = {i for i, (a, _) in enumerate(t["steps"]) if i > 0 and a - t["steps"][i - 1][1] > 1.0}
    durations = [b - a for i, (a, b) in enumerate(t["steps"]) if i > 0 and i not in waits] or \
        [b - a for a, b in t["steps"]]
    trainers.append({"process": pid, "peak_rss_bytes": t["peak_rss_bytes"],
                     "startup_seconds": round(t["steps"][0][1] - t["launch"], 2),
                     "step_seconds": round(statistics.median(durations), 4),
                     "swap_seconds": round(swapped["seconds"], 3), "swap_bytes_read": swap_read,
                     "swap_share_bytes": int(share), "startup_bytes_read": sum(
                         v for k, v in t["read_bytes"].items() if k.startswith("corpus/")
                         or k.startswith(f"index/{first['version']}/"))})
    r = json.loads((out / f"refresher-{pid}.json").read_text())
    refreshers.append({"process": pid, "peak_rss_bytes": r["peak_rss_bytes"],
                       "blocks_per_second": round(r["blocks"] / max(r["embed_seconds"], 1e-9), 1)})
  return {"blocks": args.blocks, "processes": args.processes, "devices_per_process": args.devices_per_process,
          "block_len": args.block_len, "tower": args.tower, "corpus_build_seconds": round(corpus_seconds, 2),
          "index_publish_seconds": round(index["seconds"], 2), "index_bytes": index_bytes,
          "trainer": trainers, "refresher": refreshers}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--blocks", type=int, default=200_000)
  p.add_argument("--processes", type=int, default=2)
  p.add_argument("--devices-per-process", type=int, default=2)
  p.add_argument("--block-len", type=int, default=64)
  p.add_argument("--shard-blocks", type=int, default=10_000)
  p.add_argument("--tower", choices=sorted(TOWERS), default="micro")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--timeout", type=float, default=3600, help="seconds for the whole rehearsal")
  p.add_argument("--workdir", help="a new directory to create and work in (default: a temporary one)")
  p.add_argument("--keep", action="store_true", help="keep the work directory (corpus, index, logs)")
  p.add_argument("--corpus-from", help="a work directory kept by an earlier run (--keep) with a corpus of the same "
                 "size: its corpus files are hard-linked, not rebuilt (the recorded build time is reported)")
  p.add_argument("--json", help="write the result here")
  args = p.parse_args(argv)
  if args.workdir:
    work = pathlib.Path(args.workdir)
    try:
      work.mkdir(parents=True)
    except FileExistsError:
      sys.exit(f"scale.py: {work} exists; name a new directory (nothing there is touched)")
  else:
    work = pathlib.Path(tempfile.mkdtemp(prefix="realm-scale-"))
  before = load_average()
  print(f"load average before: {before}  (work directory {work})", flush=True)
  try:
    result = run(args, work)
  except (RuntimeError, TimeoutError) as e:
    sys.exit(f"scale.py: {e} (work directory kept: {work})")
  result["load_average"] = {"before": before, "after": load_average()}
  print(json.dumps(result, indent=1))
  print(f"load average after: {load_average()}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
  if not args.keep:
    shutil.rmtree(work)


if __name__ == "__main__":
  main()
