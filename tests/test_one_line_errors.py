"""Every failure a user can cause or meet ends in one line, `realm-jax <command>: error: <what, which
path>`, and a non-zero exit: filesystem errors (a root that is a file, a read-only root, a full
disk while building a corpus or writing a checkpoint), bad config values, bad input files,
unreachable storage (no network, a closed emulator port), bad numbers on the command line, and
Ctrl-C during the first training step. Also: the CLI completes the emulator environment from
`STORAGE_EMULATOR_HOST` alone, and two messages that used to mislead now name what is wrong.
"""

from __future__ import annotations

import bz2
import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from realm_jax.cli.main import main
from realm_jax.data.corpus import CorpusReader, build_corpus
from realm_jax.storage import Storage, StorageError
from tests.helpers.cli_errors import one_line_error
from tests.helpers.facts_corpus import write_documents
from tests.helpers.faulty_storage import cap_file_size, full_disk_storage, read_only_command

REPO = pathlib.Path(__file__).resolve().parents[1]
EMULATOR_VARS = ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "TENSORSTORE_GCS_HTTP_URL",
                 "GOOGLE_AUTH_TOKEN_FOR_TESTING", "CLOUD_STORAGE_EMULATOR_ENDPOINT", "NO_GCE_CHECK",
                 "GCE_METADATA_HOST", "EPATH_USE_TF")


def _command(argv: list[str]) -> list[str]:
  return [sys.executable, "-m", "realm_jax", *argv]


def _run(command: list[str], env: dict[str, str] | None = None, timeout: float = 300,
         **kwargs) -> tuple[int, str, float]:
  """Runs `command` (a fresh process, as a user would); (exit code, stderr, seconds)."""
  env = {**(env if env is not None else os.environ), "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
         "JAX_NUM_CPU_DEVICES": "1"}
  t0 = time.monotonic()
  out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
  return out.returncode, out.stderr, time.monotonic() - t0


def _cli(argv: list[str], env: dict[str, str] | None = None, timeout: float = 300,
         **kwargs) -> tuple[int, str, float]:
  """`python -m realm_jax ARGV`, as `_run` runs it."""
  return _run(_command(argv), env, timeout, **kwargs)


def _assert_one_line(stderr: str, command: str) -> str:
  lines = [line for line in stderr.strip().splitlines() if line.strip()]
  assert lines and lines[-1].startswith(f"realm-jax {command}: error: "), stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  return lines[-1]


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
  write_documents(path)
  return path


# -- the local filesystem -------------------------------------------------------------------------------

def test_a_storage_root_that_is_a_file(docs, tmp_path, capsys):
  a_file = tmp_path / "notes.txt"
  a_file.write_text("mine")
  assert main(["corpus", "build", "--input", str(docs), "--storage", str(a_file), "--quiet"]) == 2
  line = one_line_error(capsys, "corpus")
  assert str(a_file) in line and "not a directory" in line.lower(), line
  assert a_file.read_text() == "mine"


def test_a_read_only_storage_root(docs, tmp_path, corpus_seed):
  ro = tmp_path / "ro"
  ro.mkdir()
  code, err, _ = _run(read_only_command(str(ro), _command(["corpus", "build", "--input", str(docs), "--storage",
                                                           str(ro / "run"), "--quiet"])))
  line = _assert_one_line(err, "corpus")
  assert code == 2 and str(ro / "run") in line and "read-only" in line.lower(), line
  # A trainer on a read-only root that holds a corpus: refused at its first write, in one line.
  run = tmp_path / "run"
  for path in corpus_seed.list("corpus"):
    Storage.open(str(run)).write_bytes(path, corpus_seed.read_bytes(path))
  code, err, _ = _run(read_only_command(str(run), _command(["pretrain", "--storage", str(run), "--set",
                                                            "batch_size=8"])))
  line = _assert_one_line(err, "pretrain")
  assert code == 2 and str(run) in line and "read-only" in line.lower(), line


def test_a_full_disk_while_building_a_corpus(docs, tmp_path):
  root = tmp_path / "run"
  with pytest.raises(StorageError) as caught:
    build_corpus([str(docs)], full_disk_storage(str(root), budget=20_000), block_len=64, shard_blocks=2)
  message = str(caught.value)
  assert str(root / "corpus") in message and "No space left on device" in message, message
  assert "\n" not in message
  leftovers = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
  assert leftovers == []  # the shards it had written are gone: nothing half-built


def test_a_full_disk_while_writing_a_checkpoint_then_resume(corpus_seed, tmp_path):
  run = tmp_path / "run"
  for path in corpus_seed.list("corpus"):
    Storage.open(str(run)).write_bytes(path, corpus_seed.read_bytes(path))
  args = ["pretrain", "--storage", str(run), "--set", "batch_size=8", "checkpoint_every=2", "log_every=1",
          "index_refresh=none"]
  # Files may not grow past 1 MB: the index (8 KB) and metrics fit, the checkpoint's arrays do not.
  code, err, _ = _cli([*args, "--stop-after", "3"], preexec_fn=cap_file_size(1 << 20))
  line = _assert_one_line(err, "pretrain")
  assert code == 2 and str(run / "checkpoints") in line and "File too large" in line, line
  lines = err.strip().splitlines()
  # Not 1,197 lines: the run's progress, orbax's own error records (one line each, no traceback)
  # and the error line.
  assert len(lines) < 30 and all(len(x) < 400 for x in lines), err
  # Nothing half-written is taken for a checkpoint: the resumed run starts over and saves.
  code, err, _ = _cli([*args, "--resume", "--stop-after", "2"])
  assert code == 0, err[-3000:]
  assert "no checkpoint to resume from: starting at step 0" in err, err[-3000:]
  assert "an unfinished write of checkpoint step 2" in err, err[-3000:]
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2"]


def test_unwritable_outputs(tmp_path, capsys):
  a_file = tmp_path / "a-file"
  a_file.write_text("x")
  assert main(["data", "questions", "--out", str(a_file), "--sets", "ct-test"]) == 2
  line = one_line_error(capsys, "data")
  assert str(a_file) in line, line
  assert a_file.read_text() == "x"


# -- config values --------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, words", [
    (["--set", "learning_rate=fast"], ["learning_rate", "'fast'", "number"]),
    (["--set", "warmup_steps=abc"], ["warmup_steps", "'abc'", "int"]),
    (["--set", "model.bert.foo=3"], ["model.bert.foo", "unknown"]),
    (["--set", "batch_size=8.5"], ["batch_size", "8.5", "int"]),
    (["--set", "async_checkpointing=maybe"], ["async_checkpointing", "'maybe'", "true or false"]),
])
def test_bad_config_values(tmp_path, capsys, setting, words):
  assert main(["pretrain", "--storage", str(tmp_path / "run"), *setting]) == 2
  line = one_line_error(capsys, "pretrain")
  assert all(w in line for w in words), line


def test_a_json_config_without_model_and_with_an_unknown_bert_key(tmp_path, capsys):
  from realm_jax.train.config import load_config

  no_model = tmp_path / "no-model.json"
  no_model.write_text(json.dumps({"batch_size": 8}))
  assert main(["pretrain", "--storage", str(tmp_path / "run"), "--config", str(no_model)]) == 2
  line = one_line_error(capsys, "pretrain")
  assert str(no_model) in line and '"model"' in line, line
  cfg = load_config("smoke").to_dict()
  cfg["model"]["bert"]["hidden_sise"] = 64
  typo = tmp_path / "typo.json"
  typo.write_text(json.dumps(cfg))
  assert main(["pretrain", "--storage", str(tmp_path / "run"), "--config", str(typo)]) == 2
  line = one_line_error(capsys, "pretrain")
  assert str(typo) in line and "hidden_sise" in line, line


# -- bad input files ------------------------------------------------------------------------------------

def test_bad_huggingface_files(tmp_path, capsys):
  from safetensors.numpy import save_file

  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text("garbage{")
  assert main(["convert", "hf", "--path", str(hf), "--out", str(tmp_path / "out1")]) == 2
  line = one_line_error(capsys, "convert")
  assert str(hf / "config.json") in line and "JSON" in line, line
  (hf / "config.json").write_text(json.dumps({
      "architectures": ["BertModel"], "vocab_size": 100, "hidden_size": 8, "num_hidden_layers": 1,
      "num_attention_heads": 2, "intermediate_size": 16}))
  save_file({"embeddings.word_embeddings.weight": np.zeros((100, 8), np.float32)}, str(hf / "model.safetensors"))
  data = (hf / "model.safetensors").read_bytes()
  (hf / "model.safetensors").write_bytes(data[: len(data) // 2])
  assert main(["convert", "hf", "--path", str(hf), "--out", str(tmp_path / "out2")]) == 2
  line = one_line_error(capsys, "convert")
  assert str(hf / "model.safetensors") in line, line
  assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


@pytest.mark.parametrize("damage", ["truncated", "not bz2"])
def test_bad_bz2_dumps(tmp_path, capsys, damage):
  xml = ("<mediawiki>" + "".join(f"<page><title>T{i}</title><ns>0</ns><id>{i}</id><revision><text>Person {i} "
                                 f"was born in Paris.</text></revision></page>" for i in range(200)) + "</mediawiki>")
  dump = tmp_path / "dump.xml.bz2"
  data = bz2.compress(xml.encode())
  dump.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"this is not bzip2 at all")
  assert main(["corpus", "build", "--input", str(dump), "--storage", str(tmp_path / "run"), "--quiet"]) == 2
  line = one_line_error(capsys, "corpus")
  assert str(dump) in line and "bz2" in line, line


def test_a_question_record_missing_answers_names_answers(tmp_path):
  from realm_jax.data.qa import QuestionFileError, load_questions

  path = tmp_path / "q.jsonl"
  path.write_text(json.dumps({"question": "Where?"}) + "\n")
  with pytest.raises(QuestionFileError, match=r"q\.jsonl:1: missing field\(s\) \['answers'\] \(or 'answer'\)"):
    load_questions(str(path))


# -- numbers on the command line ------------------------------------------------------------------------

@pytest.mark.parametrize("argv, flag", [
    (["forward", "--batch", "0"], "--batch"),
    (["forward", "--batch", "-3"], "--batch"),
    (["pretrain", "--storage", "/nonexistent", "--stop-after", "-1"], "--stop-after"),
    (["ict", "--storage", "/nonexistent", "--stop-after", "0"], "--stop-after"),
    (["finetune", "--storage", "/nonexistent", "--stop-after", "-2"], "--stop-after"),
    (["evaluate", "--storage", "/nonexistent", "--questions", "ct-test", "--batch-size", "0"], "--batch-size"),
])
def test_bad_numbers(capsys, argv, flag):
  assert main(argv) == 2
  line = one_line_error(capsys, argv[0])
  assert flag in line and ">= 1" in line, line


# -- storage that cannot be reached ---------------------------------------------------------------------

# Seconds: the process's start-up (importing jax, slower beside other tests on 2 cores) plus the
# storage probe's 5 s timeout; a client that retries for minutes is what these tests catch.
FAST = 30


def _env_without_emulator() -> dict[str, str]:
  return {k: v for k, v in os.environ.items() if k not in EMULATOR_VARS}


def test_gs_without_network_fails_fast_naming_the_bucket():
  code, err, seconds = _cli(["corpus", "info", "--storage", "gs://realm-jax-unreachable-bucket/run"],
                            env=_env_without_emulator(), timeout=120)
  line = _assert_one_line(err, "corpus")
  assert code == 2 and seconds < FAST, (code, seconds, err[-2000:])
  assert "gs://realm-jax-unreachable-bucket" in line and "STORAGE_EMULATOR_HOST" in line, line


def test_a_closed_emulator_port_fails_fast_naming_it():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # closed once the block ends
  env = {**_env_without_emulator(), "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}
  code, err, seconds = _cli(["corpus", "info", "--storage", "gs://some-bucket/run"], env=env, timeout=120)
  line = _assert_one_line(err, "corpus")
  assert code == 2 and seconds < FAST, (code, seconds, err[-2000:])
  assert "gs://some-bucket" in line and f"127.0.0.1:{port}" in line, line


def test_storage_emulator_host_alone_points_the_cli_at_an_emulator(gcs_server, docs):
  bucket = gcs_server.new_bucket()
  env = {**_env_without_emulator(), "STORAGE_EMULATOR_HOST": gcs_server.endpoint}
  code, err, _ = _cli(["corpus", "build", "--input", str(docs), "--storage", f"{bucket}/run", "--block-len", "64",
                       "--quiet"], env=env)
  assert code == 0, err[-3000:]
  assert CorpusReader(Storage.open(f"{bucket}/run")).num_blocks == 16


# -- Ctrl-C during the first training step ---------------------------------------------------------------

def test_ctrl_c_during_the_first_step_exits_cleanly(corpus_seed, tmp_path):
  rng = random.Random()
  for attempt in range(3):
    run = tmp_path / f"run{attempt}"
    for path in corpus_seed.list("corpus"):
      Storage.open(str(run)).write_bytes(path, corpus_seed.read_bytes(path))
    log = tmp_path / f"log{attempt}"
    with open(log, "w") as out:
      proc = subprocess.Popen([sys.executable, "-m", "realm_jax", "pretrain", "--storage", str(run), "--set",
                               "batch_size=8", "index_refresh=none"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(REPO), "JAX_NUM_CPU_DEVICES": "1"})
      try:
        deadline = time.monotonic() + 120
        while "using index" not in log.read_text():
          assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
          time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 3.0))  # somewhere in the first step (compilation included)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
      finally:
        proc.kill()
        proc.wait()
    text = log.read_text()
    assert code == 130, (attempt, code, text[-3000:])
    assert text.strip().splitlines()[-1] == "realm-jax pretrain: interrupted", text[-3000:]
    assert "finished at step" not in text and "Traceback" not in text, text[-3000:]
