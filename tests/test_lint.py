"""The code passes the project's linter: ruff with the rules and the 2-space / 120-column style of
pyproject.toml (`[tool.ruff]`), over the library, tests, benchmarks and the TPU kit."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_passes():
  out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
