"""Document readers: JSONL, plain text and MediaWiki XML dumps, streamed one document at a time.

Formats (chosen by file name):
- `*.jsonl`, `*.json`: one JSON object per line with string fields `title` and `text`.
- `*.txt`: documents separated by one or more blank lines; the first line of each group is the
  title and the following lines are the text (lines joined with newlines).
- `*.xml`, `*.xml.bz2`, `*.bz2`: a MediaWiki export; articles only (namespace 0), redirects,
  `List of ...` and `... (disambiguation)` pages skipped, markup stripped with mwparserfromhell.
Inputs may be local paths or fsspec URLs (`gs://...`); `.gz`/`.bz2` are decompressed on the fly.
Bad input raises `DocumentError` naming the file and the line or record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import xml.etree.ElementTree as ET
from typing import Iterable, Iterator

import fsspec

from realm_jax.errors import RealmError

_SKIP_LINK_PREFIXES = ("category:", "file:", "image:", "media:")
_INTERWIKI = re.compile(r"^[a-z]{2,3}(-[a-z]+)?:")
_OPEN_SEPARATORS = re.compile(r"\(\s*(?:[,;:]\s*)*")
_CLOSE_SEPARATORS = re.compile(r"(?:\s*[,;:])*\s*\)")
_EMPTY_PARENS = re.compile(r"\s?\(\s*\)")
_SPACES = re.compile(r"[ \t\u00a0]{2,}")  # runs left where templates were removed
_REFS = re.compile(r"<ref\b[^>/]*/>|<ref\b[^>]*>.*?</ref\s*>", re.DOTALL | re.IGNORECASE)


class DocumentError(RealmError):
  """An input document file is malformed or empty."""


@dataclasses.dataclass
class Document:
  """One article: its title, its plain text, and where it came from (`file:line`)."""

  title: str
  text: str
  source: str = ""


def _open(path: str):
  try:
    return fsspec.open(path, "rb", compression="infer").open()
  except FileNotFoundError as e:
    raise DocumentError(f"{path}: no such file") from e
  except OSError as e:
    raise DocumentError(f"{path}: cannot open: {e}") from e


@contextlib.contextmanager
def _reading(path: str):
  """Errors of the file itself while it is read (a truncated or damaged .bz2/.gz, a disk error)
  as one DocumentError naming it."""
  try:
    yield
  except DocumentError:
    raise
  except (OSError, EOFError) as e:
    kind = next((s for s in (".bz2", ".gz", ".xz") if path.lower().endswith(s)), "")
    hint = f"; a truncated or damaged {kind} file?" if kind else ""
    raise DocumentError(f"{path}: cannot read it ({e}{hint})") from None


def _decode_line(raw: bytes, path: str, lineno: int) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DocumentError(
        f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from e


def read_jsonl(path: str) -> Iterator[Document]:
  """Documents of a JSONL file: one `{"title": str, "text": str}` object per line."""
  with _open(path) as f, _reading(path):
    for lineno, raw in enumerate(f, 1):
      line = _decode_line(raw, path, lineno).strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DocumentError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
      if not isinstance(record, dict):
        raise DocumentError(f"{path}:{lineno}: expected a JSON object with 'title' and 'text', "
                            f"got {type(record).__name__}")
      for field in ("title", "text"):
        if field not in record:
          raise DocumentError(f"{path}:{lineno}: missing field {field!r} (expected 'title' and 'text')")
        if not isinstance(record[field], str):
          raise DocumentError(f"{path}:{lineno}: field {field!r} must be a string, "
                              f"got {type(record[field]).__name__}")
      yield Document(record["title"].strip(), record["text"], f"{path}:{lineno}")


def read_text(path: str) -> Iterator[Document]:
  """Documents of a text file: blank-line-separated groups, first line = title."""
  group: list[str] = []
  start = 0

  def flush():
    title, body = group[0].strip(), "\n".join(group[1:])
    return Document(title, body, f"{path}:{start}")

  with _open(path) as f, _reading(path):
    for lineno, raw in enumerate(f, 1):
      line = _decode_line(raw, path, lineno).rstrip("\r\n")
      if line.strip():
        if not group:
          start = lineno
        group.append(line)
      elif group:
        yield flush()
        group = []
    if group:
      yield flush()


def is_skipped_title(title: str) -> bool:
  """Pages REALM/ORQA leave out of the corpus: lists and disambiguation pages."""
  return title.startswith("List of ") or title.endswith("(disambiguation)")


def _tidy_parentheses(line: str) -> str:
  """"Achilles (; , Akhilleus, ) was" -> "Achilles (Akhilleus) was": removed templates (IPA,
  language tags) leave separators behind; parentheses left empty go entirely."""
  line = _OPEN_SEPARATORS.sub("(", line)
  line = _CLOSE_SEPARATORS.sub(")", line)
  return _EMPTY_PARENS.sub("", line)


def strip_wikitext(wikitext: str) -> str:
  """Plain text of an article: markup, references, categories, files and interwiki links removed."""
  import mwparserfromhell

  wikitext = _REFS.sub("", wikitext)
  code = mwparserfromhell.parse(wikitext)
  for link in code.filter_wikilinks(recursive=True):
    target = str(link.title).strip().lower().lstrip(":")
    if target.startswith(_SKIP_LINK_PREFIXES) or _INTERWIKI.match(target):
      link.title, link.text = "", None  # in place: `code.remove` is quadratic on big pages.
  text = code.strip_code(normalize=True, collapse=True)
  lines = (_SPACES.sub(" ", _tidy_parentheses(line)).strip() for line in text.split("\n"))
  # Rows of tables whose markup did not parse ("| bgcolor=lime | W") are not prose.
  return "\n".join(line for line in lines if line and not line.startswith(("|", "!", "{|")))


def _raw_pages(path: str) -> Iterator[tuple[str, str, str]]:
  """(title, wikitext, source) of the article pages of a dump, streamed with iterparse."""
  with _open(path) as f, _reading(path):
    context = ET.iterparse(f, events=("start", "end"))
    root = None
    try:
      for event, elem in context:
        if root is None and event == "start":
          root = elem
        if event != "end" or not elem.tag.endswith("}page") and elem.tag != "page":
          continue
        title = (elem.findtext("{*}title") or "").strip()
        ns = (elem.findtext("{*}ns") or "0").strip()
        redirect = elem.find("{*}redirect") is not None
        wikitext = elem.findtext("{*}revision/{*}text") or ""
        page_id = (elem.findtext("{*}id") or "?").strip()
        elem.clear()
        if root is not None:
          root.clear()  # drop the cleared pages the root still references.
        if ns != "0" or redirect or not title or is_skipped_title(title):
          continue
        if wikitext.lstrip().lower().startswith("#redirect"):
          continue
        yield title, wikitext, f"{path}:page {page_id}"
    except ET.ParseError as e:
      line, col = e.position
      raise DocumentError(f"{path}:{line}: invalid XML (column {col}): {e}") from e


def _strip_page(page: tuple[str, str, str]) -> Document:
  title, wikitext, source = page
  return Document(title, strip_wikitext(wikitext), source)


def read_mediawiki(path: str, workers: int = 1, window: int = 256) -> Iterator[Document]:
  """Articles of a MediaWiki XML export, streamed (memory stays bounded), in dump order.

  Stripping markup costs far more than parsing XML, so with `workers` > 1 pages are stripped
  by that many processes, `window` pages at a time (bounded memory, same output).
  """
  pages = _raw_pages(path)
  if workers <= 1:
    yield from map(_strip_page, pages)
    return
  import concurrent.futures
  import itertools
  import multiprocessing

  ctx = multiprocessing.get_context("spawn")  # no fork: the parent may hold threads (tokenizers, JAX).
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    while batch := list(itertools.islice(pages, window)):
      yield from pool.map(_strip_page, batch, chunksize=max(1, len(batch) // (4 * workers)))


def reader_for(path: str):
  """The reader function for a file name (see the module docstring)."""
  name = path.lower()
  for suffix in (".gz", ".bz2", ".xz"):
    inner = name[: -len(suffix)]
    if name.endswith(suffix) and not name.endswith(".xml" + suffix) and inner.endswith((".jsonl", ".json", ".txt")):
      name = name[: -len(suffix)]
  if name.endswith((".jsonl", ".json")):
    return read_jsonl
  if name.endswith(".txt"):
    return read_text
  if name.endswith((".xml", ".xml.bz2", ".bz2", ".xml.gz")):
    return read_mediawiki
  raise DocumentError(f"{path}: unknown document format; expected .jsonl/.json, .txt, .xml or .xml.bz2")


def read_documents(inputs: Iterable[str | Document], workers: int = 1) -> Iterator[Document]:
  """All documents of all input files (or `Document`s given directly), in order, those without
  text left out; raises if none has any text (an empty corpus). `workers`: processes that strip
  MediaWiki markup."""
  inputs = list(inputs)
  if not inputs:
    raise DocumentError("no input files given")
  readers = [None if isinstance(p, Document) else reader_for(str(p)) for p in inputs]  # fail early
  count = 0
  for item, read in zip(inputs, readers):
    if read is None:
      docs = [item]
    else:
      docs = read_mediawiki(str(item), workers) if read is read_mediawiki else read(str(item))
    for doc in docs:
      if doc.text.strip():
        count += 1
        yield doc
  if count == 0:
    names = sorted({str(p) for p in inputs if not isinstance(p, Document)}) or ["the documents given"]
    raise DocumentError(f"empty corpus: no document with text in {', '.join(names)}")
