"""Checkpoints are verified like index versions: every committed step carries a checksum manifest,
a damaged or deleted file stops every restore with one line naming it (the trainer, the refresher),
an unfinished write left by a killed save is cleaned when resuming (so the resumed run saves that
step again), and a checkpoint of another task or model is refused.

One 4-step REALM run (checkpoints 2 and 4) is copied and damaged by each test; the CLI runs in
this process (`main([...])`), as a user's command would, and each refusal comes before any step.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from realm_jax.cli.main import main
from realm_jax.storage import Storage
from tests.helpers.cli_errors import one_line_error

SETTINGS = ["batch_size=8", "checkpoint_every=2", "log_every=1", "async_checkpointing=false",
            "keep_checkpoints=10", "index_refresh=none"]


def _pretrain(root: str, *extra: str) -> int:
  return main(["pretrain", "--config", "smoke", "--storage", root, "--set", *SETTINGS, *extra])


@pytest.fixture(scope="module")
def trained(corpus_seed, tmp_path_factory) -> pathlib.Path:
  """A smoke REALM run stopped after 4 steps: checkpoints/2 and checkpoints/4."""
  root = tmp_path_factory.mktemp("integrity") / "run"
  dst = Storage.open(str(root))
  for path in corpus_seed.list("corpus"):
    dst.write_bytes(path, corpus_seed.read_bytes(path))
  assert _pretrain(str(root), "--stop-after", "4") == 0
  assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["2", "4"]
  return root


@pytest.fixture
def root(trained, tmp_path) -> pathlib.Path:
  copy = tmp_path / "run"
  shutil.copytree(trained, copy)
  return copy


def _biggest(directory: pathlib.Path) -> pathlib.Path:
  return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_every_step_carries_a_manifest_of_its_files(trained):
  for step in (2, 4):
    manifest = json.loads((trained / "checkpoints" / str(step) / "realm_manifest.json").read_text())
    assert manifest["step"] == step and manifest["checksum"] == "crc32c"
    listed = set(manifest["files"])
    on_disk = {p.relative_to(trained / "checkpoints" / str(step)).as_posix()
               for p in (trained / "checkpoints" / str(step)).rglob("*") if p.is_file()}
    assert listed == on_disk - {"realm_manifest.json", "_CHECKPOINT_METADATA", "commit_success.txt"}
    assert {name.split("/")[0] for name in listed} >= {"encoder", "retriever", "opt_state", "rng", "data", "meta"}


def test_a_corrupted_data_file_stops_the_resume_naming_it(root, capsys):
  bad = _biggest(root / "checkpoints" / "4" / "encoder")
  data = bytearray(bad.read_bytes())
  for i in range(64):  # 64 bytes XORed in the middle of the file
    data[len(data) // 2 + i] ^= 0x5A
  bad.write_bytes(bytes(data))
  assert _pretrain(str(root), "--resume", "--stop-after", "1") == 2
  line = one_line_error(capsys)
  assert str(bad) in line and "damaged" in line, line
  assert "step 2" in line, line  # the checkpoint a user can fall back to
  assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["2", "4"]  # nothing was written


@pytest.mark.parametrize("victim", ["data file", "meta/metadata"])
def test_a_deleted_file_stops_the_resume_naming_it(root, capsys, victim):
  step = root / "checkpoints" / "4"
  gone = _biggest(step / "opt_state") if victim == "data file" else step / "meta" / "metadata"
  gone.unlink()
  assert _pretrain(str(root), "--resume", "--stop-after", "1") == 2
  line = one_line_error(capsys)
  assert str(gone) in line and "missing" in line, line


def test_an_unfinished_checkpoint_write_is_cleaned_and_the_step_saved_again(root, caplog):
  ckpt = root / "checkpoints"
  # What a save killed mid-way leaves: a step directory orbax never committed (no commit marker;
  # storage without atomic rename) and a temporary directory (local files).
  shutil.copytree(ckpt / "4", ckpt / "6")
  (ckpt / "6" / "commit_success.txt").unlink()
  shutil.copytree(ckpt / "4", ckpt / "8.orbax-checkpoint-tmp-1234567")
  caplog.set_level("INFO", logger="realm_jax")
  assert _pretrain(str(root), "--resume", "--stop-after", "1") == 0
  log = caplog.text
  assert "resumed from checkpoint step 4" in log
  assert "checkpoints/6: an unfinished write of checkpoint step 6" in log
  assert "8.orbax-checkpoint-tmp-1234567: an unfinished write of checkpoint step 8" in log
  assert sorted(p.name for p in ckpt.iterdir()) == ["2", "4", "5"]
  assert json.loads((ckpt / "5" / "meta" / "metadata").read_text())["step"] == 5


def test_ict_refuses_a_realm_checkpoint_and_a_changed_model_is_refused(root, capsys):
  assert main(["ict", "--config", "ict_smoke", "--storage", str(root), "--resume", "--set",
               "checkpoint_every=2", "async_checkpointing=false"]) == 2
  line = one_line_error(capsys, "ict")
  assert "'realm' run" in line and "realm-jax pretrain" in line, line
  assert _pretrain(str(root), "--resume", "--set", "model.bert.dropout_rate=0.2") == 2
  line = one_line_error(capsys)
  assert "model.bert.dropout_rate=0.1 there, 0.2 here" in line, line
  assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["2", "4"]


def test_the_refresher_refuses_a_damaged_retriever_and_takes_the_next_step(root):
  from realm_jax.refresh.refresher import Refresher, RefreshOptions

  bad = _biggest(root / "checkpoints" / "4" / "retriever")
  bad.write_bytes(bad.read_bytes()[:-8])  # truncated
  lines: list[str] = []
  refresher = Refresher(str(root), RefreshOptions(max_versions=1, poll_seconds=0.1, embed_batch_size=8),
                        log_fn=lines.append)
  result = refresher.run()
  assert [i.step for i in result.published] == [2]
  refused = [line for line in lines if "refused checkpoint step 4" in line]
  assert refused and str(bad) in refused[0] and "damaged" in refused[0], lines


def test_resuming_after_the_corpus_was_rebuilt_names_the_corpus_and_both_counts(root, tmp_path, capsys):
  docs = tmp_path / "more.jsonl"
  docs.write_text("".join(json.dumps({"title": f"T{i}", "text": f"Person {i} was born in Paris in 1950."}) + "\n"
                          for i in range(40)))
  assert main(["corpus", "build", "--input", str(docs), "--storage", str(root), "--block-len", "64",
               "--overwrite", "--quiet"]) == 0
  capsys.readouterr()
  assert _pretrain(str(root), "--resume", "--stop-after", "1") == 2
  line = one_line_error(capsys)
  assert str(root / "corpus") in line and "16 blocks" in line and "40 blocks" in line, line


def test_listing_steps_while_another_process_deletes_one(tmp_path):
  """The refresher lists the checkpoints (`reload`) while the trainer's max_to_keep deletes old
  steps. orbax lists the step directories, then reads each one's metadata; a step removed in
  between made it raise FileNotFoundError or NotADirectoryError, which killed the refresher. A
  second process here adds and deletes a finalized step over and over while this one lists: every
  listing succeeds, with or without that step."""
  import subprocess
  import sys
  import textwrap
  import time

  import orbax.checkpoint as ocp

  from realm_jax.train.checkpoints import Checkpoints

  root = tmp_path / "checkpoints"
  ckpt = Checkpoints(str(root), async_save=False, keep=100)
  for step in (1, 7):
    ckpt.manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave({"step": step})))
  ckpt.manager.wait_until_finished()
  shutil.move(root / "7", tmp_path / "step-7")
  script = textwrap.dedent(f"""
      import os, pathlib, shutil, time
      root, step = pathlib.Path({str(root)!r}), {str(tmp_path / "step-7")!r}
      pathlib.Path({str(tmp_path / "started")!r}).touch()
      while True:  # until killed
        shutil.copytree(step, root / ".incoming")
        os.rename(root / ".incoming", root / "7")
        time.sleep(0.002)
        shutil.rmtree(root / "7")
        time.sleep(0.002)
      """)
  proc = subprocess.Popen([sys.executable, "-c", script])
  try:
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists():
      assert proc.poll() is None and time.monotonic() < deadline
      time.sleep(0.01)
    seen, listings = set(), 0
    while listings < 300 or len(seen) < 2:  # the deletions interleave with the listings
      ckpt.reload()
      seen.add(tuple(ckpt.all_steps()))
      listings += 1
      assert time.monotonic() < deadline, (listings, seen)
  finally:
    proc.kill()
    proc.wait()
  assert seen == {(1,), (1, 7)}, seen
