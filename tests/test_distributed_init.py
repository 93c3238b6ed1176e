"""`parallel.initialize_distributed` in faked environments: real processes, JAX's own cluster detection.

Each case starts two real processes whose environment is what a worker of that kind of job sees
(tests/helpers/fake_cloud.py: a Cloud TPU VM's metadata server and PCI bus, GKE's variables,
SLURM's, an explicit coordinator). Each process calls `initialize_distributed()` and nothing
else to set up, then saves and restores an array sharded over both processes with orbax's async
checkpointer, which needs the distributed client (docs/DESIGN.md §7). Without the call, each
process would be process 0 of 1 and the checks on the process count fail.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import fake_cloud

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
import numpy as np
from realm_jax import parallel
env = parallel.initialize_distributed()
import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = parallel.make_mesh()
host = np.arange(32, dtype=np.float32).reshape(8, 4)
arr = jax.make_array_from_callback(host.shape, NamedSharding(mesh, P("data")), lambda i: host[i])
options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
with ocp.CheckpointManager(sys.argv[1], options=options) as manager:
  manager.save(1, args=ocp.args.Composite(x=ocp.args.StandardSave({"a": arr})))
  manager.wait_until_finished()
  target = {"a": jax.ShapeDtypeStruct(arr.shape, arr.dtype, sharding=arr.sharding)}
  restored = manager.restore(1, args=ocp.args.Composite(x=ocp.args.StandardRestore(target)))["x"]["a"]
same = all(np.array_equal(np.asarray(s.data), host[s.index]) for s in restored.addressable_shards)
print("RESULT " + json.dumps({"env": env and env.name, "processes": jax.process_count(),
                              "index": jax.process_index(), "initialized": jax.distributed.is_initialized(),
                              "devices": jax.device_count(), "local": jax.local_device_count(), "restored": same}))
"""


def _run(envs: list[dict], *args: str, script: str = SCRIPT, timeout: float = 240) -> list[subprocess.CompletedProcess]:
  procs = [subprocess.Popen([sys.executable, "-c", script, *args], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for env in envs]
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def _result(r: subprocess.CompletedProcess) -> dict:
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(next(line[len("RESULT "):] for line in r.stdout.splitlines() if line.startswith("RESULT ")))


def _environments(kind: str, tmp_path) -> tuple[list[dict], list]:
  """Two processes' environments for one kind of job, and the servers to close afterwards."""
  port = fake_cloud.free_port()
  base = {"PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2"}
  if kind == "explicit":
    return [fake_cloud.clean_environment(**base, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                         JAX_PROCESS_ID=str(w)) for w in range(2)], []
  if kind == "slurm":  # srun -N2 --ntasks-per-node=1 on hosts "localhost"
    return [fake_cloud.clean_environment(**base, SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost",
                                         SLURM_NTASKS="2", SLURM_PROCID=str(w), SLURM_LOCALID="0",
                                         SLURM_STEP_NUM_NODES="2", JAX_COORDINATOR_PORT=str(port))
            for w in range(2)], []
  site = fake_cloud.write_tpu_vm_site(tmp_path / "site")
  servers = [fake_cloud.MetadataServer(fake_cloud.tpu_vm_attributes(w, 2, "v4-16")) for w in range(2)]
  envs = []
  for w, server in enumerate(servers):
    env = fake_cloud.tpu_vm_env(server, site, port)
    env["PYTHONPATH"] = f"{site}:{REPO_ROOT}"
    if kind == "gketpu":  # a GKE TPU pod: the variables GKE sets (its metadata server answers tpu-env only)
      env.update(TPU_WORKER_HOSTNAMES="127.0.0.1,127.0.0.1", TPU_WORKER_ID=str(w), TPU_SKIP_MDS_QUERY="true")
    envs.append(fake_cloud.clean_environment(**env))
  return envs, servers


@pytest.mark.parametrize("kind", ["gcetpu", "gketpu", "slurm", "explicit"])
def test_two_processes_join_and_checkpoint_asynchronously(kind, tmp_path):
  envs, servers = _environments(kind, tmp_path)
  try:
    results = [_result(r) for r in _run(envs, str(tmp_path / "ckpt"))]
  finally:
    for s in servers:
      s.close()
  assert sorted(r["index"] for r in results) == [0, 1]
  for r in results:
    assert r == {**r, "env": kind, "processes": 2, "initialized": True, "devices": 4, "local": 2, "restored": True}
  assert (tmp_path / "ckpt" / "1" / "x").is_dir()


SINGLE = """
import json
from realm_jax import parallel
env = parallel.initialize_distributed()
import jax
print("RESULT " + json.dumps({"env": env and env.name, "initialized": jax.distributed.is_initialized(),
                              "processes": jax.process_count(), "devices": jax.device_count()}))
"""


def test_single_hosts_never_initialise(tmp_path):
  """A plain machine, a single-host TPU VM (v4-8: one worker in the metadata) and a one-task SLURM
  job run as one process without a coordinator (nothing to join, no port to bind)."""
  site = fake_cloud.write_tpu_vm_site(tmp_path / "site")
  server = fake_cloud.MetadataServer(fake_cloud.tpu_vm_attributes(0, 1, "v4-8"))
  base = {"PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2"}
  vm = fake_cloud.tpu_vm_env(server, site, fake_cloud.free_port())
  vm["PYTHONPATH"] = f"{site}:{REPO_ROOT}"
  envs = [fake_cloud.clean_environment(**base), fake_cloud.clean_environment(**vm),
          fake_cloud.clean_environment(**base, SLURM_JOB_ID="7", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="1",
                                       SLURM_PROCID="0", SLURM_LOCALID="0")]
  try:
    results = [_result(r) for r in _run(envs, script=SINGLE)]
  finally:
    server.close()
  assert results == [{"env": None, "initialized": False, "processes": 1, "devices": 2}] * 3


def test_one_process_roles_refuse_a_pod_worker(tmp_path):
  """The refresher on a worker of a 2-host slice: one line naming the job, before any work."""
  site = fake_cloud.write_tpu_vm_site(tmp_path / "site")
  server = fake_cloud.MetadataServer(fake_cloud.tpu_vm_attributes(1, 2, "v4-16"))
  env = fake_cloud.tpu_vm_env(server, site, fake_cloud.free_port())
  env["PYTHONPATH"] = f"{site}:{REPO_ROOT}"
  try:
    (r,) = _run([fake_cloud.clean_environment(**env)], "refresh", "--storage", str(tmp_path / "run"),
                script="import sys; from realm_jax.cli.main import main; sys.exit(main(sys.argv[1:]))")
  finally:
    server.close()
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip() == (
      "realm-jax refresh: error: the refresher runs as one process, but this machine is one of a 2-process job "
      "(Cloud TPU VM metadata): run it on a single-host VM or slice (e.g. v4-8, v5litepod-8)")
  assert not (tmp_path / "run").exists()
