"""The command line itself: `realm-jax --help` starts fast without JAX, `python -m realm_jax` is
the same command, `--log-level` is accepted everywhere, and `evaluate`'s table fits 80 columns."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from realm_jax.cli.evaluate import plain_table
from realm_jax.openqa.evaluate import Summary

REPO = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("jax", "jaxlib", "flax", "orbax", "optax", "numpy", "tensorflow", "torch", "rich")


def _python(*args: str, **kwargs) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                        **kwargs)


def test_help_imports_no_jax_and_is_fast():
  script = ("import json, sys\n"
            "from realm_jax.cli.main import main\n"
            "try:\n  main(['--help'])\nexcept SystemExit:\n  pass\n"
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n")
  out = _python("-c", script)
  assert out.returncode == 0, out.stderr
  assert "pretrain" in out.stdout and "refresh" in out.stdout
  assert json.loads(out.stdout.splitlines()[-1]) == []  # nothing heavy was imported
  times = []
  for _ in range(3):  # the fastest of three: the machine may be busy with other tests
    t0 = time.perf_counter()
    assert _python("-m", "realm_jax", "--help").returncode == 0
    times.append(time.perf_counter() - t0)
  assert min(times) < 0.5, times


def test_python_m_realm_jax_is_the_command():
  main_help = _python("-m", "realm_jax.cli.main", "--help")
  module_help = _python("-m", "realm_jax", "--help")
  assert module_help.returncode == 0 and module_help.stdout == main_help.stdout
  version = _python("-m", "realm_jax", "--version")
  assert version.stdout.startswith("realm-jax ")
  for argv in (["--log-level", "debug", "refresh", "--help"], ["refresh", "--log-level", "warning", "--help"]):
    assert _python("-m", "realm_jax", *argv).returncode == 0
  bad = _python("-m", "realm_jax", "pretrain", "--storage", "/nonexistent", "--config", "no_such_experiment")
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith("realm-jax pretrain: error: no experiment named")


@pytest.mark.parametrize("names", [["nq-test", "wq-test", "ct-test", "trivia-test"],
                                   ["/very/long/absolute/path/to/some/question/sets/nq-open-validation.jsonl",
                                    "/another/path/a-question-file-with-a-really-very-long-name-indeed.tsv"]])
def test_evaluate_table_fits_80_columns(names):
  summaries = [Summary(n, 3610, 0.123, {1: 0.2, 5: 0.45, 20: 0.6, 100: 0.8}, 12.5) for n in names]
  text = plain_table(summaries)
  lines = text.splitlines()
  assert all(len(line) <= 80 for line in lines), lines
  header = lines[1]
  assert "questions" in header and "exact match" in header and "recall@100" in header and "q/s" in header
  for line, name in zip(lines[2:], names):
    short = pathlib.Path(name).stem if "/" in name else name
    first = line.split()[0]  # the short name, cut (`~`) where it would not fit
    assert "/" not in line and short.startswith(first.rstrip("~")) and len(first) >= min(len(short), 8)
    assert line.split()[1:] == ["3610", "12.3", "20.0", "45.0", "60.0", "80.0", "288.8"]
