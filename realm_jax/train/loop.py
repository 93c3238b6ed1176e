"""What the REALM trainer and the Open-QA fine-tuner share: one process per host, the mesh, the
(model, optimizer) state placed by the config's sharding rules, orbax checkpoints with resume, the
jitted step, metrics and progress lines, and the non-finite check.

`TrainLoop` is their base class. A subclass builds its data and model, calls `_place` and `_resume`,
then `_compile(step_fn, ...)` with its module-level step (`train/realm_step.train_step`,
`openqa/step.train_step`); its `_run()` (called by `run()`, which takes Ctrl-C only between two
steps: `realm_jax/interrupts.py`) feeds batches to `_step` and calls `_report` and
`_checkpoint`, which checks that every loss and gradient norm since the last check is finite before
anything is saved: a NaN stops the run with `NonFiniteLoss` and the last good checkpoint stays the
newest one.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from realm_jax import interrupts, layout, parallel
from realm_jax.config import RealmConfig
from realm_jax.errors import RealmError
from realm_jax.logs import RunLog
from realm_jax.storage import Storage
from realm_jax.train.checkpoints import CheckpointError, Checkpoints, CorruptCheckpoint
from realm_jax.train.config import flat_fields
from realm_jax.train.metrics import MetricsWriter, progress_line


class NonFiniteLoss(RealmError):
  """The loss or the gradient norm became NaN or infinite; the run stopped before saving it."""


def host_scalars(metrics: dict[str, jax.Array]) -> dict[str, float]:
  """Replicated scalar metrics as floats (from this process's own replica: works multi-host)."""
  return {k: float(np.asarray(v.addressable_data(0))) for k, v in metrics.items()}


class TrainLoop:
  """The parts of a training run that do not depend on the task (see the module docstring)."""

  def __init__(self, cfg: Any, storage: Storage | str, *, role: str, stop_after: int | None,
               log_fn: Callable[[str], None] | None, on_step: Callable[[int, int], None] | None):
    parallel.initialize_distributed(role)
    self.cfg, self.stop_after = cfg, stop_after
    self.on_step = on_step  # (step, last step of this run) after every step: progress bars
    self.is_chief = parallel.is_chief()
    self.log = RunLog(f"realm_jax.{role}", log_fn, chief=self.is_chief)
    self.storage = storage if isinstance(storage, Storage) else Storage.open(storage)
    self.mesh = parallel.make_mesh(cfg.mesh_model)
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    self.step = 0
    self.resumed_meta: dict | None = None  # the meta of the checkpoint `_resume` restored
    self._unchecked: list[tuple[int, dict[str, jax.Array]]] = []
    self._clock = (time.perf_counter(), 0)  # (time of the last report, its step)

  # -- state, checkpoints, the jitted step ----------------------------------------------------------
  def _place(self, model: nnx.Module, optimizer: nnx.Optimizer) -> None:
    """Shards the (model, optimizer) state by `cfg.param_sharding` and puts it on the mesh."""
    self.model, self.optimizer = model, optimizer
    state = nnx.state((model, optimizer))
    self.state_sharding = parallel.param_sharding(self.mesh, self.cfg.param_sharding, state)
    nnx.update((model, optimizer), parallel.place_state(state, self.state_sharding))

  def _resume(self, resume: bool, check_meta: Callable[[int, dict], None] | None = None) -> dict | None:
    """Opens `checkpoints/`; with `resume`, removes unfinished writes a killed save left, verifies the
    newest finalized step against its manifest and that it is a checkpoint of this kind of run and
    model, restores it in place and returns its data state (None when starting fresh). Without
    `resume`, existing checkpoints are refused."""
    cfg = self.cfg
    self.ckpt = Checkpoints(self.storage.uri(layout.CHECKPOINTS), keep=cfg.keep_checkpoints,
                            async_save=cfg.async_checkpointing)
    latest = self.ckpt.step_to_resume(resume)
    if resume and self.is_chief:
      self.ckpt.remove_leftovers(self.log)
    parallel.barrier(f"realm-jax-{self.log.logger.name}-leftovers-removed")
    if latest is None:
      if resume:
        self.log("no checkpoint to resume from: starting at step 0")
      return None
    try:
      self.ckpt.verify(latest)
    except CorruptCheckpoint as e:
      older = [s for s in self.ckpt.all_steps() if s < latest]
      hint = (f"; the checkpoint before it is step {max(older)}: move {self.ckpt.directory}/{latest} aside to "
              "resume from that one" if older else "; no older checkpoint is left")
      raise CorruptCheckpoint(f"{e} (checkpoint step {latest} is damaged{hint})") from None
    meta = self.ckpt.read_meta(latest)
    self._check_resumed(latest, meta)
    if check_meta is not None:
      check_meta(latest, meta)
    data_state, meta = self.ckpt.restore(latest, self.model, self.optimizer)
    self.step = int(meta["step"])
    self.resumed_meta = meta
    self.log(f"resumed from checkpoint step {self.step}")
    return data_state

  kind = "realm"  # what `meta["kind"]` says of this loop's checkpoints (the trainer: its task)

  def _check_resumed(self, step: int, meta: dict) -> None:
    """Refuses a checkpoint of another kind of run (ICT, REALM, Open-QA) or of another model."""
    where = f"{self.ckpt.directory}/{step}"
    stored = meta.get("config") or {}
    theirs = meta.get("kind") or stored.get("task")
    if theirs != self.kind:
      commands = {"realm": "realm-jax pretrain", "ict": "realm-jax ict", "openqa": "realm-jax finetune"}
      raise CheckpointError(f"{where} is a checkpoint of a {theirs!r} run ({commands.get(theirs, '?')}), this is "
                            f"a {self.kind!r} run: resume it with {commands.get(theirs, 'that command')} or use a "
                            "fresh storage root")
    try:
      model = RealmConfig.from_dict(stored["model"])
    except (KeyError, TypeError, RealmError) as e:
      raise CheckpointError(f"{where}: the checkpoint's stored model config is unreadable ({e})") from None
    if model.fingerprint() != self.cfg.model.fingerprint():
      ours, old = flat_fields(self.cfg.model), flat_fields(model)
      diff = [f"model.{k}={old.get(k)!r} there, {v!r} here" for k, v in ours.items() if old.get(k) != v]
      raise CheckpointError(f"{where} was written by model {model.fingerprint()}, this run's is "
                            f"{self.cfg.model.fingerprint()} ({'; '.join(diff[:4])}): resume with the same model "
                            "config or use a fresh storage root")

  def _compile(self, step_fn: Callable, **static: Any) -> None:
    """`step_fn(graphdef, state, *inputs, **static)` jitted: the state donated, its shardings kept."""
    graphdef, _ = nnx.split((self.model, self.optimizer))
    self._train_step = jax.jit(functools.partial(step_fn, graphdef, **static), donate_argnums=0,
                               out_shardings=(self.state_sharding, None))

  def run(self) -> Any:
    """Trains (the subclass's `_run`); Ctrl-C stops it before the next step, never inside JAX."""
    with interrupts.deferred():
      return self._run()

  def _run(self) -> Any:
    raise NotImplementedError

  def _step(self, *inputs: Any, end: int) -> dict[str, jax.Array]:
    """One jitted step on the current state; returns its (device) metrics."""
    interrupts.check()
    state = nnx.state((self.model, self.optimizer))
    if jax.process_count() > 1 and not hasattr(self._train_step, "as_text"):
      # Compile ahead, then meet: processes enter the first collective together.
      self._train_step = self._train_step.lower(state, *inputs).compile()
      parallel.barrier(f"realm-jax-{self.log.logger.name}-step-compiled")
    new_state, metrics = self._train_step(state, *inputs)
    nnx.update((self.model, self.optimizer), new_state)
    self.step += 1
    self._unchecked.append((self.step, {k: metrics[k] for k in ("loss", "grad_norm")}))
    if self.on_step is not None:
      self.on_step(self.step, end)
    return metrics

  def _begin(self, total: int) -> int:
    """Starts the clock of `run()`; returns its last step: `total`, or `stop_after` steps from here."""
    self._clock = (time.perf_counter(), self.step)
    return total if self.stop_after is None else min(total, self.step + self.stop_after)

  # -- what each step leaves behind -------------------------------------------------------------------
  def _check_finite(self) -> None:
    """Raises NonFiniteLoss naming the first step since the last check with a NaN/inf loss or
    gradient norm (nothing of that state is saved: the last checkpoint stays the newest)."""
    pending, self._unchecked = self._unchecked, []
    for step, values in pending:
      found = host_scalars(values)
      if not all(np.isfinite(v) for v in found.values()):
        self.ckpt.wait()
        last = self.ckpt.latest_step()
        kept = f"the last checkpoint is step {last}" if last is not None else "no checkpoint was written"
        raise NonFiniteLoss(f"non-finite loss at step {step} (loss {found['loss']}, grad_norm {found['grad_norm']}); "
                            f"stopped without saving: {kept} under {self.ckpt.directory}")

  def _report(self, metrics: dict[str, jax.Array], writer: MetricsWriter, history: list[dict], *, end: int,
              total: int, per_step: int, rate_name: str, extra: Callable[[], dict[str, float]],
              shown: tuple[str, ...]) -> None:
    """At every `log_every` step (and the last): the step's scalars and `extra()` to the history and
    the metrics on storage, and one progress line (step, the `shown` scalars, rate, ETA)."""
    if not (self.step % self.cfg.log_every == 0 or self.step == end):
      return
    self._check_finite()
    scalars = {**host_scalars(metrics), **extra()}
    t_last, since = self._clock
    elapsed = time.perf_counter() - t_last
    steps = self.step - since
    scalars[rate_name] = steps * per_step / max(elapsed, 1e-9)
    history.append({"step": self.step, **scalars})
    writer.write(self.step, scalars)
    self.log(progress_line(self.step, total, {k: scalars[k] for k in shown if k in scalars}, scalars[rate_name],
                           (end - self.step) * elapsed / max(steps, 1)))
    self._clock = (time.perf_counter(), self.step)

  def _checkpoint(self, writer: MetricsWriter, end: int, data_state: Callable[[], Any], meta: dict) -> None:
    """At every `checkpoint_every` step (and the last): after the finite check, save the state, the
    input position `data_state()` and `meta` (with the config), and flush the metrics."""
    if not (self.step % self.cfg.checkpoint_every == 0 or self.step == end):
      return
    self._check_finite()
    self.ckpt.save(self.step, self.model, self.optimizer, data_state(), {"config": self.cfg.to_dict(), **meta})
    writer.flush()
