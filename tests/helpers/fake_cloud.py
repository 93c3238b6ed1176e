"""Test doubles of the cloud environment (never of realm-jax): what a Cloud TPU VM, a GKE TPU pod,
a SLURM job look like to a process, faithfully enough for JAX's own cluster detection
(`jax/_src/clusters/`) to take the same path as on the real thing.

A Cloud TPU VM, to JAX, is:
  * TPU chips on the PCI bus (`jax._src.hardware_utils` reads /sys/bus/pci). This machine has
    none, so the fake VM's `sitecustomize.py` reports four v4 chips; `JAX_FORCE_TPU_INIT=1`
    stands in for the libtpu wheel. Together they make `cloud_tpu_init` mark the process as
    running on a Cloud TPU VM, as libtpu and the chips do on a real one. `JAX_PLATFORMS=cpu`
    keeps the computation on CPU devices (there is no TPU runtime to load).
  * the GCE metadata server (`GCE_METADATA_IP`, the variable JAX and our kit's worker-id snippet
    read; 169.254.169.254 / metadata.google.internal on a real VM): `agent-worker-number`,
    `worker-network-endpoints` and `tpu-env` under /computeMetadata/v1/instance/attributes/,
    answered only with the `Metadata-Flavor: Google` header. Each fake VM has its own server.
  * the coordinator port: 8482 on a real slice; tests set `JAX_COORDINATOR_PORT` (a real JAX
    variable) to a free port so that parallel tests do not collide.
"""

from __future__ import annotations

import http.server
import os
import socket
import threading
from pathlib import Path

SITE_CUSTOMIZE = '''"""The fake TPU VM's PCI bus: four TPU v4 chips (JAX counts chips by reading /sys/bus/pci)."""
import importlib.abc
import importlib.util
import sys


class _PciBus(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name != "jax._src.hardware_utils":
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(name)
    load = spec.loader.exec_module

    def exec_module(module):
      load(module)
      module.num_available_tpu_chips_and_device_id = lambda: (4, module.TpuVersion.v4)

    spec.loader.exec_module = exec_module
    return spec


sys.meta_path.insert(0, _PciBus())
'''


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def write_tpu_vm_site(directory: Path) -> Path:
  """The fake VM image's site directory (its sitecustomize.py); put it first on PYTHONPATH."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "sitecustomize.py").write_text(SITE_CUSTOMIZE)
  return directory


def tpu_vm_attributes(worker: int, hosts: int, accelerator: str) -> dict[str, str]:
  """The instance attributes of worker `worker` of a `hosts`-worker slice, as on a TPU VM."""
  return {
      "agent-worker-number": str(worker),
      "worker-network-endpoints": ",".join(["127.0.0.1"] * hosts),
      "accelerator-type": accelerator,
      "tpu-env": f"ACCELERATOR_TYPE: '{accelerator}'\nWORKER_ID: '{worker}'\nTYPE: '{accelerator}'\n",
  }


class MetadataServer:
  """One VM's GCE metadata server on 127.0.0.1 (a thread of the test process)."""

  PREFIX = "/computeMetadata/v1/instance/attributes/"

  def __init__(self, attributes: dict[str, str]):
    self.attributes = dict(attributes)
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # noqa: N802 (the http.server API)
        key = self.path[len(outer.PREFIX):] if self.path.startswith(outer.PREFIX) else None
        if self.headers.get("Metadata-Flavor") != "Google" or key not in outer.attributes:
          self.send_response(404)
          self.end_headers()
          return
        body = outer.attributes[key].encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/text")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

      def log_message(self, *args):
        pass

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.server.daemon_threads = True
    self.address = f"127.0.0.1:{self.server.server_address[1]}"
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
    self.thread.start()

  def close(self) -> None:
    self.server.shutdown()
    self.server.server_close()


def tpu_vm_env(metadata: MetadataServer, site: Path, coordinator_port: int, devices: int = 2) -> dict[str, str]:
  """The variables that make a process on this machine see a Cloud TPU VM with `devices` CPU devices."""
  return {
      "GCE_METADATA_IP": metadata.address,
      "JAX_FORCE_TPU_INIT": "1",
      "JAX_PLATFORMS": "cpu",
      "JAX_NUM_CPU_DEVICES": str(devices),
      "JAX_COORDINATOR_PORT": str(coordinator_port),
      "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
  }


def clean_environment(**extra: str) -> dict[str, str]:
  """os.environ without any variable that describes a cluster (ours, JAX's, SLURM's, GKE's), plus `extra`."""
  drop = ("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_", "TPU_", "MEGASCALE_", "OMPI_",
          "GCE_METADATA", "JAX_FORCE_TPU_INIT", "KUBERNETES_")
  env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
  env.update(extra)
  return env


FAKE_UV = '''#!{python}
"""The TPU VM image's `uv` on a machine without network: `uv venv` makes the venv from this
machine's released CPython ({version}); `uv pip install "realm-jax[tpu] @ file://DIR"` puts the
shipped tree DIR on the venv's path (a .pth file) and writes the `realm-jax` console script
(a stand-in for building and installing the wheel, which tests/test_wheel.py covers)."""
import json, os, pathlib, subprocess, sys

args = sys.argv[1:]
with open(pathlib.Path(os.environ["HOME"]) / ".fake-uv-calls.jsonl", "a") as f:
  f.write(json.dumps(args) + "\\n")


def value(flag):
  return args[args.index(flag) + 1]


if args[0] == "venv":
  if value("--python") != "{version}" or value("--python-preference") != "only-managed":
    sys.exit(f"fake uv: this image has CPython {version} only, asked for {{args}}")
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", args[-1]], check=True)
elif args[:2] == ["pip", "install"]:
  requirement, python = args[-1], pathlib.Path(value("--python"))
  if " @ file://" not in requirement:
    sys.exit(f"fake uv: no network here, cannot install {{requirement!r}}")
  venv = python.parent.parent
  site = venv / "lib" / f"python{{sys.version_info[0]}}.{{sys.version_info[1]}}" / "site-packages"
  (site / "realm_jax_shipped.pth").write_text(requirement.split(" @ file://", 1)[1] + "\\n")
  script = venv / "bin" / "realm-jax"
  script.write_text(f"#!{{python}}\\nimport sys\\nfrom realm_jax.cli.main import main\\nsys.exit(main())\\n")
  script.chmod(0o755)
else:
  sys.exit(f"fake uv: unsupported {{args}}")
'''


def write_tpu_vm_image(directory: Path) -> tuple[Path, Path]:
  """The fake VM image: (its bin/ with `uv`, its site dir with the PCI bus's sitecustomize.py)."""
  import sys

  bin_dir = directory / "bin"
  bin_dir.mkdir(parents=True, exist_ok=True)
  version = f"{sys.version_info[0]}.{sys.version_info[1]}"
  (bin_dir / "uv").write_text(FAKE_UV.format(python=sys.executable, version=version))
  (bin_dir / "uv").chmod(0o755)
  return bin_dir, write_tpu_vm_site(directory / "site")
