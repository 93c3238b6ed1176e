"""No command destroys what it did not create: `demo --fresh` deletes only a work directory the
demo made, `evaluate --out` never overwrites its input or an existing file unless told (and checks
it can write before working), `corpus build --overwrite` with a bad input leaves the old corpus
whole, a damaged fine-tuning checkpoint is refused by `evaluate`, `ask` and `--set init=ROOT`, and
`memory://` (gone when the process exits) is refused on the command line.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from realm_jax.cli.main import main
from realm_jax.data.corpus import CorpusReader, build_corpus
from realm_jax.storage import Storage
from tests.helpers.cli_errors import one_line_error
from tests.helpers.facts_corpus import write_documents

FINETUNE = ["num_train_steps=2", "checkpoint_every=2", "log_every=1", "async_checkpointing=false",
            "batch_size=8", "max_answers=2", "max_answer_tokens=4"]


@pytest.fixture(scope="module")
def qa(tmp_path_factory) -> pathlib.Path:
  """A fine-tuning root (2 steps on the facts corpus) and its questions file."""
  base = tmp_path_factory.mktemp("qa")
  docs = write_documents(base / "docs.jsonl")
  build_corpus([str(base / "docs.jsonl")], Storage.open(str(base / "run")), block_len=64)
  (base / "facts.jsonl").write_text("".join(
      json.dumps({"question": f"Where was {d['title']} born?", "answers": [d["city"]]}) + "\n" for d in docs))
  assert main(["finetune", "--storage", str(base / "run"), "--set",
               f"train_questions={base / 'facts.jsonl'}", *FINETUNE]) == 0
  return base


# -- demo --------------------------------------------------------------------------------------------

def test_demo_fresh_refuses_a_directory_it_did_not_create(tmp_path, capsys):
  mine = tmp_path / "my-thesis"
  mine.mkdir()
  (mine / "chapter1.tex").write_text("years of work")
  assert main(["demo", "--quick", "--fresh", "--workdir", str(mine)]) == 2
  line = one_line_error(capsys, "demo")
  assert str(mine) in line and "not created by realm-jax demo" in line, line
  assert (mine / "chapter1.tex").read_text() == "years of work"
  a_file = tmp_path / "a-file"
  a_file.write_text("x")
  assert main(["demo", "--quick", "--workdir", str(a_file)]) == 2
  assert "not a directory" in one_line_error(capsys, "demo")
  assert a_file.read_text() == "x"


def test_demo_fresh_empties_a_work_directory_the_demo_made(tmp_path):
  from realm_jax.cli.demo import MARKER, prepare_workdir

  work = tmp_path / "demo"
  prepare_workdir(work, fresh=False)  # a new directory: the demo's, marked
  assert (work / MARKER).is_file()
  (work / "stage.json").write_text("{}")
  prepare_workdir(work, fresh=True)
  assert sorted(p.name for p in work.iterdir()) == [MARKER]


# -- evaluate --out ------------------------------------------------------------------------------------

def test_evaluate_out_never_overwrites_its_input(qa, capsys):
  questions = qa / "facts.jsonl"
  before = questions.read_bytes()
  assert main(["evaluate", "--storage", str(qa / "run"), "--questions", str(questions), "--out", str(questions),
               "--batch-size", "8"]) == 2
  line = one_line_error(capsys, "evaluate")
  assert str(questions) in line and "input" in line, line
  assert questions.read_bytes() == before


def test_evaluate_out_refuses_an_existing_file_unless_told(qa, tmp_path, capsys):
  out = tmp_path / "preds.jsonl"
  out.write_text("keep me\n")
  args = ["evaluate", "--storage", str(qa / "run"), "--questions", str(qa / "facts.jsonl"), "--out", str(out),
          "--batch-size", "8", "--limit", "3"]
  assert main(args) == 2
  line = one_line_error(capsys, "evaluate")
  assert str(out) in line and "--overwrite" in line, line
  assert out.read_text() == "keep me\n"
  assert main([*args, "--overwrite"]) == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == 3 and all("answer" in r for r in rows)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.jsonl"]  # no temp file left behind


def test_evaluate_out_is_checked_before_any_work(qa, tmp_path, capsys):
  blocker = tmp_path / "not-a-dir"
  blocker.write_text("x")
  # The storage root does not even exist: the --out check must come first.
  assert main(["evaluate", "--storage", str(tmp_path / "nowhere"), "--questions", str(qa / "facts.jsonl"),
               "--out", str(blocker / "preds.jsonl")]) == 2
  line = one_line_error(capsys, "evaluate")
  assert str(blocker / "preds.jsonl") in line and "cannot write" in line, line


# -- corpus build --overwrite -----------------------------------------------------------------------------

def test_corpus_overwrite_with_bad_input_keeps_the_old_corpus(tmp_path, capsys):
  docs = tmp_path / "docs.jsonl"
  write_documents(docs)
  root = tmp_path / "run"
  assert main(["corpus", "build", "--input", str(docs), "--storage", str(root), "--block-len", "64",
               "--shard-blocks", "4", "--quiet"]) == 0
  files_before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
  bad = tmp_path / "bad.jsonl"
  lines = [json.dumps({"title": f"T{i}", "text": f"Person {i} was born in Paris in 1950."}) for i in range(40)]
  bad.write_text("\n".join(lines) + '\n{"title": "broken", "text": \n')
  assert main(["corpus", "build", "--input", str(bad), "--storage", str(root), "--block-len", "64",
               "--shard-blocks", "4", "--overwrite", "--quiet"]) == 2
  line = one_line_error(capsys, "corpus")
  assert f"{bad}:41" in line, line
  files_after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
  assert files_after == files_before  # the old corpus, byte for byte, and nothing else
  assert CorpusReader(Storage.open(str(root))).num_blocks == 16
  # A good input replaces it, and the old shards go.
  good = tmp_path / "good.jsonl"
  good.write_text("\n".join(lines[:10]) + "\n")
  assert main(["corpus", "build", "--input", str(good), "--storage", str(root), "--block-len", "64",
               "--shard-blocks", "4", "--overwrite", "--quiet"]) == 0
  reader = CorpusReader(Storage.open(str(root)))
  assert reader.num_blocks == 10 and [b.title for b in reader.iter_blocks()] == [f"T{i}" for i in range(10)]
  listed = {s[kind]["path"] for s in reader.shards for kind in ("tokens", "spans", "text")}
  on_disk = {p.name for p in (root / "corpus").iterdir() if p.name.endswith((".npz", ".npy"))}
  assert on_disk == listed
  # One tokenizer directory: the one the new manifest names (the replaced corpus's is gone).
  tok_dir = reader.manifest["tokenizer"].get("dir", "tokenizer")
  assert {p.name for p in (root / "corpus").iterdir() if p.is_dir()} == {tok_dir}
  reader.tokenizer()  # the tokenizer files match the new manifest


# -- damaged fine-tuning checkpoints ---------------------------------------------------------------------

def test_evaluate_ask_and_init_refuse_a_damaged_checkpoint(qa, tmp_path, capsys):
  root = tmp_path / "run"
  shutil.copytree(qa / "run", root)
  reader = root / "checkpoints" / "2" / "reader"
  bad = max((p for p in reader.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(bad.read_bytes())
  data[len(data) // 2] ^= 0xFF
  bad.write_bytes(bytes(data))
  assert main(["evaluate", "--storage", str(root), "--questions", str(qa / "facts.jsonl"), "--limit", "2"]) == 2
  assert str(bad) in one_line_error(capsys, "evaluate")
  assert main(["ask", "Where was Zorblat born?", "--storage", str(root)]) == 2
  assert str(bad) in one_line_error(capsys, "ask")
  other = tmp_path / "other"
  shutil.copytree(qa / "run" / "corpus", other / "corpus")
  assert main(["finetune", "--storage", str(other), "--set", f"train_questions={qa / 'facts.jsonl'}",
               f"init={root}", *FINETUNE]) == 2
  assert str(bad) in one_line_error(capsys, "finetune")


# -- memory:// ---------------------------------------------------------------------------------------------

def test_memory_storage_is_refused_on_the_command_line(tmp_path, capsys):
  docs = tmp_path / "docs.jsonl"
  write_documents(docs)
  assert main(["corpus", "build", "--input", str(docs), "--storage", "memory://run", "--quiet"]) == 2
  line = one_line_error(capsys, "corpus")
  assert "memory://run" in line and "vanishes" in line, line
