"""Sentence splitting for corpus building: lines, then `.`, `!` or `?` before a capital letter,
except after abbreviations and initials. Pure Python; spans are character offsets."""

from __future__ import annotations

import re

_ABBREVIATIONS = frozenset("""
mr mrs ms dr prof st sr jr mt ft no nos vol vols fig figs pp p ed eds rev gen col lt sgt capt
cmdr adm gov sen rep pres inc ltd co corp bros dept univ est approx ca cf vs etc al e.g i.e viz
jan feb mar apr jun jul aug sep sept oct nov dec
""".split())
_BOUNDARY = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s+[\"'“‘(\[]?[A-Z0-9À-Þ])")


def _is_abbreviation(chunk: str, start: int, m: re.Match) -> bool:
  """True if the "." ending at `m` closes an abbreviation or an initial, not a sentence."""
  if m.group() != ".":
    return False
  before = chunk[start:m.start()].split()
  if not before:
    return True
  prev = before[-1].lstrip("\"'“‘([").lower()
  return (prev in _ABBREVIATIONS or (len(prev) == 1 and prev.isalpha())
          or re.fullmatch(r"(?:\w\.)+\w", prev) is not None)


def split_sentences(text: str) -> list[tuple[int, int]]:
  """(start, end) char spans of the sentences of `text`: lines, then ., ! or ? before a capital.

  Spans never include surrounding whitespace, and every non-space character lies in one span.
  Abbreviations (Dr., e.g., St.) and initials (J. R. R.) do not end a sentence.
  """
  spans = []
  for line in re.finditer(r"[^\n]+", text):
    base, chunk = line.start(), line.group()
    start = 0
    for m in _BOUNDARY.finditer(chunk):
      if _is_abbreviation(chunk, start, m):
        continue
      spans.append((base + start, base + m.end()))
      start = m.end()
    spans.append((base + start, base + len(chunk)))
  out = []
  for s, e in spans:
    while s < e and text[s].isspace():
      s += 1
    while e > s and text[e - 1].isspace():
      e -= 1
    if e > s:
      out.append((s, e))
  return out
