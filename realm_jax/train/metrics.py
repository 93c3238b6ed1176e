"""Training metrics: TensorBoard event files and a JSONL log under `<root>/metrics`, plus a
console progress line (step, loss, examples/s, ETA). Only process 0 writes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from realm_jax import layout
from realm_jax.storage import Storage


def read_metrics(storage: Storage, name: str) -> list[dict]:
  """The rows of `metrics/<name>.jsonl` on a storage root ([] when there is none yet)."""
  path = f"{layout.METRICS}/{name}.jsonl"
  if not storage.exists(path):
    return []
  return [json.loads(line) for line in storage.read_bytes(path).decode().splitlines() if line]


class MetricsWriter:
  """Scalars to TensorBoard (tensorboardX) and `metrics/<name>.jsonl` on the storage root."""

  def __init__(self, storage: Storage, name: str = "train", enabled: bool = True):
    self.storage, self.name, self.enabled = storage, name, enabled
    self.rows: list[dict] = []
    self._tb = None
    self._tb_dir = None
    if not enabled:
      return
    self.rows = read_metrics(storage, name)  # a resumed run appends to its earlier log
    from tensorboardX import SummaryWriter
    on_disk = storage.on_disk(f"{layout.METRICS}/tb-{name}")
    self._upload = on_disk is None  # object stores: write locally, upload the event files at each flush
    self._tb_dir = tempfile.mkdtemp(prefix="realm-jax-tb-") if self._upload else str(on_disk)
    os.makedirs(self._tb_dir, exist_ok=True)
    self._tb = SummaryWriter(self._tb_dir, flush_secs=30)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
    self.rows = [r for r in self.rows if r["step"] < step] + [row]  # a resumed run rewrites its tail
    for k, v in scalars.items():
      self._tb.add_scalar(f"{self.name}/{k}", float(v), int(step))

  def flush(self) -> None:
    if not self.enabled:
      return
    self._tb.flush()
    self._write_log()

  def close(self) -> None:
    """Writes everything; on an object store the event files are uploaded after TensorBoard's
    writer is closed (its flush can leave the newest events queued) and the local staging
    directory is removed."""
    if not self.enabled:
      return
    self._tb.close()
    self._write_log()
    if self._upload:
      shutil.rmtree(self._tb_dir, ignore_errors=True)

  def _write_log(self) -> None:
    data = "".join(json.dumps(r) + "\n" for r in self.rows).encode()
    self.storage.write_bytes(f"{layout.METRICS}/{self.name}.jsonl", data)
    if self._upload:
      for fname in os.listdir(self._tb_dir):
        self.storage.put_file(os.path.join(self._tb_dir, fname), f"{layout.METRICS}/tb-{self.name}/{fname}")


def progress_line(step: int, total: int, scalars: dict[str, float], examples_per_s: float, eta_s: float) -> str:
  """`step 12/200 loss=3.1 ... ex/s=4.2 ETA 1m05s`: one log line per reported step."""
  shown = " ".join(f"{k}={v:.4g}" for k, v in scalars.items() if k != "gold_count")
  eta = f"{int(eta_s // 60)}m{int(eta_s % 60):02d}s" if eta_s == eta_s else "?"
  return f"step {step}/{total} {shown} ex/s={examples_per_s:.1f} ETA {eta}"
