#!/usr/bin/env python3
"""A fake `gcloud` for rehearsing the TPU pod path on this machine (tests/test_pod_rehearsal.py).

Installed as `gcloud` on PATH (a generated wrapper runs this file), it keeps a small cloud in a
state directory (`FAKE_CLOUD_DIR`): queued resources whose nodes are sets of "VMs", each VM a home
directory plus the environment of a Cloud TPU VM image (tests/helpers/fake_cloud.py: metadata
server, PCI bus, CPU devices; a `uv` that builds the venv from this machine's interpreter).

  queued-resources create / describe / delete   node state; delete kills every process of its
                                                VMs and wipes their disks (homes)
  tpu-vm scp SRC NODE:DEST --worker=all|W       copies into each VM's home
  tpu-vm ssh NODE --worker=all|W --command=CMD  runs `bash -c CMD` on each VM at once (its own
                                                process group, HOME, environment); the exit code
                                                is the largest of the workers'
  storage cp LOCAL gs://BUCKET/PATH             uploads, to the GCS emulator the environment names
  anything else (auth, services, buckets ...)   recorded and accepted: the walkthrough's account
                                                and bucket set-up steps are dry runs here

A VM's processes carry FAKE_TPU_VM=<node>/<worker>/<generation> in their environment, which is how
`delete` and `preempt` find them all (a real VM going away takes every process with it).
`preempt(state_dir, node)` is the test's side: the queued resource turns SUSPENDED and the VMs die.
Every call is appended to calls.jsonl.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HOSTS = {"v4-8": 1, "v4-16": 2, "v5litepod-8": 1, "v5litepod-16": 4}  # workers per node type


@contextlib.contextmanager
def locked_state(state_dir: Path):
  """The cloud's state (a dict), read and written back under an exclusive lock."""
  with open(state_dir / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    path = state_dir / "state.json"
    state = json.loads(path.read_text())
    yield state
    path.write_text(json.dumps(state, indent=1))


def vm_home(state_dir: Path, node: str, worker: int) -> Path:
  return state_dir / "vms" / node / f"worker-{worker}"


def vm_processes(marker_prefix: str) -> list[int]:
  """Pids whose environment has FAKE_TPU_VM starting with `marker_prefix`."""
  found = []
  needle = f"FAKE_TPU_VM={marker_prefix}".encode()
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      env = Path(f"/proc/{entry}/environ").read_bytes()
    except OSError:
      continue
    if any(var.startswith(needle) for var in env.split(b"\0")):
      found.append(int(entry))
  return found


def kill_vms(node: str) -> int:
  """SIGKILLs every process of the node's VMs (until none is left); returns how many."""
  killed = set()
  for _ in range(50):
    pids = [p for p in vm_processes(f"{node}/") if p != os.getpid()]
    if not pids:
      break
    for pid in pids:
      with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
    time.sleep(0.1)
  return len(killed)


def preempt(state_dir: Path, node: str) -> int:
  """A Spot preemption: the node's queued resource becomes SUSPENDED and its VMs stop at once."""
  with locked_state(state_dir) as state:
    state["nodes"][node]["state"] = "SUSPENDED"
  return kill_vms(node)


def _flag(args: list[str], name: str) -> str | None:
  for a in args:
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
  return None


def _workers(spec: str, hosts: int) -> list[int]:
  return list(range(hosts)) if spec in (None, "all") else [int(spec)]


def _vm_env(state: dict, node: str, worker: int, home: Path) -> dict[str, str]:
  vm = state["vms"][node][worker]
  info = state["nodes"][node]
  env = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TERM", "TMPDIR", "USER", "LOGNAME")}
  env.update(state["image_env"])
  env.update(vm.get("env", {}))
  env.update(HOME=str(home), PATH=state["image_path"], FAKE_TPU_VM=f"{node}/{worker}/{info['generation']}")
  return env


def _ssh(state_dir: Path, args: list[str]) -> int:
  node = args[4]
  with locked_state(state_dir) as state:
    info = state["nodes"].get(node)
    if info is None or info["state"] != "ACTIVE":
      print(f"ERROR: (gcloud.compute.tpus.tpu-vm.ssh) node {node} is not ACTIVE", file=sys.stderr)
      return 1
    jobs = [(w, vm_home(state_dir, node, w)) for w in _workers(_flag(args, "worker"), info["hosts"])]
    envs = {w: _vm_env(state, node, w, home) for w, home in jobs}
  command = _flag(args, "command")

  def one(job):
    w, home = job
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["bash", "-c", command], cwd=home, env=envs[w], capture_output=True, text=True,
                          start_new_session=True)

  with ThreadPoolExecutor(len(jobs)) as pool:
    results = list(pool.map(one, jobs))
  for r in results:
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
  return max(r.returncode for r in results)


def _scp(state_dir: Path, args: list[str]) -> int:
  src, dest = args[4], args[5]
  node, _, rel = dest.partition(":")
  with locked_state(state_dir) as state:
    info = state["nodes"].get(node)
    if info is None or info["state"] != "ACTIVE":
      print(f"ERROR: (gcloud.compute.tpus.tpu-vm.scp) node {node} is not ACTIVE", file=sys.stderr)
      return 1
    workers = _workers(_flag(args, "worker"), info["hosts"])
  for w in workers:
    target = vm_home(state_dir, node, w) / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, target)
  return 0


def _queued(state_dir: Path, args: list[str]) -> int:
  action, qr = args[3], args[4]
  with locked_state(state_dir) as state:
    nodes = state["nodes"]
    node = next((n for n, i in nodes.items() if i["qr"] == qr), None)
    if action == "describe":
      if node is None:
        print(f"ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: {qr}", file=sys.stderr)
        return 1
      print(nodes[node]["state"])
      return 0
    if action == "create":
      name = _flag(args, "node-id")
      if node is not None:
        print(f"ERROR: (gcloud.compute.tpus.queued-resources.create) ALREADY_EXISTS: {qr}", file=sys.stderr)
        return 1
      accelerator = _flag(args, "accelerator-type")
      generation = state.setdefault("generations", {}).get(name, 0) + 1
      state["generations"][name] = generation
      nodes[name] = {"qr": qr, "state": "ACTIVE", "accelerator": accelerator, "hosts": HOSTS[accelerator],
                     "generation": generation}
      for w in range(HOSTS[accelerator]):  # fresh disks
        shutil.rmtree(vm_home(state_dir, name, w), ignore_errors=True)
        vm_home(state_dir, name, w).mkdir(parents=True)
      return 0
    if action == "delete":
      if node is None:
        print(f"ERROR: (gcloud.compute.tpus.queued-resources.delete) NOT_FOUND: {qr}", file=sys.stderr)
        return 1
      del nodes[node]
  kill_vms(node)
  shutil.rmtree(state_dir / "vms" / node, ignore_errors=True)
  return 0


def main(argv: list[str]) -> int:
  state_dir = Path(os.environ["FAKE_CLOUD_DIR"])
  with open(state_dir / "calls.jsonl", "a") as f:
    f.write(json.dumps(argv) + "\n")
  if argv[:3] == ["compute", "tpus", "queued-resources"] and argv[3] in ("create", "describe", "delete"):
    return _queued(state_dir, argv)
  if argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    return _ssh(state_dir, argv)
  if argv[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    return _scp(state_dir, argv)
  if argv[:2] == ["storage", "cp"]:
    from realm_jax.storage import Storage  # talks to the emulator of STORAGE_EMULATOR_HOST

    parent, _, name = argv[3].rpartition("/")
    Storage.open(parent).write_bytes(name, Path(argv[2]).read_bytes())
    return 0
  if argv[:2] == ["projects", "describe"]:
    print("123456789012")
  return 0  # account, API and bucket set-up: accepted as a dry run


def install(state_dir: Path, image_env: dict[str, str], image_path: str, vms: dict[str, list[dict]]) -> Path:
  """Creates the state directory and a `gcloud` executable in `state_dir/bin`; returns that folder.
  `vms[node][worker]["env"]` is each VM's own environment (its metadata server address)."""
  (state_dir / "bin").mkdir(parents=True, exist_ok=True)
  (state_dir / "state.json").write_text(json.dumps({"nodes": {}, "vms": vms, "image_env": image_env,
                                                    "image_path": image_path}))
  gcloud = state_dir / "bin" / "gcloud"
  gcloud.write_text(f"#!/bin/sh\nFAKE_CLOUD_DIR={state_dir} exec {sys.executable} {Path(__file__).resolve()} \"$@\"\n")
  gcloud.chmod(0o755)
  return state_dir / "bin"


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
