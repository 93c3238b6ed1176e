"""`realm-jax finetune | evaluate | ask` end to end on a tiny model and the invented-facts corpus.

Fine-tuning resumes exactly (interrupted + resumed = straight), evaluation reads the real
NQ-Open / WebQuestions / CuratedTrec test files through its input path (counts checked) and writes
predictions JSONL, `ask` prints an answer with its evidence; bad questions are handled clearly.
"""

import json
import logging

import pytest

from realm_jax.cli.main import main
from realm_jax.data.corpus import build_corpus
from realm_jax.data.qa import QAExample, load_questions
from realm_jax.openqa import features
from realm_jax.storage import Storage
from tests.helpers.facts_corpus import write_documents

SETTINGS = ["num_train_steps=4", "checkpoint_every=2", "log_every=1", "async_checkpointing=false",
            "batch_size=8", "max_answers=2", "max_answer_tokens=4"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("openqa")
  docs = write_documents(root / "docs.jsonl")
  build_corpus([str(root / "docs.jsonl")], Storage.open(str(root / "seed")), block_len=64)
  questions = root / "facts.jsonl"
  questions.write_text("".join(json.dumps({"question": f"Where was {d['title']} born?", "answers": [d["city"]]}) + "\n"
                               for d in docs))
  return root


def _root(corpus_dir, tmp_path, name):
  src, dst = Storage.open(str(corpus_dir / "seed")), Storage.open(str(tmp_path / name))
  for path in src.list("corpus"):
    dst.write_bytes(path, src.read_bytes(path))
  return str(tmp_path / name)


def _finetune(root, questions, *extra):
  return main(["finetune", "--storage", root, "--set", f"train_questions={questions}", *SETTINGS, *extra])


def _losses(root):
  rows = Storage.open(root).read_bytes("metrics/finetune.jsonl").decode().splitlines()
  return {r["step"]: r["loss"] for r in map(json.loads, rows)}


@pytest.fixture(scope="module")
def trained(corpus_dir, tmp_path_factory):
  """A run interrupted after 2 steps and resumed to 4."""
  root = _root(corpus_dir, tmp_path_factory.mktemp("interrupted"), "run")
  questions = corpus_dir / "facts.jsonl"
  assert _finetune(root, questions, "--stop-after", "2") == 0
  assert _finetune(root, questions, "--resume") == 0
  return root


def test_resumed_finetuning_equals_a_straight_run(trained, corpus_dir, tmp_path, capsys):
  straight = _root(corpus_dir, tmp_path, "straight")
  assert _finetune(straight, corpus_dir / "facts.jsonl") == 0
  want, got = _losses(straight), _losses(trained)
  assert sorted(got) == [1, 2, 3, 4] and sorted(want) == [1, 2, 3, 4]
  # Same machine and program: a resumed run computes the same floats up to recompilation.
  assert [got[s] for s in range(1, 5)] == pytest.approx([want[s] for s in range(1, 5)], rel=1e-5)
  capsys.readouterr()
  assert _finetune(trained, corpus_dir / "facts.jsonl") == 2  # not without --resume
  assert "pass --resume" in capsys.readouterr().err


def test_evaluate_reads_the_real_test_sets(trained, corpus_dir, tmp_path, capsys):
  counts = {name: len(load_questions(name)) for name in ("nq-test", "wq-test", "ct-test")}
  assert counts == {"nq-test": 3610, "wq-test": 2032, "ct-test": 694}
  assert load_questions("ct-test")[0].answer_type == "regex"
  out = tmp_path / "preds"
  facts = str(corpus_dir / "facts.jsonl")
  code = main(["evaluate", "--storage", trained, "--questions", "nq-test", "wq-test", "ct-test", facts,
               "--limit", "5", "--out", str(out), "--json", "--batch-size", "8"])
  captured = capsys.readouterr().out
  assert code == 0
  summaries = json.loads(captured.strip().splitlines()[-1])
  assert [s["name"] for s in summaries] == ["nq-test", "wq-test", "ct-test", facts]
  assert all(s["num_questions"] == 5 for s in summaries)
  assert "exact match" in captured and "recall@5" in captured
  for name in ("nq-test", "wq-test", "ct-test", "facts"):
    rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    for r in rows:
      assert {"answer", "block_id", "title", "score", "reader_score", "retriever_score", "correct",
              "first_hit_rank", "retrieved"} <= set(r)
      # Written with 4 decimals to the JSONL: the sum of two rounded numbers is within 1e-4 of the third.
      assert r["score"] == pytest.approx(r["reader_score"] + r["retriever_score"], abs=1e-3)
  nq = [json.loads(line) for line in (out / "nq-test.jsonl").read_text().splitlines()]
  assert [r["question"] for r in nq] == [e.question for e in load_questions("nq-test")[:5]]
  facts_rows = [json.loads(line) for line in (out / "facts.jsonl").read_text().splitlines()]
  # Every facts question has its answer in exactly one block: recall@16 over 16 blocks is 1.
  assert all(r["first_hit_rank"] is not None for r in facts_rows)


def test_evaluate_and_ask_output_in_a_pipe(trained, corpus_dir):
  """As a CI log sees them: the summary is plain text within 80 columns with short set names, and
  neither command prints orbax's notes (absl WARNING lines) or anything but its own errors."""
  import os
  import pathlib
  import subprocess
  import sys

  repo = pathlib.Path(__file__).resolve().parents[1]
  env = {**os.environ, "PYTHONPATH": str(repo), "JAX_NUM_CPU_DEVICES": "1"}
  facts = str(corpus_dir / "facts.jsonl")
  for argv in (["evaluate", "--storage", trained, "--questions", "nq-test", facts, "--limit", "4", "--batch-size", "4"],
               ["ask", "Where was Zorblat born?", "--storage", trained]):
    out = subprocess.run([sys.executable, "-m", "realm_jax", *argv], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "absl" not in out.stderr and "WARNING" not in out.stderr, out.stderr[-3000:]
    assert all(len(line) <= 80 for line in out.stdout.splitlines()) or argv[0] == "ask", out.stdout
  table = [line.split()[0] for line in subprocess.run(
      [sys.executable, "-m", "realm_jax", "evaluate", "--storage", trained, "--questions", facts, "--limit", "2",
       "--batch-size", "2"], env=env, capture_output=True, text=True, timeout=300).stdout.splitlines()[2:]]
  assert table == ["facts"], table


def test_finetuning_stops_on_a_non_finite_loss(corpus_dir, tmp_path, capsys):
  root = _root(corpus_dir, tmp_path, "nan")
  capsys.readouterr()
  assert _finetune(root, corpus_dir / "facts.jsonl", "--set", "learning_rate=1e30", "checkpoint_every=1") == 2
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("realm-jax finetune: error:")]
  assert len(errors) == 1 and "non-finite loss at step" in errors[0], errors
  step = int(errors[0].split("non-finite loss at step ")[1].split()[0])
  kept = sorted(int(n) for n in Storage.open(root).listdir("checkpoints") if n.isdigit())
  assert step > 1 and kept == list(range(1, step)), (step, kept)  # every good step saved, the NaN one not
  assert f"the last checkpoint is step {step - 1}" in errors[0]


def test_ask_prints_the_answer_and_its_evidence(trained, capsys):
  assert main(["ask", "Where was Zorblat born?", "--storage", trained, "--top", "2"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("1. ") and "\n2. " in out
  assert "retriever" in out and "retrieval rank" in out and "block " in out
  assert main(["ask", "   ", "--storage", trained]) == 2
  assert "empty" in capsys.readouterr().err


def test_bad_questions(trained, tmp_path, capsys, caplog):
  bad = tmp_path / "bad.jsonl"
  bad.write_bytes(b'{"question": "fine?", "answers": ["yes"]}\n{"question": "caf\xe9?", "answers": ["x"]}\n')
  assert main(["evaluate", "--storage", trained, "--questions", str(bad)]) == 2
  err = capsys.readouterr().err
  assert f"{bad}:2" in err and "UTF-8" in err
  from realm_jax.data.tokenizer import load_tokenizer
  tok = load_tokenizer("minilm")
  with pytest.raises(features.QuestionError, match="'empty-1'"):
    features.encode_questions([QAExample("empty-1", "  ", ["a"])], tok, 16)
  long = QAExample("long-7", "why " * 40, ["a"])
  with caplog.at_level(logging.WARNING, logger="realm_jax.openqa"):
    batch = features.encode_questions([long], tok, 16)
  assert "long-7" in caplog.text and "truncated" in caplog.text
  assert batch["attention_mask"].sum() == 16 and batch["input_ids"][0, -1] == tok.sep_id


def test_evaluate_and_ask_from_converted_weights(trained, tmp_path, capsys):
  """`--weights` (a weights directory with retriever + reader) answers like the checkpoint it holds."""
  from realm_jax import weights
  from realm_jax.openqa.loading import load_finetuned

  tuned = load_finetuned(trained)
  weights.save_weights(str(tmp_path / "w"), tuned.model, tuned.config, parts=["retriever", "reader"])
  answers = []
  for extra in ([], ["--weights", str(tmp_path / "w")]):
    out = tmp_path / f"preds{len(extra)}.jsonl"
    assert main(["evaluate", "--storage", trained, "--questions", "wq-test", "--limit", "3", "--out", str(out),
                 *extra]) == 0
    answers.append([json.loads(line)["answer"] for line in out.read_text().splitlines()])
  assert len(answers[0]) == 3 and answers[0] == answers[1]
  encoder_only = tmp_path / "bert"
  weights.save_weights(str(encoder_only), tuned.model, tuned.config, parts=["retriever"])
  capsys.readouterr()
  assert main(["ask", "Where was Zorblat born?", "--storage", trained, "--weights", str(encoder_only)]) == 2
  assert "retriever and reader" in capsys.readouterr().err


def test_evaluate_and_ask_retrieve_with_scann_on_the_host(trained, corpus_dir, tmp_path, capsys):
  """`--retrieval scann`: the blocks the version's published ScaNN searcher finds on the host are
  the exact top-k of a numpy brute force over the index (up to near-ties), and with them the
  answers, recall and exact match equal `--retrieval device`'s; `ask` answers the same too."""
  import numpy as np

  from realm_jax.openqa.loading import load_for_answering
  from realm_jax.retrieval import index as index_lib
  from tests.helpers.ranking import assert_top_k

  facts = str(corpus_dir / "facts.jsonl")
  preds, summaries = {}, {}
  for mode in ("device", "scann"):
    assert main(["evaluate", "--storage", trained, "--questions", facts, "nq-test", "--limit", "16", "--out",
                 str(tmp_path / mode), "--json", "--batch-size", "8", "--retrieval", mode]) == 0
    summaries[mode] = [{k: v for k, v in s.items() if k not in ("seconds", "questions_per_second")}
                       for s in json.loads(capsys.readouterr().out.strip().splitlines()[-1])]
    preds[mode] = [json.loads(line) for name in ("facts", "nq-test")
                   for line in (tmp_path / mode / f"{name}.jsonl").read_text().splitlines()]
  assert summaries["scann"] == summaries["device"]
  assert summaries["scann"][0]["recall@1"] > 0  # the facts questions are answerable
  for key in ("qid", "answer", "block_id", "block_rank", "retrieved", "first_hit_rank", "correct"):
    assert [p[key] for p in preds["scann"]] == [p[key] for p in preds["device"]], key
  for a, b in zip(preds["scann"], preds["device"]):
    assert a["score"] == pytest.approx(b["score"], abs=1e-4)
    assert a["retrieved_scores"] == pytest.approx(b["retrieved_scores"], abs=1e-4)

  # The oracle: query embeddings of the same questions, numpy top-k over the published rows.
  setup = load_for_answering(trained, retrieval="scann")
  assert setup.searcher is not None
  n, cfg = setup.tables.num_blocks, setup.finetuned.config
  db = index_lib.load_index(Storage.open(trained), setup.index.version).embeddings  # the whole version, read again
  assert db.shape[0] == n
  examples = load_questions(facts)[:16] + load_questions("nq-test")[:16]
  assert len(preds["scann"]) == len(examples) > 16
  batch = features.encode_questions(examples, setup.tables.tok, cfg.query_len, with_answers=False)
  setup.finetuned.model.eval()
  q = np.asarray(setup.finetuned.model.retriever.embed_queries(batch["input_ids"], batch["attention_mask"],
                                                               batch["token_type_ids"]), np.float32)
  got = np.array([p["retrieved"] for p in preds["scann"]])
  assert got.shape == (len(examples), n)  # the beam is the whole (small) corpus
  assert_top_k(got, q, db, n, atol=1e-4, scores=np.array([p["retrieved_scores"] for p in preds["scann"]]))

  asked = {}
  for mode in ("device", "scann"):
    assert main(["ask", "Where was Zorblat born?", "--storage", trained, "--top", "2", "--retrieval", mode]) == 0
    asked[mode] = capsys.readouterr().out
  assert asked["scann"] == asked["device"] and asked["scann"].startswith("1. ")


def test_scann_answering_reads_no_embedding_file(trained, monkeypatch):
  """With `--retrieval scann` the index's embeddings stay in storage: the searcher (which keeps
  what it needs) retrieves on the host, so no embedding file is read and none is on the mesh;
  with `--retrieval device` every embedding file is read. Counted by a byte-counting wrapper
  around the real local backend of every storage root opened."""
  from realm_jax.openqa.evaluate import Evaluator
  from realm_jax.openqa.loading import load_for_answering
  from realm_jax.retrieval import index as index_lib
  from tests.helpers.counting_storage import Counting

  opened = []
  real_open = Storage.open.__func__

  def counting_open(cls, uri):
    storage = real_open(cls, uri)
    storage.backend = Counting(storage.backend)
    opened.append(storage.backend)
    return storage

  monkeypatch.setattr(Storage, "open", classmethod(counting_open))
  read = {}
  for mode in ("device", "scann"):
    opened.clear()
    setup = load_for_answering(trained, retrieval=mode)
    evaluator = Evaluator(setup.finetuned.model, setup.finetuned.config, setup.tables, setup.index, setup.mesh,
                          batch_size=4, searcher=setup.searcher)
    assert (evaluator.corpus.embeddings is None) == (setup.searcher is not None) == (mode == "scann")
    assert len(evaluator.answer(load_questions("nq-test")[:4])) == 4
    read[mode] = {k: v for b in opened for k, v in b.read_bytes.items()}
  emb = [k for k in read["device"] if f"/{index_lib.EMB_DIR}/" in k]
  assert emb and sum(read["device"][k] for k in emb) >= setup.tables.num_blocks * 128 * 4
  assert not [k for k in read["scann"] if f"/{index_lib.EMB_DIR}/" in k], read["scann"]


def test_scann_retrieval_refuses_a_version_without_a_searcher(trained, tmp_path, capsys):
  import shutil

  from realm_jax.openqa.loading import load_corpus, load_finetuned
  from realm_jax.retrieval import index as index_lib

  root = str(tmp_path / "copy")
  shutil.copytree(trained, root)
  tuned = load_finetuned(root)
  storage = Storage.open(root)
  tables = load_corpus(storage, tuned.corpus_prefix, tuned.config)
  info = index_lib.build_and_publish_index(storage, tuned.model.retriever.doc_embedder, tables.reader, tuned.config,
                                           step=7, with_scann=False, keep=10)
  assert not info.has_scann and not info.scann_parts
  capsys.readouterr()
  for argv in (["evaluate", "--questions", "nq-test", "--limit", "2"], ["ask", "Where was Zorblat born?"]):
    assert main([*argv, "--storage", root, "--index", info.version, "--retrieval", "scann"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert storage.uri(f"{index_lib.PREFIX}/{info.version}") in err[0] and "no ScaNN searcher" in err[0], err
  assert main(["ask", "Where was Zorblat born?", "--storage", root, "--index", info.version]) == 0  # device: fine
