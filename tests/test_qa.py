"""Open-QA sets from the real pyserini files, ORQA/DPR answer matching, and bad-input errors."""

import argparse
import json

import pytest
import regex  # the `regex` package: DPR's own tokenizer pattern is the oracle for ours.

from realm_jax.cli import data as data_cli
from realm_jax.data import qa
from realm_jax.errors import RealmError

# ------------------------------------------------------------------------------------------------
# The real question sets.


@pytest.mark.parametrize("name, count, kind", [
    ("nq-test", 3610, "text"), ("wq-test", 2032, "text"), ("ct-test", 694, "regex"),
    ("nq-dev", 8757, "text"), ("trivia-dev", 8837, "text"), ("trivia-test", 11313, "text"),
])
def test_real_sets_load_with_published_sizes(name, count, kind):
  examples = qa.load_questions(name)
  assert len(examples) == count
  assert {e.answer_type for e in examples} == {kind}
  assert len({e.qid for e in examples}) == count
  assert all(e.question.strip() == e.question and e.question for e in examples)
  assert all(e.answers and all(isinstance(a, str) for a in e.answers) for e in examples)
  # No CSV quoting left over: a question wrapped in quotes with doubled quotes inside.
  assert not [e.question for e in examples
              if e.question.startswith('"') and e.question.endswith('"') and '""' in e.question]


def test_real_records_parse_as_written():
  nq = qa.load_questions("nq-test")
  assert nq[0].question == "who got the first nobel prize in physics"
  assert nq[0].answers == ["Wilhelm Conrad Röntgen"]
  trivia = {e.question: e.answers for e in qa.load_questions("trivia-dev")}
  # Anserini quotes this line twice: `"""What was the name of the """"girl ...`.
  assert trivia['What was the name of the "girl with kaleidoscope eyes" in a Beatles song?'] == [
      "Lucy Lucia", "Lucy", "LUCY"]
  # A CSV-quoted answer list with doubled quotes inside.
  assert "Gentleman's sport" in trivia["Ezzard Charles was a world champion in which sport?"]
  ct = qa.load_questions("ct-test")
  assert all(qa._compile(p) is not None for e in ct for p in e.answers)


# ------------------------------------------------------------------------------------------------
# Exact match / regex match / has_answer.


@pytest.mark.parametrize("prediction, answer, expected", [
    ("The Beatles", "beatles", True),            # article + case
    ("Beatles!", "the beatles", True),           # punctuation
    ("an apple", "apple", True),
    ("a", "", True),                             # only an article: both normalise to ""
    ("theater", "ater", False),                  # articles only as whole words
    ("U.S.A.", "usa", True),                     # punctuation dropped without a space
    ("rock-n-roll", "rocknroll", True),
    ("  New   York ", "new york", True),         # whitespace
    ("Cafe\u0301", "Café", True),                # NFD: decomposed == composed
    ("Cafe", "Café", False),                     # ...but accents are kept (as ORQA)
    ("RÖNTGEN", "röntgen", True),                # unicode lowercase
    ("\u201cHamlet\u201d", "hamlet", False),     # only ASCII punctuation is removed (SQuAD)
    ("Paris, France", "Paris", False),
])
def test_exact_match_hand_checked(prediction, answer, expected):
  assert qa.exact_match(prediction, [answer]) is expected


def test_normalize_answer():
  assert qa.normalize_answer("The  Quick, Brown FOX!") == "quick brown fox"
  assert qa.normalize_answer("A Tale of Two Cities") == "tale of two cities"
  assert qa.exact_match("x", ["y", "the X."]) and not qa.exact_match("x", [])


MCKINLEY = qa.load_questions("ct-test")[0].answers  # "How tall is Mount McKinley?"


@pytest.mark.parametrize("prediction, patterns, expected", [
    ("after the fall", ["After the Fall|Finishing the Play"], True),   # case-insensitive
    ("FINISHING THE PLAY", ["After the Fall|Finishing the Play"], True),  # second alternative
    ("The Fall", ["After the Fall|Finishing the Play"], False),
    ("20,320 feet", MCKINLEY, True),
    ("20 320 foot", MCKINLEY, True),
    ("6,194-meter", MCKINLEY, True),
    ("20320 ft", MCKINLEY, False),
    ("China", ["China"], True),
    ("the China", ["China"], False),             # ORQA uses re.match: anchored at the start
    ("Chinatown", ["China"], True),              # ...but not at the end
    ("x", ["(unclosed"], False),                 # an invalid pattern never matches
    ("x", ["(unclosed", "X"], True),
])
def test_regex_match_hand_checked(prediction, patterns, expected):
  assert qa.regex_match(prediction, patterns) is expected


def test_regex_full_match_variant():
  assert not qa.regex_match("Chinatown", ["China"], full_match=True)
  assert qa.regex_match("china", ["China|Japan"], full_match=True)


def test_score_dispatches_on_answer_type():
  ct = qa.QAExample("q", "?", ["Chin(a|ese)"], "regex")
  assert qa.score("Chinese", ct) and not qa.score("Chin", ct)
  assert qa.score("the chin", qa.QAExample("q", "?", ["Chin"], "text"))


def test_has_answer_is_token_matching_as_dpr():
  text = "Wilhelm Conrad Röntgen won the first Nobel Prize in Physics in 1901 for the U.S. army."
  assert qa.has_answer(text, ["wilhelm conrad röntgen"])
  assert qa.has_answer(text, ["Wilhelm Conrad Ro\u0308ntgen"])  # decomposed answer
  assert qa.has_answer(text, ["nope", "Nobel Prize"])
  assert qa.has_answer(text, ["U.S."])
  assert not qa.has_answer(text, ["Röntgen won the second"])
  assert not qa.has_answer("The Röntgenstrahlen were named", ["Röntgen"])  # tokens, not substrings
  assert not qa.has_answer("a New Yorker cartoon", ["New York"])
  assert not qa.has_answer(text, [""])


def test_has_answer_regex_searches_the_block():
  block = "Denali, formerly Mount McKinley, rises to 20,310 feet; older surveys said 20,320 feet."
  assert qa.has_answer(block, MCKINLEY, "regex")
  assert not qa.has_answer("It is very tall.", MCKINLEY, "regex")


def test_simple_tokenize_matches_dpr_regex_on_real_unicode_answers():
  dpr = regex.compile(r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])",
                      flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)
  strings = [a for e in qa.load_questions("trivia-dev")[:3000] for a in e.answers]
  strings += ["Ro\u0308ntgen's 1901\tprize\u00a0— «x»", "Михаил Горбачёв", "拳闘 🚁 x\u200by"]
  mismatches = []
  for s in strings:
    expected = [m.group().lower() for m in dpr.finditer(s)]
    if qa.simple_tokenize(s) != expected:
      mismatches.append(s)
  assert len(strings) > 30000 and not mismatches[:5]


# ------------------------------------------------------------------------------------------------
# Bad input.


def _write(tmp_path, name, content: bytes):
  path = tmp_path / name
  path.write_bytes(content)
  return path


@pytest.mark.parametrize("name, content, where, what", [
    ("a.jsonl", b'{"question": "q1", "answer": ["a"]}\n{"question": "q2", "answer": [\n', ":2:", "invalid JSON"),
    ("b.jsonl", b'{"question": "q1", "answers": ["a"]}\n{"question": "q2"}\n', ":2:", "missing field"),
    ("c.jsonl", b'{"answer": ["a"]}\n', ":1:", "['question']"),
    ("d.jsonl", b'{"question": "  ", "answer": ["a"]}\n', ":1:", "empty or missing question"),
    ("e.jsonl", b'{"question": "q", "answer": []}\n', ":1:", "non-empty list"),
    ("f.jsonl", b'{"question": "q", "answer": [3]}\n', ":1:", "must be strings"),
    ("g.jsonl", b'["q", ["a"]]\n', ":1:", "JSON object"),
    ("h.tsv", b"q1\t['a']\nq2\t['b']\nq3 \xff\xfe\t['c']\n", ":3:", "not valid UTF-8"),
    ("i.tsv", b"q1\t['a']\n\t['b']\n", ":2:", "empty or missing question"),
    ("j.tsv", b"q1\t['a']\nq2 ['b']\n", ":2:", "2 tab-separated fields"),
    ("k.tsv", b"q1\tnot a list\n", ":1:", "list literal"),
    ("l.tsv", b"q1\t[]\n", ":1:", "non-empty list"),
])
def test_bad_files_name_file_and_line(tmp_path, name, content, where, what):
  path = _write(tmp_path, name, content)
  with pytest.raises(qa.QuestionFileError) as err:
    qa.load_questions(str(path))
  message = str(err.value)
  assert f"{path}{where}" in message and what in message
  assert isinstance(err.value, RealmError)


def test_answer_literal_is_never_evaluated(tmp_path):
  marker = tmp_path / "pwned"
  path = _write(tmp_path, "evil.tsv", f"q\t__import__('pathlib').Path('{marker}').touch()\n".encode())
  with pytest.raises(qa.QuestionFileError, match="list literal"):
    qa.read_tsv(path)
  assert not marker.exists()


def test_empty_and_missing_files(tmp_path):
  empty = _write(tmp_path, "empty.jsonl", b"\n\n")
  with pytest.raises(qa.QuestionFileError, match="empty"):
    qa.load_questions(str(empty))
  with pytest.raises(qa.QuestionFileError, match="neither a known question set"):
    qa.load_questions(str(tmp_path / "nope.tsv"))


def test_dpr_jsonl_and_tsv_forms_agree(tmp_path):
  lines = [("who wrote hamlet", ["Shakespeare", "W. Shakespeare"]), ('the "x" factor?', ["it's"])]
  jsonl = tmp_path / "q.jsonl"
  jsonl.write_text("".join(json.dumps({"question": q, "answers": a}) + "\n" for q, a in lines))
  tsv = tmp_path / "q.tsv"
  tsv.write_text("\ufeff" + "".join(f"{q}\t{a!r}\r\n" for q, a in lines), encoding="utf-8")
  got_j = [(e.question, e.answers) for e in qa.load_questions(str(jsonl))]
  got_t = [(e.question, e.answers) for e in qa.load_questions(str(tsv))]
  assert got_j == got_t == lines


# ------------------------------------------------------------------------------------------------
# CLI and TFDS.


def test_cli_questions_writes_jsonl_that_reloads(tmp_path, capsys):
  parser = argparse.ArgumentParser()
  data_cli.register(parser.add_subparsers(dest="command"))
  args = parser.parse_args(["data", "questions", "--sets", "ct-test", "wq-test", "--out", str(tmp_path)])
  assert args.func(args) == 0
  out = capsys.readouterr().out
  assert "ct-test" in out and "694" in out and "2,032" in out
  for name in ("ct-test", "wq-test"):
    assert qa.load_questions(str(tmp_path / f"{name}.jsonl")) == qa.load_questions(name)
  bad = parser.parse_args(["data", "questions", "--sets", "nq-train"])
  with pytest.raises(RealmError, match="nq-train"):
    bad.func(bad)


def test_tfds_sets_prepared_from_local_files_read_back(tmp_path):
  nq = qa.load_questions("nq-dev")[:25]
  nq_file = tmp_path / "NQ-open.dev.jsonl"
  nq_file.write_text("".join(json.dumps({"question": e.question, "answer": e.answers}) + "\n" for e in nq))
  wq = [e for e in qa.load_questions("wq-test")[:40] if not any('"' in a for a in e.answers)][:25]
  wq_file = tmp_path / "webquestions.test.json"
  wq_file.write_text(json.dumps([
      {"url": f"http://www.freebase.com/view/en/x{i}", "utterance": e.question,
       "targetValue": "(list " + " ".join(f'(description "{a}")' for a in e.answers) + ")"}
      for i, e in enumerate(wq)]))
  data_dir = str(tmp_path / "tfds")
  qa.prepare_tfds("natural_questions_open", {"validation": nq_file}, data_dir)
  qa.prepare_tfds("web_questions", {"test": wq_file}, data_dir)
  got_nq = qa.load_tfds("natural_questions_open", "validation", data_dir)
  got_wq = qa.load_tfds("web_questions", "test", data_dir)
  assert sorted((e.question, e.answers) for e in got_nq) == sorted((e.question, e.answers) for e in nq)
  assert sorted((e.question, e.answers) for e in got_wq) == sorted((e.question, e.answers) for e in wq)
  with pytest.raises(qa.QuestionFileError, match="not prepared"):
    qa.load_tfds("web_questions", "train", data_dir)


def test_cli_fetch_reports_extracted_files(capsys):
  parser = argparse.ArgumentParser()
  data_cli.register(parser.add_subparsers(dest="command"))
  args = parser.parse_args(["data", "fetch"])
  assert args.func(args) == 0
  lines = capsys.readouterr().out.splitlines()
  paths = [line.rsplit(": ", 1)[1] for line in lines]
  assert len(paths) == 2 + len(qa.SHORT_NAMES)
  import pathlib
  assert all(pathlib.Path(p).exists() for p in paths)
  assert (pathlib.Path(paths[1]) / "vocab.txt").is_file()
