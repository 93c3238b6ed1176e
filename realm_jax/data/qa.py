"""Open-QA question sets (NQ-Open, WebQuestions, CuratedTrec, TriviaQA) and answer matching.

Readers for the DPR-style JSONL form, the NQ-Open TSV form (`question<TAB>['a', 'b']`), and TFDS
`natural_questions_open` / `web_questions` prepared in a data dir; the evaluation functions follow
ORQA's `language/orqa/utils/eval_utils.py` (what REALM's numbers were measured with) and DPR's
`qa_validation.has_answer` (retrieval recall). Details, as checked against those sources:

- `normalize_answer`: Unicode NFD, lowercase, drop ASCII punctuation (`string.punctuation`), drop
  the words a/an/the, collapse whitespace. SQuAD v1.1's script is the same without the NFD step;
  ORQA added NFD, so composed and decomposed accents compare equal ("é" == "e\\u0301"), while
  accented and unaccented letters stay different ("Röntgen" != "Rontgen"), as in ORQA.
- `regex_match` (CuratedTrec EM): ORQA compiles each answer pattern with IGNORECASE | UNICODE |
  MULTILINE and uses `re.match` on the raw prediction: anchored at the start, *not* a full match,
  no normalisation; an invalid pattern never matches. `full_match=True` is the stricter variant.
- `has_answer` (recall@k): DPR NFD-normalises, splits text and answer with its SimpleTokenizer
  (runs of letters/digits/marks, or one other non-space character), lowercases, and looks for the
  answer's tokens as a contiguous run in the text's; regex answers are `re.search`ed in the text.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pathlib
import re
import string
import unicodedata
from typing import Iterable, Literal, Sequence

from realm_jax.data import sources
from realm_jax.errors import RealmError

AnswerType = Literal["text", "regex"]

# Short names of the offline sets (see `sources.QUESTION_FILES`) and their answer kinds.
SHORT_NAMES = tuple(sources.QUESTION_FILES)
REGEX_SETS = ("ct-test",)


class QuestionFileError(RealmError):
  """A question file is malformed: names the file and the 1-based line."""


@dataclasses.dataclass(frozen=True)
class QAExample:
  """One Open-QA question with its reference answers (strings, or regexes for CuratedTrec)."""

  qid: str
  question: str
  answers: list[str]
  answer_type: AnswerType = "text"


# ----------------------------------------------------------------------------------------------
# Reading question files.


def _lines(path: pathlib.Path) -> Iterable[tuple[int, str]]:
  """Yields (1-based line number, text without line ending), decoding UTF-8 strictly per line."""
  try:
    handle = open(path, "rb")
  except OSError as e:
    raise QuestionFileError(f"{path}: cannot open: {e.strerror or e}") from e
  with handle:
    for number, raw in enumerate(handle, start=1):
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise QuestionFileError(
            f"{path}:{number}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
        ) from None
      if number == 1:
        text = text.lstrip("\ufeff")
      yield number, text.rstrip("\r\n")


def _unquote_csv(field: str) -> str:
  """Removes CSV quoting ("..." with "" for ") while the whole field is one quoted value.

  Anserini's TriviaQA topics quote some fields once or twice; a field that merely contains quotes
  (not a well-formed quoted value) is returned unchanged.
  """
  while len(field) >= 2 and field[0] == '"' and field[-1] == '"':
    inner = field[1:-1]
    if '"' in inner.replace('""', ""):
      break
    field = inner.replace('""', '"')
  return field


def _check(path: pathlib.Path, number: int, question: object, answers: object) -> tuple[str, list[str]]:
  """Validates one record's fields, raising an error that names the file and line."""
  if not isinstance(question, str) or not question.strip():
    raise QuestionFileError(f"{path}:{number}: empty or missing question")
  if isinstance(answers, str):
    answers = [answers]
  if not isinstance(answers, list) or not answers:
    raise QuestionFileError(f"{path}:{number}: expected a non-empty list of answers, got {answers!r:.80}")
  if not all(isinstance(a, str) for a in answers):
    raise QuestionFileError(f"{path}:{number}: answers must be strings, got {answers!r:.80}")
  return question.strip(), list(answers)


def _default_type(path: pathlib.Path) -> AnswerType:
  """CuratedTrec's answers are regexes; guessed from the file name when nobody says otherwise."""
  name = path.name.lower()
  return "regex" if "curated" in name or name.startswith("ct-") else "text"


def read_jsonl(path: str | os.PathLike, answer_type: AnswerType | None = None) -> list[QAExample]:
  """Reads DPR-style JSONL: one object per line with `question` and `answer` or `answers`.

  The answer type is `answer_type` if given, else the record's `answer_type` field (as written
  by `realm-jax data questions --out`), else guessed from the file name.
  """
  path = pathlib.Path(path)
  out = []
  for number, line in _lines(path):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise QuestionFileError(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
      raise QuestionFileError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    key = "answers" if "answers" in record else "answer"
    missing = ([] if "question" in record else ["question"]) + ([] if key in record else ["answers"])
    if missing:
      also = " (or 'answer')" if "answers" in missing else ""
      raise QuestionFileError(f"{path}:{number}: missing field(s) {missing}{also}; has {sorted(record)}")
    question, answers = _check(path, number, record["question"], record[key])
    kind = answer_type or record.get("answer_type") or _default_type(path)
    if kind not in ("text", "regex"):
      raise QuestionFileError(f"{path}:{number}: answer_type must be 'text' or 'regex', got {kind!r}")
    qid = str(record.get("id", record.get("qid", f"{path.stem}-{len(out)}")))
    out.append(QAExample(qid, question, answers, kind))
  return out


def read_tsv(path: str | os.PathLike, answer_type: AnswerType | None = None) -> list[QAExample]:
  """Reads the NQ-Open/Anserini TSV form `question<TAB>['a', 'b']` (answers: a Python literal)."""
  path = pathlib.Path(path)
  answer_type = answer_type or _default_type(path)
  out = []
  for number, line in _lines(path):
    if not line.strip():
      continue
    fields = line.split("\t")
    if len(fields) != 2:
      raise QuestionFileError(f"{path}:{number}: expected 2 tab-separated fields "
                              f"(question, answer list), got {len(fields)}")
    question, literal = (_unquote_csv(f) for f in fields)
    try:
      answers = ast.literal_eval(literal.strip())  # literals only: never eval.
    except (ValueError, SyntaxError, MemoryError, RecursionError):
      raise QuestionFileError(f"{path}:{number}: answers are not a Python list literal: {literal!r:.80}") from None
    question, answers = _check(path, number, question, answers)
    out.append(QAExample(f"{path.stem}-{len(out)}", question, answers, answer_type))
  return out


def read_questions(path: str | os.PathLike, answer_type: AnswerType | None = None) -> list[QAExample]:
  """Reads a question file: JSONL (`.jsonl`/`.json`), TSV (`.tsv`/`.csv`), else by its first
  non-blank character (`{` means JSONL; Anserini's `.txt` topics come in both forms).

  `answer_type` defaults to "regex" for files named `*curated*` or `ct-*`, else "text" (JSONL
  records may also carry their own `answer_type`).
  """
  path = pathlib.Path(path)
  if answer_type not in (None, "text", "regex"):
    raise QuestionFileError(f"answer_type must be 'text' or 'regex', got {answer_type!r}")
  first = ""
  for _, line in _lines(path):
    if line.strip():
      first = line.lstrip()[0]
      break
  if not first:
    raise QuestionFileError(f"{path}: no questions (the file is empty)")
  suffix = path.suffix.lower()
  jsonl = suffix in (".jsonl", ".json") or (suffix not in (".tsv", ".csv") and first == "{")
  reader = read_jsonl if jsonl else read_tsv
  return reader(path, answer_type)


def load_questions(name_or_path: str, answer_type: AnswerType | None = None) -> list[QAExample]:
  """Loads a set by short name (nq-test, nq-dev, wq-test, ct-test, trivia-dev, trivia-test), a
  path, or a storage URI (gs://bucket/data/nq-train.jsonl: read once into a local temp file)."""
  if name_or_path in sources.QUESTION_FILES:
    kind = answer_type or ("regex" if name_or_path in REGEX_SETS else "text")
    examples = read_questions(sources.question_file(name_or_path), kind)
    return [dataclasses.replace(e, qid=f"{name_or_path}-{i}") for i, e in enumerate(examples)]
  if "://" in name_or_path and not name_or_path.startswith("file://"):
    return _load_remote_questions(name_or_path, answer_type)
  path = pathlib.Path(name_or_path)
  if not path.exists():
    raise QuestionFileError(f"{name_or_path!r} is neither a known question set "
                            f"({', '.join(SHORT_NAMES)}) nor an existing file")
  return read_questions(path, answer_type)


def _load_remote_questions(uri: str, answer_type: AnswerType | None) -> list[QAExample]:
  import tempfile

  from realm_jax.storage import Storage, StorageError

  parent, _, name = uri.rstrip("/").rpartition("/")
  try:
    data = Storage.open(parent).read_bytes(name)
  except (StorageError, FileNotFoundError) as e:
    raise QuestionFileError(f"{uri!r}: cannot read the question file ({e})") from e
  with tempfile.TemporaryDirectory(prefix="realm-questions-") as tmp:
    local = pathlib.Path(tmp) / name  # keeps the name: the format and answer type follow it
    local.write_bytes(data)
    return read_questions(local, answer_type)


# TFDS builders: name -> (question feature, answers feature).
TFDS_SETS = {"natural_questions_open": ("question", "answer"), "web_questions": ("question", "answers")}


def _tfds_builder_class(name: str):
  """The TFDS builder class of a question set (imported lazily: TFDS is slow to import)."""
  if name == "natural_questions_open":
    from tensorflow_datasets.datasets.natural_questions_open import natural_questions_open_dataset_builder as nq

    return nq.Builder
  from tensorflow_datasets.question_answering.web_questions import WebQuestions

  return WebQuestions


def prepare_tfds(name: str, split_files: dict[str, str | os.PathLike], data_dir: str) -> pathlib.Path:
  """Prepares a TFDS question set in ArrayRecord form from its original files, without downloading.

  TFDS builders fetch their sources from the web, which is not reachable here; this runs the
  real builder (same features, same parsing) on local copies of the original files:
  `natural_questions_open` reads NQ-open JSONL (`question`, `answer` list; splits train/validation),
  `web_questions` the codalab JSON list (`utterance`, `targetValue`, `url`; splits train/test).
  Returns the prepared dataset directory.
  """
  if name not in TFDS_SETS:
    raise QuestionFileError(f"unknown TFDS question set {name!r}; known: {sorted(TFDS_SETS)}")
  files = {split: pathlib.Path(p) for split, p in split_files.items()}
  for split, path in files.items():
    if not path.is_file():
      raise QuestionFileError(f"{path}: no such file (source of TFDS {name}/{split})")
  import tensorflow_datasets as tfds

  base = _tfds_builder_class(name)
  builder_name = name

  class LocalFilesBuilder(base, skip_registration=True):
    """The real builder, reading local files instead of downloading."""

    name = builder_name
    # No checksums file to look up (nothing is downloaded); TFDS 4.9's lookup of it also needs
    # `importlib_resources`, which is not installed on Python >= 3.9.
    code_path = None

    @classmethod
    def _get_pkg_dir_path(cls):
      return base._get_pkg_dir_path()  # metadata (citations, tags) of the real builder.

    def _split_generators(self, dl_manager):
      return [tfds.core.SplitGenerator(name=split, gen_kwargs={"file_path": str(path)})
              for split, path in files.items()]

  builder = LocalFilesBuilder(data_dir=data_dir, file_format="array_record")
  try:
    builder.download_and_prepare()
  except Exception as e:  # the builder's own parse errors: say which files were being read.
    raise QuestionFileError(f"TFDS {name}: preparing from {', '.join(map(str, files.values()))} "
                            f"failed: {type(e).__name__}: {str(e)[:300]}") from None
  return pathlib.Path(str(builder.data_path))


def load_tfds(name: str, split: str, data_dir: str) -> list[QAExample]:
  """Reads a prepared TFDS set (`natural_questions_open` or `web_questions`) from `data_dir`.

  The set must have been prepared in ArrayRecord form (`prepare_tfds`, or `tfds build
  --file_format=array_record` where the web is reachable); reading TFRecord needs TensorFlow.
  """
  if name not in TFDS_SETS:
    raise QuestionFileError(f"unknown TFDS question set {name!r}; known: {sorted(TFDS_SETS)}")
  import tensorflow_datasets as tfds  # heavy import, only when asked for.

  q_key, a_key = TFDS_SETS[name]
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises assorted errors for missing/unprepared data.
    raise QuestionFileError(f"TFDS {name}/{split} is not prepared in ArrayRecord form under "
                            f"{data_dir}: {type(e).__name__}: {str(e)[:300]}") from None

  def text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)

  out = []
  for i in range(len(source)):
    record = source[i]
    answers = record[a_key]
    answers = [text(a) for a in (answers.tolist() if hasattr(answers, "tolist") else answers)]
    where = pathlib.Path(data_dir) / name
    question, answers = _check(where, i + 1, text(record[q_key]), answers)
    out.append(QAExample(f"{name}-{split}-{i}", question, answers, "text"))
  return out


# ----------------------------------------------------------------------------------------------
# Answer matching.

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
  """ORQA's SQuAD normalisation: NFD, lowercase, no punctuation, no articles, single spaces."""
  text = unicodedata.normalize("NFD", text).lower()
  text = "".join(ch for ch in text if ch not in _PUNCT)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
  """True if the normalised prediction equals any normalised reference answer."""
  pred = normalize_answer(prediction)
  return any(pred == normalize_answer(a) for a in answers)


def _compile(pattern: str) -> re.Pattern | None:
  try:
    return re.compile(pattern, flags=re.IGNORECASE | re.UNICODE | re.MULTILINE)
  except (re.error, RecursionError, OverflowError):
    return None


def regex_match(prediction: str, patterns: Sequence[str], full_match: bool = False) -> bool:
  """CuratedTrec EM as ORQA: any pattern matches at the start of the prediction (case-insensitive).

  With `full_match=True` the pattern must cover the whole prediction.
  """
  for pattern in patterns:
    compiled = _compile(pattern)
    if compiled is None:
      continue
    found = compiled.fullmatch(prediction) if full_match else compiled.match(prediction)
    if found is not None:
      return True
  return False


def _is_word_char(ch: str) -> bool:
  return unicodedata.category(ch)[0] in "LNM"


def simple_tokenize(text: str) -> list[str]:
  """DPR's SimpleTokenizer, lowercased: runs of letters/digits/marks, or single other non-space chars.

  Equivalent to `regex` pattern `[\\p{L}\\p{N}\\p{M}]+|[^\\p{Z}\\p{C}]` without the `regex` package.
  """
  tokens: list[str] = []
  word: list[str] = []
  for ch in text:
    if _is_word_char(ch):
      word.append(ch)
      continue
    if word:
      tokens.append("".join(word))
      word = []
    if unicodedata.category(ch)[0] not in "ZC":
      tokens.append(ch)
  if word:
    tokens.append("".join(word))
  return [t.lower() for t in tokens]


def has_answer(text: str, answers: Sequence[str], answer_type: AnswerType = "text") -> bool:
  """DPR's retrieval-recall test: does `text` (e.g. a block) contain one of the answers?"""
  text = unicodedata.normalize("NFD", text)
  if answer_type == "regex":
    for pattern in answers:
      compiled = _compile(unicodedata.normalize("NFD", pattern))
      if compiled is not None and compiled.search(text) is not None:
        return True
    return False
  if answer_type != "text":
    raise ValueError(f"answer_type must be 'text' or 'regex', got {answer_type!r}")
  words = simple_tokenize(text)
  for answer in answers:
    target = simple_tokenize(unicodedata.normalize("NFD", answer))
    if not target:
      continue
    n = len(target)
    first = target[0]
    for i in range(len(words) - n + 1):
      if words[i] == first and words[i:i + n] == target:
        return True
  return False


def score(prediction: str, example: QAExample) -> bool:
  """Exact match of one prediction for one example (regex sets use `regex_match`)."""
  if example.answer_type == "regex":
    return regex_match(prediction, example.answers)
  return exact_match(prediction, example.answers)
