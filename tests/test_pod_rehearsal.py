"""The TPU pod path rehearsed on localhost: tpu/README.md's walkthrough (sections 1-6), in order.

A fake `gcloud` (tests/helpers/fake_gcloud.py) keeps queued resources and runs each worker's ssh
command as its own process group in its own home, with a Cloud TPU VM's environment (a metadata
server that JAX's cluster detection reads, 2 CPU devices); the bucket is fake-gcs-server. All the
rest is real: the kit's scripts, the worker shell, `realm-jax` processes (ICT and REALM on a
2-worker "v4-16" joined by jax.distributed, the refresher on a "v4-8", fine-tuning, log shippers).

What differs from the page, each named where it happens (`REHEARSAL`): the trainer type v4-16 (2
workers), the model shrunk with `--set` on the named configs, the facts corpus for the dump,
tiny random weights for BERT-base, short intervals. In the middle of REALM pre-training the
trainer is preempted (queued resource SUSPENDED, its VMs' processes killed, disks wiped): the
watcher must re-create, re-install and resume it, and the run must finish with both workers'
logs from before and after the preemption in the bucket. The test always kills what it started.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from realm_jax.storage import Storage
from tests.helpers import fake_cloud, fake_gcloud
from tests.helpers.facts_corpus import write_documents

REPO = Path(__file__).resolve().parents[1]
README = REPO / "tpu" / "README.md"

REALM_STEPS = 10  # checkpoints every 2: the preemption comes after the first finished one
TINY_MODEL = ["model.bert.hidden_size=128", "model.bert.num_layers=2", "model.bert.num_heads=2",
              "model.bert.intermediate_size=512", "model.bert.dtype=float32", "model.span_hidden_size=64",
              "model.block_len=64"]
TRAIN = TINY_MODEL + ["model.query_len=32", "model.num_candidates=4", "target_slice=null", "batch_size=8",
                      "grad_accum_steps=1", "warmup_steps=1", "log_every=1", "checkpoint_every=2",
                      "index_poll_seconds=1"]
REHEARSAL = {  # --set appended to each trainer command of the page: a tiny model, a few steps
    "ict": TRAIN + ["num_train_steps=2"],
    "pretrain": TRAIN + [f"num_train_steps={REALM_STEPS}"],
    "finetune": TINY_MODEL + ["model.query_len=16", "model.reader_len=80", "model.reader_beam_size=4",
                              "retriever_beam_size=16", "batch_size=8", "num_train_steps=4", "checkpoint_every=2",
                              "log_every=1", "warmup_steps=1", "eval_questions=", "max_answers=2",
                              "max_answer_tokens=4"],
}
TYPES = {"v4-32": "v4-16"}  # REHEARSAL: a 2-worker trainer


def walkthrough() -> list[str]:
  """The shell lines of sections 1-6 of tpu/README.md, continuations joined, comments dropped."""
  text = README.read_text()
  body = text[text.index("## 1. "):text.index("## 7. ")]
  lines = []
  for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split("  #")[0].strip()
      if line:
        lines.append(re.sub(r"\s+", " ", line))
  return lines


class Rehearsal:
  """Runs the page's lines with an environment, like a shell would, and keeps what happened."""

  def __init__(self, tmp: Path, env: dict, bucket: str):
    self.tmp, self.env, self.bucket = tmp, env, bucket
    self.cwd = tmp / "workstation"
    self.cwd.mkdir()
    self.ran: list[str] = []
    self.skipped: list[str] = []

  def expand(self, text: str) -> str:
    return re.sub(r"\$(\w+)", lambda m: self.env.get(m.group(1), ""), text)

  def shell(self, line: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", "-c", line], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=600)
    assert not check or r.returncode == 0, (line, r.stdout[-3000:], r.stderr[-3000:])
    return r

  def kit(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    return self.shell(shlex.join([sys.executable, str(REPO / argv[0]), *argv[1:]]), check)

  def realm_jax(self, argv: list[str]) -> subprocess.CompletedProcess:
    return self.shell(shlex.join([sys.executable, "-m", "realm_jax", *argv]))

  def status(self, job: str) -> dict[str, str]:
    out = self.kit(["tpu/launch.py", "status", job]).stdout
    return {m.group(1): m.group(2) for m in re.finditer(rf"realm-status (\d+) {job} (.+)", out)}

  def wait_for_exit(self, job: str, workers: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
      states = self.status(job)
      if len(states) == workers and all(s.startswith("EXITED") for s in states.values()):
        assert set(states.values()) == {"EXITED 0"}, (states, self.worker_log(job, 0)[-3000:])
        return
      time.sleep(2)
    raise AssertionError(f"{job} did not finish in {timeout} s: {self.status(job)}\n{self.worker_log(job, 0)[-3000:]}")

  def worker_log(self, job: str, worker: int) -> str:
    node = "realm-refresh" if job == "refresh" else "realm-train"
    path = fake_gcloud.vm_home(self.tmp / "cloud", node, worker) / "realm-jax-logs" / f"{job}-worker-{worker}.log"
    return path.read_text() if path.exists() else ""


@pytest.fixture
def cloud(tmp_path, gcs_server):
  """The fake cloud: metadata servers for the VMs, the image, `gcloud` on PATH, an emulator bucket."""
  image_bin, site = fake_cloud.write_tpu_vm_image(tmp_path / "image")
  shapes = {"realm-train": ("v4-16", 2), "realm-refresh": ("v4-8", 1)}
  servers = {node: [fake_cloud.MetadataServer(fake_cloud.tpu_vm_attributes(w, hosts, acc)) for w in range(hosts)]
             for node, (acc, hosts) in shapes.items()}
  ports = {node: fake_cloud.free_port() for node in shapes}
  vms = {node: [{"env": {"GCE_METADATA_IP": s.address, "JAX_COORDINATOR_PORT": str(ports[node])}} for s in group]
         for node, group in servers.items()}
  image_env = {**gcs_server.env, "JAX_FORCE_TPU_INIT": "1", "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2",
               "PYTHONPATH": str(site), "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1",
               # REHEARSAL: a compilation cache on a disk the VMs share, so that the trainer resumed
               # after the preemption does not compile its step again (40 s on this busy machine).
               "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  gcloud_bin = fake_gcloud.install(tmp_path / "cloud", image_env, f"{image_bin}:/usr/local/bin:/usr/bin:/bin", vms)
  bucket = gcs_server.new_bucket("rehearsal")[len("gs://"):]
  env = fake_cloud.clean_environment(PATH=f"{gcloud_bin}:{os.environ['PATH']}", PYTHONPATH=str(REPO),
                                     JAX_PLATFORMS="cpu", **gcs_server.env)
  env = {k: v for k, v in env.items() if not k.startswith(("REALM_", "CLOUDSDK_"))}
  rehearsal = Rehearsal(tmp_path, env, bucket)
  try:
    yield rehearsal
  finally:
    for node in shapes:
      fake_gcloud.kill_vms(node)
    for group in servers.values():
      for s in group:
        s.close()


def test_the_readme_walkthrough_on_a_fake_pod(cloud):
  r = cloud
  r.checked_code = False
  started = time.perf_counter()
  bucket = r.bucket
  watch = None
  docs = write_documents(r.cwd / "facts.jsonl")
  try:
    for line in walkthrough():
      argv = shlex.split(r.expand(line))
      head = argv[0]
      if head == "export":
        for item in argv[1:]:
          key, _, value = item.partition("=")
          value = TYPES.get(value, value)
          r.env[key] = bucket if key == "BUCKET" else value
      elif re.match(r"^\w+=\$\(", line):  # NUMBER=$(gcloud ...)
        key = line.split("=", 1)[0]
        r.env[key] = r.shell(f"{r.expand(line)}; printf %s \"${key}\"").stdout
      elif head == "gcloud":
        r.shell(shlex.join(argv))
      elif head == "ssh-add":
        r.skipped.append(line)  # no ssh here: the fake gcloud runs worker commands directly
      elif argv[:3] == ["realm-jax", "corpus", "build"]:
        argv[argv.index("--input") + 1] = str(r.cwd / "facts.jsonl")  # REHEARSAL: facts for the dump
        r.realm_jax(argv[1:] + ["--block-len", "64", "--quiet"])
        (r.cwd / "nq-open-train.jsonl").write_text("".join(
            json.dumps({"question": f"Where was {d['title']} born?", "answers": [d["city"]]}) + "\n" for d in docs))
      elif argv[:3] == ["realm-jax", "convert", "hf"]:
        out = argv[argv.index("--out") + 1]  # REHEARSAL: tiny random weights where BERT-base would go
        _stand_in_bert(r, out)
      elif head.startswith("tpu/"):
        watch = _kit_line(r, argv, watch)
      else:
        raise AssertionError(f"the rehearsal does not know how to run {line!r}")
      r.ran.append(line)
      print(f"{time.perf_counter() - started:6.1f} s  {line}", flush=True)  # the timeline, with -s
  finally:
    if watch is not None and watch.poll() is None:
      watch.kill()
      watch.wait()
  assert r.skipped == ["ssh-add ~/.ssh/google_compute_engine"]
  assert len(r.ran) >= 30
  _check_the_runs(r)


def _stand_in_bert(r: Rehearsal, out: str) -> None:
  """Tiny random weights at `out` in realm-jax's weights format (what `convert hf --kind bert` writes)."""
  script = ("import sys\nfrom flax import nnx\nfrom realm_jax import weights\nfrom realm_jax.models import RealmModel\n"
            "from realm_jax.train.config import load_config\n"
            f"cfg = load_config('realm_v4_32', {TINY_MODEL!r}).model\n"
            "weights.save_weights(sys.argv[1], RealmModel(cfg, rngs=nnx.Rngs(1)), cfg)\n")
  r.shell(shlex.join([sys.executable, "-c", script, out]))


def _kit_line(r: Rehearsal, argv: list[str], watch):
  """One tpu/ line of the page, with the rehearsal's changes; returns the watcher once started."""
  script, job = argv[0], argv[1] if len(argv) > 1 else ""
  dry = "--dry-run" in argv
  if script in ("tpu/install.py", "tpu/watch.py"):
    argv += ["--staging-dir", str(r.tmp / "dist")]
  if script == "tpu/logs.py" and "--no-follow" not in argv:
    argv.append("--no-follow")  # REHEARSAL: print and return instead of following
  trainer = script == "tpu/watch.py" or (script == "tpu/launch.py" and job in REHEARSAL)
  if trainer and not dry:
    argv += ["--set", *REHEARSAL["pretrain" if script == "tpu/watch.py" else job], "--log-every", "2"]
  if script == "tpu/launch.py" and job == "refresh":
    argv += ["--log-every", "2"]
  if script == "tpu/logs.py":  # a job just launched: its first lines take a few seconds
    _wait(lambda: r.worker_log(argv[argv.index("--job") + 1], 0).strip(), 120, "a worker log")
  if script == "tpu/teardown.py" and not dry:
    _check_shipped_code(r)
  if script == "tpu/watch.py" and not dry:  # the loop: run it, preempt the trainer, let it bring it back
    argv[argv.index("--interval") + 1] = "1"
    watch = subprocess.Popen([sys.executable, str(REPO / script), *argv[1:]], cwd=r.cwd, env=r.env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _preempt_after_a_checkpoint(r)
    out, _ = watch.communicate(timeout=480)
    assert watch.returncode == 0, out[-5000:]
    r.watch_output = out
    return watch
  result = r.kit(argv)
  if script == "tpu/launch.py" and job in ("ict", "finetune"):
    r.wait_for_exit(job, 2, timeout=300)
  if script == "tpu/launch.py" and job == "status":
    states = r.status(argv[2])
    assert set(states) == ({"0"} if argv[2] == "refresh" else {"0", "1"}), result.stdout
  if script == "tpu/logs.py":
    assert "[worker 0] " in result.stdout, result.stdout
  return watch


def _wait(predicate, timeout: float, what: str):
  deadline = time.time() + timeout
  while time.time() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(0.3)
  raise AssertionError(f"no {what} within {timeout} s")


def _check_shipped_code(r: Rehearsal) -> None:
  """The workers ran the code install.py shipped (git archive), not this checkout or another one."""
  where = r.shell(shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "realm-train", "--worker=all",
                              "--command=~/realm-venv/bin/python -c 'import realm_jax; print(realm_jax.__file__)'"]))
  homes = [str(fake_gcloud.vm_home(r.tmp / "cloud", "realm-train", w)) for w in (0, 1)]
  assert sorted(where.stdout.split()) == [f"{h}/realm-jax/realm_jax/__init__.py" for h in homes]
  r.checked_code = True


def _preempt_after_a_checkpoint(r: Rehearsal) -> None:
  run = Storage.open(f"gs://{r.bucket}/realm-run1")
  deadline = time.time() + 300
  while time.time() < deadline:
    # A step is finished once orbax wrote its commit marker (on GCS there is no atomic rename).
    steps = [p for p in run.list("checkpoints") if re.fullmatch(r"checkpoints/\d+/commit_success.txt", p)]
    if steps:
      break
    time.sleep(0.3)
  else:
    raise AssertionError("no trainer checkpoint within 300 s:\n" + r.worker_log("pretrain", 0)[-3000:])
  r.preempted_at = sorted(steps)
  killed = fake_gcloud.preempt(r.tmp / "cloud", "realm-train")
  assert killed >= 2  # both workers' trainers (and their log shippers)
  assert not run.exists("TRAINING_DONE")


def _check_the_runs(r: Rehearsal) -> None:
  b = Storage.open(f"gs://{r.bucket}")
  # ICT: both workers trained in one 2-process job from the stand-in BERT weights; logs in the bucket.
  assert b.read_bytes("ict-run1/TRAINING_DONE") == b"2\n"
  ict0 = b.read_bytes("ict-run1/logs/ict/worker-0.log").decode()
  assert "joined a 2-process job (Cloud TPU VM metadata) as process 0 of 2 (2 local devices)" in ict0
  assert f"initialised encoder, retriever from gs://{r.bucket}/weights/bert-base-uncased" in ict0
  assert "process 1 of 2" in b.read_bytes("ict-run1/logs/ict/worker-1.log").decode()
  # REALM: preempted, re-created, re-installed, resumed, finished; the refresher published indices.
  assert b.read_bytes("realm-run1/TRAINING_DONE") == f"{REALM_STEPS}\n".encode()
  assert "realm-train-qr is SUSPENDED: re-creating it" in r.watch_output
  launches = {}
  for worker in (0, 1):
    log = b.read_bytes(f"realm-run1/logs/pretrain/worker-{worker}.log").decode()
    launches[worker] = re.split(r"^--- .* launched .* UTC ---$", log, flags=re.M)[1:]
    assert len(launches[worker]) == 2, log[-3000:]  # before and after the preemption
    assert "joined a 2-process job (Cloud TPU VM metadata)" in launches[worker][0]  # the lost VM's lines
  first, second = launches[0]
  assert f"initialised retriever from checkpoint step 2 of gs://{r.bucket}/ict-run1" in first
  resumed = int(re.search(r"resumed from checkpoint step (\d+)", second).group(1))
  assert 2 <= resumed < REALM_STEPS
  assert f"training done at step {REALM_STEPS}" in second
  refresh = b.read_bytes("realm-run1/logs/refresh/worker-0.log").decode()
  assert "published index" in refresh or "published" in refresh, refresh[-3000:]
  latest = b.read_json("realm-run1/index/LATEST")
  assert int(latest["version"].split("-")[0]) > 0  # an index from a trainer checkpoint, not only the bootstrap
  # Fine-tuning: from the REALM run's newest checkpoint, on the shared corpus, questions from the bucket.
  qa0 = b.read_bytes("nq-run1/logs/finetune/worker-0.log").decode()
  assert f"from checkpoint step {REALM_STEPS} under gs://{r.bucket}/realm-run1" in qa0, qa0[-3000:]
  assert "finished at step 4" in qa0
  assert r.checked_code
