"""Kills across both roles: a real trainer and a real refresher on one local storage root, SIGKILLed
at random moments and restarted (the trainer with `--resume`), then checked against a run nobody
killed. Used by tests/test_chaos.py (a few kills) and benchmarks/chaos.py (`--kills N`).

The run is made deterministic so that its final parameters can be compared with an uninterrupted
run's: a checkpoint every step and `max_index_staleness=0`, so before step s+1 the trainer waits for
the index the refresher built from checkpoint s, and trains on exactly that one, however the kills
fall. Everything else a resume restores from the checkpoint (parameters, optimizer, data iterator,
dropout keys), so the final parameters are expected bit for bit equal (same CPU, same device count).

Kill kinds, drawn at random:
  trainer      the trainer at a random moment after it has started training
  checkpoint   the trainer while orbax writes a checkpoint (a `*.orbax-checkpoint-tmp*` entry exists)
  refresher    the refresher at a random moment after it began restoring a checkpoint
  publish      the refresher frozen inside a publish window (tests/helpers/pausing_refresher.py:
               embedding, upload, before_manifest, before_latest, after_latest)
  both         trainer and refresher at the same random moment
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import random
import re
import time

import numpy as np

from realm_jax import layout, publish
from realm_jax.storage import Storage
from tests.test_refresh_e2e import REFUSED_RE, SWAP_RE, Proc, refresher_args, root_with_corpus, trainer_args

KINDS = ("trainer", "checkpoint", "refresher", "publish", "both")
PUBLISH_POINTS = ("embedding", "upload", "before_manifest", "before_latest", "after_latest")
RESUMED_RE = re.compile(r"resumed from checkpoint step (\d+)|no checkpoint to resume from")
STEP_RE = re.compile(r"step (\d+)/\d+ loss=")


def overrides(steps: int) -> list[str]:
  return [f"num_train_steps={steps}", "checkpoint_every=1", "max_index_staleness=0", "index_poll_seconds=0.2",
          "batch_size=8", "log_every=1", "keep_checkpoints=1000", "keep_index_versions=1000"]


@dataclasses.dataclass
class ChaosReport:
  kills: list[str] = dataclasses.field(default_factory=list)  # one entry per SIGKILL: its kind
  resumes: list[tuple[int | None, int | None]] = dataclasses.field(default_factory=list)  # (newest, resumed)
  failed_restarts: list[str] = dataclasses.field(default_factory=list)  # a process that died on its own
  torn_loads: int = 0
  swaps: int = 0
  versions: int = 0
  incomplete_versions: int = 0
  lost_steps: list[int] = dataclasses.field(default_factory=list)
  max_param_diff: float = float("nan")
  final_step: int = 0
  seconds: float = 0.0

  def summary(self) -> str:
    counts = {k: self.kills.count(k) for k in KINDS if self.kills.count(k)}
    return (f"kills tried: {len(self.kills)} ({', '.join(f'{k} {n}' for k, n in counts.items())}); "
            f"trainer resumes: {len(self.resumes)}, all from the newest finalised checkpoint: "
            f"{all(a == b for a, b in self.resumes)}; failed restarts: {len(self.failed_restarts)}; "
            f"torn loads seen: {self.torn_loads}; swaps: {self.swaps}; index versions: {self.versions} complete "
            f"(all verify), {self.incomplete_versions} unfinished left; lost steps: {len(self.lost_steps)}; "
            f"final step {self.final_step}; max |params - uninterrupted| = {self.max_param_diff:g}; "
            f"{self.seconds:.0f} s")


def _finalised(storage: Storage) -> int | None:
  """The newest checkpoint step orbax has committed (what a resume must take)."""
  steps = [int(n) for n in storage.listdir(layout.CHECKPOINTS) if n.isdigit()
           and storage.exists(f"{layout.CHECKPOINTS}/{n}/commit_success.txt")]
  return max(steps) if steps else None


def _writing_checkpoint(storage: Storage) -> bool:
  """Whether orbax is writing a checkpoint step: a `*.orbax-checkpoint-tmp*` entry (local files),
  or a step directory without `commit_success.txt` yet (GCS, where orbax writes in place)."""
  local = storage.on_disk(layout.CHECKPOINTS)
  if local is not None:  # an empty temporary directory counts too
    return local.exists() and any(".orbax-checkpoint-tmp" in p.name for p in local.iterdir())
  return any(n.isdigit() and not storage.exists(f"{layout.CHECKPOINTS}/{n}/commit_success.txt")
             for n in storage.listdir(layout.CHECKPOINTS))


class _Run:
  """The two processes of one run, their logs under `logs`, restarts counted."""

  def __init__(self, root: str, logs: pathlib.Path, env: dict[str, str], steps: int):
    self.root, self.logs, self.env, self.steps = root, logs, env, steps
    self.storage = Storage.open(root)
    self.trainers: list[Proc] = []
    self.refreshers: list[Proc] = []
    self.report = ChaosReport()

  def start_trainer(self) -> Proc:
    resume = bool(self.trainers)
    newest = _finalised(self.storage) if resume else None
    args = trainer_args(self.root, *(["--resume"] if resume else []), overrides=overrides(self.steps))
    proc = Proc(args, self.logs / f"trainer-{len(self.trainers)}.log", self.env)
    proc.newest_at_start = newest
    self.trainers.append(proc)
    return proc

  def start_refresher(self, pause: str | None = None) -> Proc:
    args = refresher_args(self.root, overrides=overrides(self.steps))
    log = self.logs / f"refresher-{len(self.refreshers)}.log"
    if pause is None:
      proc = Proc(args, log, self.env)
    else:
      proc = Proc(args[1:], log, {**self.env, "REALM_JAX_FAULT_PAUSE": pause}, module="tests.helpers.pausing_refresher")
    self.refreshers.append(proc)
    return proc

  @property
  def trainer(self) -> Proc:
    return self.trainers[-1]

  @property
  def refresher(self) -> Proc:
    return self.refreshers[-1]

  def kill(self, proc: Proc, kind: str) -> None:
    if proc.popen.poll() is not None:
      self.report.failed_restarts.append(f"{proc.log_path.name} exited {proc.popen.returncode} on its own")
    proc.kill()
    self.report.kills.append(kind)

  def trainer_step(self) -> int:
    steps = STEP_RE.findall(self.trainer.text())
    return int(steps[-1]) if steps else 0

  def training(self) -> bool:
    """The trainer is alive and has steps left (a kill now does not just hit its exit)."""
    return self.trainer.popen.poll() is None and self.trainer_step() < self.steps - 1


def _wait(cond, timeout: float, what: str) -> bool:
  deadline = time.monotonic() + timeout
  while not cond():
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
    time.sleep(0.02)
  return True


def _one_kill(run: _Run, kind: str, rng: random.Random) -> None:
  """Performs one kill of `kind` on the running pair and restarts what it killed."""
  if kind in ("trainer", "both"):
    run.trainer.wait_for(r"step \d+/\d+ loss=", timeout=600, start=0)
    time.sleep(rng.uniform(0.0, 3.0))
    if not run.training():
      return
    run.kill(run.trainer, kind)
    if kind == "both":
      run.kill(run.refresher, kind)
      run.start_refresher()
    run.start_trainer()
  elif kind == "checkpoint":
    # Past its resume (which removes a killed write's leftovers), then inside a write of its own.
    run.trainer.wait_for(r"step \d+/\d+ loss=", timeout=600, start=0)
    _wait(lambda: not run.training() or _writing_checkpoint(run.storage), 600, "a checkpoint write")
    if not run.training():
      return
    run.kill(run.trainer, kind)
    run.start_trainer()
  elif kind == "refresher":
    run.refresher.wait_for(r"checkpoint step \d+: restoring", timeout=600)
    time.sleep(rng.uniform(0.0, 2.0))
    if not run.training():
      return
    run.kill(run.refresher, kind)
    run.start_refresher()
  elif kind == "publish":
    # The running refresher goes at a random moment (a kill too), a pausing one takes over, and is
    # killed frozen inside the publish window; then a plain one carries on.
    time.sleep(rng.uniform(0.0, 1.0))
    run.kill(run.refresher, "refresher")
    point = rng.choice(PUBLISH_POINTS)
    paused = run.start_refresher(pause=point)
    _wait(lambda: not run.training() or "FAULT PAUSE at" in paused.text() or paused.popen.poll() is not None,
          600, f"the refresher to pause at {point}")
    if "FAULT PAUSE at" not in paused.text() and paused.popen.poll() == 0:
      return  # training ended first and the refresher with it: nothing to kill
    run.kill(paused, kind)
    run.start_refresher()
  else:
    raise ValueError(kind)


def run_pair(root: str, logs: pathlib.Path, env: dict[str, str], steps: int, kinds: list[str],
             rng: random.Random) -> _Run:
  """Trains `steps` steps with a refresher alongside, performing the kills `kinds` in order, then
  lets both finish (the refresher exits on TRAINING_DONE)."""
  logs.mkdir(parents=True, exist_ok=True)
  run = _Run(root, logs, env, steps)
  run.start_trainer()
  run.trainer.wait_for(r"using index", timeout=600)  # the trainer publishes the step-0 index itself
  run.start_refresher()
  for kind in kinds:
    if not run.training():
      break
    _one_kill(run, kind, rng)
  assert run.trainer.wait(timeout=1200) == 0, run.trainer.text()[-3000:]
  assert run.refresher.wait(timeout=300) == 0, run.refresher.text()[-3000:]
  return run


def final_params(root: str, steps: int) -> dict[str, np.ndarray]:
  """The model parameters of checkpoint step `steps`, by path."""
  import jax
  from flax import nnx

  from realm_jax.models import RealmModel
  from realm_jax.train.checkpoints import Checkpoints
  from realm_jax.train.config import load_config

  cfg = load_config("smoke", overrides(steps))
  model = RealmModel(cfg.model, rngs=nnx.Rngs(12345))  # every value is overwritten by the restore
  ckpt = Checkpoints(Storage.open(root).uri(layout.CHECKPOINTS), read_only=True)
  for part in ("retriever", "encoder"):
    ckpt.restore_part(steps, model, part)
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def check(run: _Run, reference_root: str) -> ChaosReport:
  """Everything the chaos run must show; fills and returns the report (asserting as it goes)."""
  report, storage, steps = run.report, run.storage, run.steps
  trainer_logs = [t.text() for t in run.trainers]
  refresher_logs = [r.text() for r in run.refreshers]
  # Training reached its last step and said so.
  assert storage.exists(layout.TRAINING_DONE), trainer_logs[-1][-3000:]
  assert f"training done at step {steps}" in trainer_logs[-1], trainer_logs[-1][-3000:]
  report.final_step = steps
  # Every index version verifies; LATEST loads.
  complete = publish.list_versions(storage, "index")
  report.versions = len(complete)
  report.incomplete_versions = len(publish.list_versions(storage, "index", complete_only=False)) - len(complete)
  for version in complete:
    publish.open_version(storage, "index", version, verify=True)
  from realm_jax.data.corpus import CorpusReader
  from realm_jax.retrieval import index as index_lib

  latest = index_lib.load_index(storage, corpus=CorpusReader(storage))
  assert latest.info.step == steps - 1 or latest.info.step == steps, latest.info
  # No trainer refused (or swapped in) a torn version; every swapped-in version is a complete one.
  report.torn_loads = sum(len(REFUSED_RE.findall(t)) for t in trainer_logs)
  assert report.torn_loads == 0, [REFUSED_RE.findall(t) for t in trainer_logs]
  swapped = [new for t in trainer_logs for _, new, _, _ in SWAP_RE.findall(t)]
  report.swaps = len(swapped)
  assert set(swapped) <= set(complete), sorted(set(swapped) - set(complete))
  # Every resume came from the newest finalised checkpoint at the time of the restart.
  for k, (proc, text) in enumerate(zip(run.trainers[1:], trainer_logs[1:]), 1):
    m = RESUMED_RE.search(text)
    if m is None and k < len(run.trainers) - 1 and not STEP_RE.search(text):
      continue  # killed while starting, before it chose a checkpoint: the next one resumes
    assert m, text[-3000:]
    resumed = int(m.group(1)) if m.group(1) else None
    report.resumes.append((proc.newest_at_start, resumed))
    assert resumed == proc.newest_at_start, (proc.log_path.name, proc.newest_at_start, resumed)
  # No step lost: a checkpoint of every step (checkpoint_every=1, all kept).
  have = {int(n) for n in storage.listdir(layout.CHECKPOINTS) if n.isdigit()}
  report.lost_steps = sorted(set(range(1, steps + 1)) - have)
  assert not report.lost_steps, report.lost_steps
  assert not report.failed_restarts, report.failed_restarts
  assert not any("Traceback" in t for t in trainer_logs + refresher_logs)
  # The final parameters equal the uninterrupted run's.
  ours, theirs = final_params(run.root, steps), final_params(reference_root, steps)
  assert ours.keys() == theirs.keys()
  report.max_param_diff = max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in ours)
  assert report.max_param_diff == 0.0, report.max_param_diff
  return report


def chaos(seed_corpus: Storage, work: pathlib.Path, kills: int, steps: int, seed: int,
          roots: str | None = None) -> ChaosReport:
  """An uninterrupted run and a run with `kills` random kills on two fresh roots (under `roots`, a
  storage URI such as `gs://bucket`, else under `work`), checked against each other; logs under
  `work`. The first kills take each kind once, in random order; the rest are drawn at random. (A
  `publish` kill also kills the refresher it replaces: two kills.)"""
  t0 = time.monotonic()
  rng = random.Random(seed)
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(work / "jax-cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  base = roots.rstrip("/") if roots else str(work)
  reference = root_with_corpus(seed_corpus, f"{base}/uninterrupted")
  run_pair(reference, work / "logs-uninterrupted", env, steps, [], rng)
  root = root_with_corpus(seed_corpus, f"{base}/chaos")
  kinds = rng.sample(KINDS, len(KINDS))[:kills] + [rng.choice(KINDS) for _ in range(kills - len(KINDS))]
  run = run_pair(root, work / "logs-chaos", env, steps, kinds, rng)
  report = check(run, reference)
  report.seconds = time.monotonic() - t0
  return report
