"""The tpu/ launch kit, run as real subprocesses: exact gcloud commands, validation, worker scripts.

Oracles: the gcloud reference (expected commands, accelerator shapes), the installed Cloud SDK's
own argument parser (every printed gcloud command must parse), bash (every worker script runs
here under a temporary $HOME), and git (the shipped tarball).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "tpu"
WHERE = ["--zone=us-central2-b", "--project=my-proj"]
COMMON = ["--project", "my-proj", "--zone", "us-central2-b"]
_ENV_KEYS = ("REALM_TPU_NAME", "REALM_TPU_ZONE", "REALM_TRAIN_TYPE", "REALM_REFRESH_TYPE",
             "REALM_STORAGE", "CLOUDSDK_CORE_PROJECT")


def run(script: str, *args: str, env: dict | None = None, path: str | None = None,
        stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
  clean = {k: v for k, v in os.environ.items() if k not in _ENV_KEYS}
  clean.update(env or {})
  if path is not None:
    clean["PATH"] = path
  return subprocess.run([sys.executable, str(TPU / script), *args], capture_output=True,
                        text=True, env=clean, stdin=stdin, timeout=120)


def commands(result: subprocess.CompletedProcess) -> list[list[str]]:
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()
          if line.strip() and not line.startswith("#")]


def remote(cmd: list[str]) -> str:
  """The --command=... of a gcloud ssh command: the bash each worker runs."""
  (value,) = [a[len("--command="):] for a in cmd if a.startswith("--command=")]
  return value


def ssh_prefix(node: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, f"--worker={worker}", *WHERE]


SCOPES = "--scopes=https://www.googleapis.com/auth/cloud-platform"


def create_cmd(qr, node, acc, runtime, *flags, role="train", extra=(SCOPES,)):
  return ["gcloud", "compute", "tpus", "queued-resources", "create", qr, f"--node-id={node}",
          f"--accelerator-type={acc}", f"--runtime-version={runtime}", *WHERE, *flags,
          f"--labels=realm-jax-run=realm,realm-jax-role={role}", *extra]


# ----------------------------------------------------------------------------------------------
# create.py
# ----------------------------------------------------------------------------------------------


def test_create_trainer_and_refresher_v4_32_spot():
  r = run("create.py", *COMMON, "--train-type", "v4-32", "--refresh-type", "v4-8",
          "--provisioning", "spot", "--dry-run")
  assert commands(r) == [
      create_cmd("realm-train-qr", "realm-train", "v4-32", "tpu-ubuntu2204-base", "--spot"),
      create_cmd("realm-refresh-qr", "realm-refresh", "v4-8", "tpu-ubuntu2204-base", "--spot",
                 role="refresh"),
  ]
  # v4-32 = 32 TensorCores = 16 chips on 4 hosts (cloud.google.com/tpu/docs/v4).
  assert "4 worker(s) x 4 chips, 16 JAX devices" in r.stderr


def test_create_provisioning_names_and_single_role():
  r = run("create.py", *COMMON, "--name", "exp7", "--train-type", "v4-64", "--refresh-type",
          "v4-8", "--provisioning", "reserved", "--refresh-provisioning", "on-demand",
          "--valid-until-duration", "6h", "--dry-run")
  train, refresh = commands(r)
  assert train[5:7] == ["exp7-train-qr", "--node-id=exp7-train"]
  assert "--reserved" in train and "--spot" not in train
  assert "--valid-until-duration=6h" in train and "--valid-until-duration=6h" in refresh
  assert "--reserved" not in refresh and "--spot" not in refresh
  assert train[-2:] == refresh[-2:] == ["--valid-until-duration=6h", SCOPES]
  no_scopes = commands(run("create.py", *COMMON, "--train-type", "v4-8", "--scopes", "",
                           "--service-account", "sa@my-proj.iam.gserviceaccount.com", "--dry-run"))
  assert no_scopes[0][-1] == "--service-account=sa@my-proj.iam.gserviceaccount.com"
  only = commands(run("create.py", *COMMON, "--role", "refresh", "--refresh-type", "v5litepod-8",
                      "--dry-run"))
  assert [c[5] for c in only] == ["realm-refresh-qr"]


# Shapes from the Cloud TPU docs (v5e/v6e: 4-chip VMs on multi-host slices, up to 8 chips on one
# VM; v5p: 4 chips per VM, 2 TensorCores per chip) and runtime versions from /tpu/docs/runtimes.
@pytest.mark.parametrize("given,name,runtime,hosts,devices", [
    ("v5e-64", "v5litepod-64", "v2-alpha-tpuv5-lite", 16, 64),
    ("v5litepod-8", "v5litepod-8", "v2-alpha-tpuv5-lite", 1, 8),
    ("v5p-16", "v5p-16", "v2-alpha-tpuv5", 2, 8),
    ("v6e-16", "v6e-16", "v2-alpha-tpuv6e", 4, 16),
    ("v4-512", "v4-512", "tpu-ubuntu2204-base", 64, 256),
])
def test_create_accelerator_table(given, name, runtime, hosts, devices):
  r = run("create.py", *COMMON, "--train-type", given, "--dry-run")
  (cmd,) = commands(r)
  assert cmd == create_cmd("realm-train-qr", "realm-train", name, runtime)
  assert f"{hosts} worker(s) x {devices // hosts} chips, {devices} JAX devices" in r.stderr


# ----------------------------------------------------------------------------------------------
# Validation: non-zero exit and a message naming the bad value.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script,args,needle", [
    ("create.py", [*COMMON, "--train-type", "v4-30"], "'v4-30'"),
    ("create.py", [*COMMON, "--train-type", "tpu9-8"], "'tpu9-8'"),
    ("create.py", ["--project", "my-proj", "--zone", "us-central2", "--train-type", "v4-8"],
     "'us-central2'"),
    ("create.py", ["--project", "my-proj", "--zone", "central-b", "--train-type", "v4-8"],
     "'central-b'"),
    ("create.py", ["--zone", "us-central2-b", "--train-type", "v4-8"], "missing project"),
    ("create.py", ["--project", "My_Proj", "--zone", "us-central2-b", "--train-type", "v4-8"],
     "'My_Proj'"),
    ("create.py", [*COMMON, "--name", "Bad_Name", "--train-type", "v4-8"], "'Bad_Name'"),
    ("create.py", [*COMMON], "missing accelerator type"),
    ("create.py", [*COMMON, "--train-type", "v4-8", "--valid-until-duration", "six hours"],
     "'six hours'"),
    ("launch.py", ["pretrain", *COMMON, "--train-type", "v4-32", "--config", "experiments/a.py"],
     "missing --storage"),
    ("launch.py", ["pretrain", *COMMON, "--train-type", "v4-32", "--config", "experiments/a.py",
                   "--storage", "/data/run1"], "'/data/run1'"),
    ("launch.py", ["pretrain", *COMMON, "--train-type", "v4-32", "--config", "experiments/a.py",
                   "--storage", "gs://my-bucket"], "'gs://my-bucket'"),
    ("launch.py", ["pretrain", *COMMON, "--train-type", "v4-32", "--config", "experiments/a.py",
                   "--storage", "gs://My_Bucket/run"], "'My_Bucket'"),
    ("launch.py", ["pretrain", *COMMON, "--train-type", "v4-32", "--config", "experiments/a.py",
                   "--storage", "s3://bucket/run"], "'s3://bucket/run'"),
    ("launch.py", ["refresh", *COMMON, "--refresh-type", "v4-8", "--config", "experiments/a.py",
                   "--storage", "/data/run1"], "'/data/run1'"),
    ("launch.py", ["pretrain", *COMMON, "--train-type", "v4-32", "--config", "experiments/a.py",
                   "--storage", "gs://b-1/r", "--set", "novalue"], "'novalue'"),
    ("launch.py", ["finetune", *COMMON, "--train-type", "v4-32", "--config", "experiments/a.py",
                   "--storage", "gs://b-1/r", "--init", "/data/run1"], "--init '/data/run1'"),
    ("launch.py", ["pretrain", *COMMON, "--train-type", "v4-32", "--config", "experiments/a.py",
                   "--storage", "gs://b-1/r", "--corpus", "/data/corpus"], "--corpus '/data/corpus'"),
    ("launch.py", ["pretrain", *COMMON, "--train-type", "v4-32", "--config", "realm_v4_33",
                   "--storage", "gs://b-1/r"], "'realm_v4_33' is not a named experiment (known: "),
    ("launch.py", ["pretrain", *COMMON, "--train-type", "v4-32", "--config", "experiments/a.yaml",
                   "--storage", "gs://b-1/r"], "'experiments/a.yaml'"),
    ("install.py", [*COMMON, "--train-type", "v4-32", "--python-version", "python3.11"], "'python3.11'"),
    ("launch.py", ["pretrain", *COMMON, "--train-type", "v4-32", "--storage", "gs://b-1/r"],
     "missing --config"),
    ("logs.py", [*COMMON, "--train-type", "v4-32", "--worker", "4"], "v4-32 has 4 worker(s)"),
    ("logs.py", [*COMMON, "--train-type", "v4-32", "--worker", "two"], "'two'"),
    ("watch.py", [*COMMON, "--train-type", "v4-32", "--config", "experiments/a.py", "--storage",
                  "gs://b-1/r", "--max-polls", "0"], "--max-polls 0"),
    ("watch.py", [*COMMON, "--train-type", "v4-32", "--config", "experiments/a.py", "--storage",
                  "gs://b-1/r", "--backoff", "-1"], "--backoff -1"),
])
def test_validation_errors(script, args, needle):
  r = run(script, *args, "--dry-run")
  assert r.returncode == 2, (r.stdout, r.stderr)
  assert needle in r.stderr
  assert "Traceback" not in r.stderr and r.stdout == ""


def test_ai_zones_are_zones():
  (cmd,) = commands(run("create.py", "--project", "my-proj", "--zone", "us-south1-ai1b", "--train-type", "v6e-8",
                        "--dry-run"))
  assert "--zone=us-south1-ai1b" in cmd
  r = run("create.py", "--project", "my-proj", "--zone", "us-south1-ai1", "--train-type", "v6e-8", "--dry-run")
  assert r.returncode == 2 and "'us-south1-ai1'" in r.stderr


def test_the_kit_and_the_trainer_agree_on_slice_shapes():
  """tpu/_kit.py (standard library only) and realm_jax/slices.py (target_slice) keep one table each."""
  sys.path.insert(0, str(TPU))
  try:
    import _kit
  finally:
    sys.path.remove(str(TPU))
  from realm_jax import slices

  assert set(_kit.ACCELERATORS) == set(slices.SLICES)
  for name, acc in _kit.ACCELERATORS.items():
    s = slices.SLICES[name]
    assert (acc.devices, acc.hosts) == (s.devices, s.hosts), name


def test_unknown_type_lists_the_known_ones():
  r = run("create.py", *COMMON, "--train-type", "v5litepod-2", "--dry-run")
  assert r.returncode == 2 and "v5litepod-1, v5litepod-4, v5litepod-8, v5litepod-16" in r.stderr


def test_single_host_accepts_a_local_path_for_the_trainer():
  r = run("launch.py", "pretrain", *COMMON, "--train-type", "v4-8", "--config",
          "experiments/a.py", "--storage", "/data/run1", "--dry-run")
  (cmd,) = commands(r)
  assert "--storage /data/run1" in remote(cmd)


def test_every_script_has_help_and_dry_run():
  for script in ("create.py", "install.py", "launch.py", "watch.py", "logs.py", "teardown.py"):
    r = subprocess.run([str(TPU / script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "usage:" in r.stdout, script
    if script != "launch.py":
      assert "--dry-run" in r.stdout, script
  r = run("launch.py", "pretrain", "--help")
  assert r.returncode == 0 and "--dry-run" in r.stdout and "--resume" in r.stdout


# ----------------------------------------------------------------------------------------------
# install.py
# ----------------------------------------------------------------------------------------------


def test_install_ships_the_checkout_to_every_worker(tmp_path):
  r = run("install.py", *COMMON, "--train-type", "v4-32", "--refresh-type", "v4-8",
          "--staging-dir", str(tmp_path), "--dry-run")
  archive, scp_t, ssh_t, scp_r, ssh_r = commands(r)
  tarball = str(tmp_path / "realm-jax-src.tar.gz")
  assert archive == ["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={tarball}",
                     "HEAD"]
  assert scp_t == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                   "realm-train:realm-jax-src.tar.gz", "--worker=all", *WHERE]
  assert scp_r[6] == "realm-refresh:realm-jax-src.tar.gz" and "--worker=all" in scp_r
  assert ssh_t[:-1] == ssh_prefix("realm-train") and ssh_r[:-1] == ssh_prefix("realm-refresh")
  script = remote(ssh_t)
  # A released CPython from uv (not apt's 3.11.0rc1, not under first-boot dpkg's lock), no root.
  assert "apt-get" not in script and "sudo" not in script
  assert "command -v uv >/dev/null 2>&1 || curl -LsSf https://astral.sh/uv/install.sh | env UV_NO_MODIFY_PATH=1 sh" \
      in script
  assert ('|| { rm -rf "$HOME/realm-venv"; uv venv --python 3.11 --python-preference only-managed '
          '"$HOME/realm-venv"; }') in script
  assert "sys.version_info.releaselevel != 'final'" in script
  assert ('uv pip install --python "$HOME/realm-venv/bin/python" -q \'realm-jax[tpu] @ file://\'"$HOME/realm-jax"'
          in script)
  assert script.endswith('echo \'checkout HEAD\' > "$HOME/realm-jax/.realm-jax-installed"')
  # The printed git command really builds the tarball the workers unpack.
  subprocess.run(archive, check=True, capture_output=True)
  with tarfile.open(tarball) as tar:
    names = {m.name for m in tar.getmembers() if m.isfile()}
  committed = subprocess.run(["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.split()
  assert names == set(committed) and {"pyproject.toml", "realm_jax/cli/main.py"} <= names


def test_install_from_pypi_ships_only_the_configs(tmp_path):
  r = run("install.py", *COMMON, "--train-type", "v5e-64", "--from", "pypi", "--package",
          "realm-jax[tpu]==0.1.0", "--staging-dir", str(tmp_path), "--dry-run")
  archive, scp, ssh = commands(r)
  assert archive[-2:] == ["HEAD", "experiments"]
  assert "realm-train:realm-jax-src.tar.gz" in scp
  assert "install --python \"$HOME/realm-venv/bin/python\" -q 'realm-jax[tpu]==0.1.0';" in remote(ssh)
  subprocess.run(archive, check=True, capture_output=True)
  with tarfile.open(archive[5][len("--output="):]) as tar:
    names = {m.name for m in tar.getmembers() if m.isfile()}
  assert names and all(n.startswith("experiments/") for n in names)


# ----------------------------------------------------------------------------------------------
# launch.py: the exact command, then the worker script run for real under a temporary $HOME.
# ----------------------------------------------------------------------------------------------

STAND_IN = """#!{python}
import json, os, sys, time
# One write() per record: the job and its log shipper share the log file, and print() under
# PYTHONUNBUFFERED=1 writes the text and its newline in two calls that the other process can split.
os.write(1, (json.dumps({{"argv": sys.argv[1:], "foo": os.environ.get("FOO"), "cwd": os.getcwd()}})
             + "\\n").encode())
time.sleep(float(os.environ.get("STAND_IN_SECONDS", "0")))
"""


def worker_home(tmp_path: Path, installed: bool = True) -> Path:
  """A worker's $HOME as install.py leaves it; the program is a stand-in that echoes its argv."""
  home = tmp_path / "home"
  (home / "realm-jax").mkdir(parents=True)
  program = home / "realm-venv" / "bin" / "realm-jax"
  program.parent.mkdir(parents=True)
  program.write_text(STAND_IN.format(python=sys.executable))
  program.chmod(0o755)
  if installed:
    (home / "realm-jax" / ".realm-jax-installed").write_text("checkout HEAD\n")
  return home


def on_worker(script: str, home: Path, worker: str, **env) -> subprocess.CompletedProcess:
  full = dict(os.environ, HOME=str(home), TPU_WORKER_ID=worker, **env)
  return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=full,
                        timeout=120)


def wait_for(path: Path, timeout: float = 30.0) -> None:
  deadline = time.time() + timeout
  while not path.exists() and time.time() < deadline:
    time.sleep(0.05)
  assert path.exists(), path


def launch_scripts(*extra: str) -> dict:
  out = {}
  for action in ("start", "status", "stop"):
    args = (["pretrain", *extra] if action == "start" else [action, "pretrain"])
    (cmd,) = commands(run("launch.py", *args, *COMMON, "--train-type", "v4-32", "--dry-run"))
    assert cmd[:-1] == ssh_prefix("realm-train")
    out[action] = remote(cmd)
  return out


def test_launch_pretrain_runs_detached_with_a_log_per_worker(tmp_path):
  scripts = launch_scripts("--config", "experiments/paper.py", "--storage", "gs://my-bucket/run1",
                           "--resume", "--set", "lr=3e-5", "note=two words", "--env", "FOO=x y")
  home = worker_home(tmp_path, installed=False)
  logs = home / "realm-jax-logs"
  assert on_worker(scripts["status"], home, "3").stdout.strip() == "realm-status 3 pretrain UNINSTALLED"
  (home / "realm-jax" / ".realm-jax-installed").write_text("checkout HEAD\n")
  assert on_worker(scripts["status"], home, "3").stdout.strip() == "realm-status 3 pretrain ABSENT"
  try:
    started = on_worker(scripts["start"], home, "3", STAND_IN_SECONDS="60")
    assert started.returncode == 0, started.stderr
    assert "worker 3: started realm-jax pretrain" in started.stdout
    log = logs / "pretrain-worker-3.log"
    deadline = time.time() + 30
    while time.time() < deadline:
      text = log.read_text()
      if text.count("\n") >= 2 and text.endswith("\n"):  # two complete records
        break
      time.sleep(0.05)
    records = {r["argv"][0]: r for r in map(json.loads, log.read_text().splitlines())}
    assert records["pretrain"] == {"argv": ["pretrain", "--config", "experiments/paper.py", "--storage",
                                            "gs://my-bucket/run1", "--resume", "--set", "lr=3e-5",
                                            "note=two words"],
                                   "foo": "x y", "cwd": str(home / "realm-jax")}
    # Its log shipper, in the same process group (stopped with it), copies the log to the bucket.
    assert records["ship-log"]["argv"] == ["ship-log", str(log), "--storage", "gs://my-bucket/run1", "--to",
                                           "logs/pretrain/worker-3.log", "--every", "60", "--until",
                                           str(logs / "pretrain.exit")]
    assert on_worker(scripts["status"], home, "3").stdout.strip() == "realm-status 3 pretrain RUNNING"
    again = on_worker(scripts["start"], home, "3")
    assert again.returncode == 3 and "already running" in again.stderr
    stopped = on_worker(scripts["stop"], home, "3")
    assert "worker 3: stopped realm-jax pretrain" in stopped.stdout
    assert on_worker(scripts["status"], home, "3").stdout.strip() == "realm-status 3 pretrain ABSENT"
    # A run that ends by itself leaves its exit code.
    assert on_worker(scripts["start"], home, "3").returncode == 0
    wait_for(logs / "pretrain.exit")
    assert on_worker(scripts["status"], home, "3").stdout.strip() == (
        "realm-status 3 pretrain EXITED 0")
  finally:
    pid = logs / "pretrain.pid"
    if pid.exists():
      try:
        os.killpg(int(pid.read_text()), signal.SIGKILL)
      except ProcessLookupError:
        pass


def test_a_multi_host_refresher_slice_is_created_installed_and_launched_on_every_worker():
  """The refresher is a multi-process JAX job like the trainer: on a multi-host slice every worker
  runs the same `realm-jax refresh` (jax.distributed finds its peers from the TPU VM metadata)."""
  created = commands(run("create.py", *COMMON, "--train-type", "v4-32", "--refresh-type", "v6e-16", "--dry-run"))
  assert [c[5] for c in created] == ["realm-train-qr", "realm-refresh-qr"]
  assert "--accelerator-type=v6e-16" in created[1]
  installed = commands(run("install.py", *COMMON, "--train-type", "v4-32", "--refresh-type", "v5p-16", "--dry-run"))
  assert any(c[:len(ssh_prefix("realm-refresh"))] == ssh_prefix("realm-refresh") for c in installed)
  (refresh,) = commands(run("launch.py", "refresh", *COMMON, "--refresh-type", "v4-16", "--storage",
                            "gs://my-bucket/run1", "--dry-run"))
  assert refresh[:-1] == ssh_prefix("realm-refresh")  # --worker=all
  assert '"$HOME/realm-venv/bin/realm-jax" refresh --storage gs://my-bucket/run1;' in remote(refresh)


def test_launch_refresh_and_finetune_targets():
  (refresh,) = commands(run("launch.py", "refresh", *COMMON, "--refresh-type", "v4-8",
                            "--config", "experiments/a.py", "--storage", "gs://my-bucket/run1",
                            "--dry-run"))
  assert refresh[:-1] == ssh_prefix("realm-refresh")
  assert ('"$HOME/realm-venv/bin/realm-jax" refresh --config experiments/a.py --storage '
          'gs://my-bucket/run1;') in remote(refresh)
  assert '"$HOME/realm-jax-logs/refresh-worker-$W.log"' in remote(refresh)
  (no_config,) = commands(run("launch.py", "refresh", *COMMON, "--refresh-type", "v5e-8", "--storage",
                              "gs://my-bucket/run1", "--log-every", "15", "--dry-run"))
  assert '"$HOME/realm-venv/bin/realm-jax" refresh --storage gs://my-bucket/run1;' in remote(no_config)
  assert '--to "logs/refresh/worker-$W.log" --every 15 ' in remote(no_config)
  (finetune,) = commands(run("launch.py", "finetune", *COMMON, "--train-type", "v5e-64",
                             "--config", "openqa_nq", "--storage", "gs://my-bucket/ft", "--corpus",
                             "gs://my-bucket/corpora/wiki", "--init", "gs://my-bucket/run1", "--set",
                             "train_questions=gs://my-bucket/data/nq-train.jsonl", "--dry-run"))
  assert finetune[:-1] == ssh_prefix("realm-train")
  assert ("finetune --config openqa_nq --storage gs://my-bucket/ft --corpus gs://my-bucket/corpora/wiki --init "
          "gs://my-bucket/run1 --set train_questions=gs://my-bucket/data/nq-train.jsonl;") in remote(finetune)


# ----------------------------------------------------------------------------------------------
# logs.py and teardown.py
# ----------------------------------------------------------------------------------------------


def test_logs_of_one_worker_and_of_all(tmp_path):
  (one,) = commands(run("logs.py", *COMMON, "--train-type", "v4-32", "--worker", "2",
                        "--no-follow", "--lines", "5", "--dry-run"))
  assert one[:-1] == ssh_prefix("realm-train", worker="2")
  (every,) = commands(run("logs.py", *COMMON, "--refresh-type", "v4-8", "--job", "refresh",
                          "--dry-run"))
  assert every[:-1] == ssh_prefix("realm-refresh") and "tail -n 100 -F" in remote(every)
  home = tmp_path
  (home / "realm-jax-logs").mkdir()
  (home / "realm-jax-logs" / "pretrain-worker-2.log").write_text("".join(
      f"line {i}\n" for i in range(9)))
  out = on_worker(remote(one), home, "2").stdout.splitlines()
  assert out == [f"[worker 2] line {i}" for i in range(4, 9)]


def test_teardown_deletes_queued_resources_and_the_run_prefix():
  r = run("teardown.py", *COMMON, "--train-type", "v4-32", "--refresh-type", "v4-8",
          "--delete-storage", "--storage", "gs://my-bucket/run1", "--dry-run")
  assert commands(r) == [
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "realm-train-qr", *WHERE,
       "--force", "--quiet"],
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "realm-refresh-qr", *WHERE,
       "--force", "--quiet"],
      ["gcloud", "storage", "rm", "--recursive", "gs://my-bucket/run1"],
  ]


@pytest.mark.parametrize("args,needle", [
    (["--storage", "gs://my-bucket/run1"], "--confirm gs://my-bucket/run1"),
    (["--storage", "gs://my-bucket/run1", "--confirm", "gs://my-bucket/run2"], "does not match"),
    (["--storage", "gs://my-bucket"], "whole bucket"),
    (["--storage", "/data/run1"], "'/data/run1'"),
])
def test_teardown_refuses_unconfirmed_storage_deletion(tmp_path, args, needle):
  # No gcloud on PATH: a command run before the check would fail with a different message.
  r = run("teardown.py", *COMMON, "--train-type", "v4-32", "--delete-storage", *args,
          path=str(tmp_path))
  assert r.returncode == 2 and needle in r.stderr and r.stdout == ""


# ----------------------------------------------------------------------------------------------
# watch.py
# ----------------------------------------------------------------------------------------------

WATCH = [*COMMON, "--train-type", "v4-32", "--config", "experiments/a.py", "--storage",
         "gs://my-bucket/run1"]


def test_watch_dry_run_prints_one_pass_of_the_loop(tmp_path):
  r = run("watch.py", *WATCH, "--refresh-type", "v4-8", "--staging-dir", str(tmp_path),
          "--interval", "60", "--dry-run")
  cmds = commands(r)
  kinds = [" ".join(c[1:5]) if c[0] == "gcloud" else c[0] for c in cmds]
  per_role = ["compute tpus queued-resources describe", "compute tpus tpu-vm ssh",
              "compute tpus queued-resources delete", "compute tpus queued-resources create",
              "compute tpus tpu-vm scp", "compute tpus tpu-vm ssh", "compute tpus tpu-vm ssh",
              "compute tpus tpu-vm ssh", "compute tpus tpu-vm ssh"]
  assert kinds == ["git", *per_role, *per_role]
  assert cmds[1][-1] == "--format=value(state.state)"
  assert cmds[4] == create_cmd("realm-train-qr", "realm-train", "v4-32", "tpu-ubuntu2204-base",
                               "--spot")
  starts = [remote(c) for c in cmds if c[0] == "gcloud" and "started realm-jax" in c[-1]]
  assert len(starts) == 4
  assert all("pretrain --config experiments/a.py --storage gs://my-bucket/run1 --resume;" in s
             for s in starts[:2])
  # The refresher takes the trainer's config (with its overrides) from the checkpoints.
  assert all('"$HOME/realm-venv/bin/realm-jax" refresh --storage gs://my-bucket/run1;' in s for s in starts[2:])
  assert all(f'--to "logs/{job}/worker-$W.log" --every 60 ' in s
             for job, s in zip(["pretrain", "pretrain", "refresh", "refresh"], starts))
  assert "# every 60 s" in r.stdout
  assert cmds[0][-1] == "HEAD" and "wait 60 s, then twice as long each time (at most 3600 s); at most 200" in r.stdout
  pinned = commands(run("watch.py", *WATCH, "--ref", "v0.2.0", "--corpus", "gs://my-bucket/corpora/wiki", "--init",
                        "gs://my-bucket/ict-run1", "--staging-dir", str(tmp_path), "--dry-run"))
  assert pinned[0][-1] == "v0.2.0"  # re-installs ship --ref, as install.py does
  assert ("pretrain --config experiments/a.py --storage gs://my-bucket/run1 --corpus gs://my-bucket/corpora/wiki "
          "--init gs://my-bucket/ict-run1 --resume;") in remote(pinned[-1])
  ict = commands(run("watch.py", *WATCH, "--job", "ict", "--refresh-type", "v4-8",
                     "--staging-dir", str(tmp_path), "--dry-run"))
  assert len(ict) == 1 + len(per_role) and not any("realm-refresh" in c for c in ict)
  assert "ict --config experiments/a.py --storage gs://my-bucket/run1 --resume;" in remote(ict[-1])


FAKE_GCLOUD = """#!{python}
import json, os, sys, time
path = os.environ["FAKE_GCLOUD_STATE"]
state = json.load(open(path))
args = sys.argv[1:]
state["calls"].append(args)
state["times"].append(float(os.environ["FAKE_GCLOUD_CALLED_AT"]))
take = lambda key: state[key].pop(0) if len(state[key]) > 1 else state[key][0]  # the last one repeats
out = ""
if args[3] == "describe":
  out = take("qr") + "\\n"
elif args[3] == "ssh" and "realm-status" in args[-1]:
  out = "".join(f"realm-status {{i}} pretrain {{s}}\\n" for i, s in enumerate(take("workers")))
json.dump(state, open(path, "w"))
sys.stdout.write(out)
"""


def fake_gcloud(tmp_path: Path, qr: list, workers: list) -> tuple[str, Path]:
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud.py").write_text(FAKE_GCLOUD.format(python=sys.executable))
  # The call's time is taken by bash before Python starts: a loaded machine delays interpreter start-up
  # by up to a second, which would blur the back-off gaps the watch test measures.
  (bin_dir / "gcloud").write_text(f'#!/bin/bash\nFAKE_GCLOUD_CALLED_AT=$EPOCHREALTIME exec {sys.executable} '
                                  f'{bin_dir / "gcloud.py"} "$@"\n')
  (bin_dir / "gcloud").chmod(0o755)
  state = tmp_path / "state.json"
  state.write_text(json.dumps({"calls": [], "times": [], "qr": qr, "workers": workers}))
  git_dir = os.path.dirname(shutil.which("git"))
  return f"{bin_dir}:{git_dir}", state


def test_watch_recreates_after_preemption_and_resumes(tmp_path):
  running, exited = ["RUNNING"] * 4, ["EXITED 0"] * 4
  path, state = fake_gcloud(
      tmp_path, qr=["ACTIVE", "SUSPENDED", "PROVISIONING", "ACTIVE", "ACTIVE", "ACTIVE"],
      workers=[running, ["RUNNING", "RUNNING", "EXITED 1", "RUNNING"], exited])
  r = run("watch.py", *WATCH, "--interval", "0", "--max-polls", "6", "--unhealthy-polls", "1", "--backoff", "0",
          "--staging-dir", str(tmp_path / "dist"), path=path, env={"FAKE_GCLOUD_STATE": str(state)})
  assert r.returncode == 0, r.stderr
  calls = json.loads(state.read_text())["calls"]

  assert [kind(c) for c in calls] == [
      "describe", "status",                                   # healthy
      "describe", "delete", "create",                         # preempted: re-create
      "describe",                                             # still provisioning
      "describe", "scp", "install", "start",                  # back: install, resume
      "describe", "status", "stop", "start",                  # a worker died: relaunch
      "describe", "status",                                   # finished everywhere
  ]
  assert "--spot" in calls[4]
  assert all("--resume;" in c[-1] for c in calls if kind(c) == "start")
  assert (tmp_path / "dist" / "realm-jax-src.tar.gz").exists()


def kind(c: list[str]) -> str:
  """What a gcloud call of watch.py does."""
  if c[3] == "ssh":
    script = c[-1]
    return ("status" if "realm-status" in script else "install" if "pip install" in script
            else "stop" if "stopped realm-jax" in script else "start")
  return c[3]


def test_a_watcher_started_before_install_installs_first(tmp_path):
  path, state = fake_gcloud(tmp_path, qr=["ACTIVE"], workers=[["UNINSTALLED"] * 4, ["RUNNING"] * 4,
                                                              ["EXITED 0"] * 4])
  r = run("watch.py", *WATCH, "--interval", "0", "--max-polls", "4", "--staging-dir", str(tmp_path / "dist"),
          path=path, env={"FAKE_GCLOUD_STATE": str(state)})
  assert r.returncode == 0, r.stderr
  assert [kind(c) for c in json.loads(state.read_text())["calls"]] == [
      "describe", "status", "stop", "scp", "install", "start",  # not installed: install, then start
      "describe", "status", "describe", "status"]
  assert "realm-train is not installed on every worker: installing, then starting pretrain" in r.stderr


def test_watch_backs_off_exponentially_while_a_job_keeps_failing(tmp_path):
  path, state = fake_gcloud(tmp_path, qr=["ACTIVE"], workers=[["RUNNING", "EXITED 1", "RUNNING", "RUNNING"]])
  r = run("watch.py", *WATCH, "--interval", "0.05", "--max-polls", "80", "--unhealthy-polls", "1", "--backoff",
          "1", "--max-backoff", "2", "--staging-dir", str(tmp_path / "dist"), path=path,
          env={"FAKE_GCLOUD_STATE": str(state)})
  assert r.returncode == 2 and "still not finished after 80 polls" in r.stderr
  saved = json.loads(state.read_text())
  # The watch sets the next back-off just before it stops the dead job, so the gaps between stop calls
  # are the back-offs plus polling. 0.3 s covers the delay of bash starting the fake (no Python
  # start-up in between; tens of ms, more on a machine loaded 7x over its cores) and stays well below
  # the 1 s by which a missing doubling would fall short.
  stops = [t for c, t in zip(saved["calls"], saved["times"]) if kind(c) == "stop"]
  gaps = [b - a for a, b in zip(stops, stops[1:])]
  assert len(stops) >= 3 and "backing off" in r.stderr
  assert gaps[0] >= 1 - 0.3 and all(g >= 2 - 0.3 for g in gaps[1:]), gaps  # 1 s, doubled, capped at 2 s


def test_watch_gives_up_after_max_relaunches(tmp_path):
  path, state = fake_gcloud(tmp_path, qr=["SUSPENDED", "SUSPENDED", "SUSPENDED"], workers=[])
  r = run("watch.py", *WATCH, "--interval", "0", "--max-polls", "3", "--max-relaunches", "1", "--backoff", "0",
          "--staging-dir", str(tmp_path / "dist"), path=path, env={"FAKE_GCLOUD_STATE": str(state)})
  assert r.returncode == 2 and "--max-relaunches 1" in r.stderr
  kinds = [c[3] for c in json.loads(state.read_text())["calls"]]
  assert kinds == ["describe", "delete", "create", "describe"]


# ----------------------------------------------------------------------------------------------
# Every printed command against the real tools: gcloud's parser and bash's.
# ----------------------------------------------------------------------------------------------


def all_printed_commands(tmp_path: Path) -> list[list[str]]:
  runs = [
      run("create.py", *COMMON, "--train-type", "v4-32", "--refresh-type", "v4-8",
          "--provisioning", "spot", "--refresh-provisioning", "reserved",
          "--valid-until-duration", "6h", "--service-account", "sa@my-proj.iam.gserviceaccount.com",
          "--dry-run"),
      run("install.py", *COMMON, "--train-type", "v4-32", "--staging-dir", str(tmp_path),
          "--dry-run"),
      run("watch.py", *WATCH, "--refresh-type", "v4-8", "--staging-dir", str(tmp_path),
          "--dry-run"),
      run("launch.py", "finetune", *COMMON, "--train-type", "v4-32", "--config", "experiments/a.py",
          "--storage", "gs://my-bucket/ft", "--init", "gs://my-bucket/run1", "--dry-run"),
      run("logs.py", *COMMON, "--train-type", "v4-32", "--worker", "1", "--dry-run"),
      run("teardown.py", *COMMON, "--train-type", "v4-32", "--delete-storage", "--storage",
          "gs://my-bucket/run1", "--dry-run"),
  ]
  return [c for r in runs for c in commands(r)]


def test_gcloud_parses_every_printed_command(tmp_path):
  """The installed Cloud SDK accepts each command's flags: with no account configured it stops
  at 'no active account' (exit 1) after parsing, instead of exit 2 'unrecognized arguments'."""
  gcloud = shutil.which("gcloud")
  assert gcloud, "the Google Cloud CLI (gcloud) is needed for this test"
  config = tmp_path / "gcloud-config"
  config.mkdir()
  env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CLOUDSDK_CONFIG": str(config),
         "CLOUDSDK_CORE_DISABLE_PROMPTS": "1", "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false",
         "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
         "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true"}
  # One command per shape (sub-command, flag names, --worker value) keeps the test fast.
  unique = {}
  for c in all_printed_commands(tmp_path):
    if c[0] == "gcloud":
      shape = (*c[1:5], *sorted(a.split("=")[0] if not a.startswith("--worker") else a
                                for a in c if a.startswith("--")))
      unique.setdefault(shape, tuple(c))
  unique = set(unique.values())
  assert {" ".join(c[1:5]) for c in unique} == {
      "compute tpus queued-resources create", "compute tpus queued-resources describe",
      "compute tpus queued-resources delete", "compute tpus tpu-vm ssh",
      "compute tpus tpu-vm scp", "storage rm --recursive gs://my-bucket/run1"}

  def check(cmd):
    r = subprocess.run([gcloud, *cmd[1:]], capture_output=True, text=True, env=env, timeout=120,
                       stdin=subprocess.DEVNULL)
    return cmd, r

  with ThreadPoolExecutor(2) as pool:
    for cmd, r in pool.map(check, sorted(unique)):
      assert r.returncode == 1 and "do not currently have an active account" in r.stderr, (
          shlex.join(cmd), r.stderr)


def test_every_worker_script_is_valid_bash(tmp_path):
  scripts = [remote(c) for c in all_printed_commands(tmp_path) if c[0] == "gcloud" and c[4] == "ssh"]
  assert len(scripts) >= 8
  for script in scripts:
    r = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, (script, r.stderr)


def test_readme_walkthrough_commands_dry_run(tmp_path):
  """Every tpu/ command in tpu/README.md's code blocks is accepted (placeholders filled in)."""
  text = (TPU / "README.md").read_text()
  blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
  lines = " ".join(blocks).replace("\\\n", " ").splitlines()
  env = {"CLOUDSDK_CORE_PROJECT": "my-project", "REALM_TPU_ZONE": "us-central2-b",
         "REALM_TPU_NAME": "realm", "REALM_TRAIN_TYPE": "v4-32", "REALM_REFRESH_TYPE": "v4-8",
         "REALM_STORAGE": "gs://my-realm-bucket/realm-run1"}
  ran = 0
  for line in lines:
    line = line.split("  #")[0].strip()
    if not line.startswith("tpu/"):
      continue
    line = re.sub(r"experiments/<[^>]+>\.py", "experiments/a.py", line)
    argv = shlex.split(line.replace("$BUCKET", "my-realm-bucket"))
    argv += [] if "--dry-run" in argv else ["--dry-run"]
    if argv[0] in ("tpu/install.py", "tpu/watch.py"):
      argv += ["--staging-dir", str(tmp_path)]
    r = run(argv[0][len("tpu/"):], *argv[1:], env=env)
    assert r.returncode == 0, (line, r.stderr)
    assert r.stdout.strip(), line
    ran += 1
  assert ran >= 12  # create, install, launch x6, logs x3, watch x2
