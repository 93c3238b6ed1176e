"""What an installed user meets: a wheel built from this tree, installed into a fresh virtualenv
outside it, trains with a named experiment and refreshes the index with the config the trainer
stored in its checkpoint (no `--config`).

The venv sees this machine's packages (`--system-site-packages`, so nothing is downloaded), and
realm-jax itself is installed into it from the wheel (`--no-deps`); the test checks that the
commands import realm_jax from the venv, not from the source tree.
"""

import os
import pathlib
import shutil
import subprocess
import sys

from realm_jax.data.corpus import build_corpus
from realm_jax.storage import Storage
from tests.helpers.facts_corpus import write_documents

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: pathlib.Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
  out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
  return out


def _source_copy(dst: pathlib.Path) -> pathlib.Path:
  """The tree's tracked and untracked (not ignored) files: the wheel is built from what a checkout holds."""
  listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard"], capture_output=True,
                          text=True, check=True).stdout.split()
  for rel in listed:
    if (REPO / rel).is_file():
      (dst / rel).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(REPO / rel, dst / rel)
  return dst


def test_installed_wheel_pretrains_and_refreshes_from_the_checkpoint_config(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
  src = _source_copy(tmp_path / "src")
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
        str(src)], tmp_path, env)
  wheel = next((tmp_path / "dist").glob("realm_jax-*.whl"))
  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path, env)
  python, cli = venv / "bin" / "python", venv / "bin" / "realm-jax"
  _run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], tmp_path, env)
  where = _run([str(python), "-c", "import realm_jax, realm_jax.experiments as e; print(realm_jax.__file__);"
                "print(e.__file__)"], tmp_path, env).stdout.split()
  assert all(pathlib.Path(p).is_relative_to(venv) for p in where), where  # the installed copy, not the tree

  docs = tmp_path / "docs.jsonl"
  write_documents(docs)
  root = tmp_path / "run"
  build_corpus([str(docs)], Storage.open(str(root)), block_len=64)
  work = tmp_path / "elsewhere"  # no experiments/ folder anywhere near
  work.mkdir()
  train = _run([str(cli), "pretrain", "--config", "smoke", "--storage", str(root), "--stop-after", "1"], work, env)
  assert "finished at step 1" in train.stdout, train.stdout
  refresh = _run([str(cli), "refresh", "--storage", str(root), "--max-versions", "1", "--poll-seconds", "0.2"],
                 work, env)
  assert "the trainer's config (from checkpoint step 1)" in refresh.stderr, refresh.stderr[-3000:]
  assert "published 1 index version(s)" in refresh.stdout, refresh.stdout
  latest = Storage.open(str(root)).read_json("index/LATEST")["version"]
  assert latest.startswith("000000000001-")  # built from the trainer's step-1 checkpoint
