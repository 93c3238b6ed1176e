"""How many blocks of the demo's Wikipedia corpus are duplicates (two ids, one text).

The original REALM example generator skips an example whose retrieved candidates hold one
document twice (the uid is a hash of title and body); realm-jax's REALM step does the same on
token rows (`realm_step.duplicate_candidates`). This counts, on the corpus `realm-jax demo` builds
(the Wikipedia excerpt of the gensim wheel, each article's lead as the recipe cuts it), the blocks
whose (title, body text) or whose document-tower token row repeats an earlier block's.

  python benchmarks/duplicate_blocks.py [--recipe full|quick] [--article-chars N]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile

import numpy as np

from realm_jax.data import documents, sources
from realm_jax.data.corpus import CorpusReader, build_corpus
from realm_jax.demo.pipeline import lead
from realm_jax.demo.recipe import RECIPES
from realm_jax.storage import Storage
from realm_jax.train import device_corpus


def count(blocks, rows) -> dict:
  texts = collections.Counter((b.title, b.text) for b in blocks)
  tokens = collections.Counter(r.tobytes() for r in rows)
  return {"blocks": len(blocks),
          "text_duplicates": sum(n - 1 for n in texts.values()),  # blocks repeating an earlier block's text
          "token_row_duplicates": sum(n - 1 for n in tokens.values()),
          "repeated_texts": sum(1 for n in texts.values() if n > 1)}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--recipe", default="full", choices=sorted(RECIPES))
  ap.add_argument("--article-chars", type=int, default=None, help="lead length (default: the recipe's; 0: whole)")
  args = ap.parse_args(argv)
  recipe = RECIPES[args.recipe]()
  chars = recipe.article_chars if args.article_chars is None else args.article_chars
  docs = []
  for doc in documents.read_mediawiki(str(sources.wikipedia_excerpt())):
    docs.append(lead(doc, chars) if chars else doc)
    if recipe.max_articles and len(docs) >= recipe.max_articles:
      break
  with tempfile.TemporaryDirectory() as tmp:
    storage = Storage.open(tmp)
    build_corpus(docs, storage, block_len=recipe.block_len, overwrite=True)
    reader = CorpusReader(storage)
    blocks = list(reader.iter_blocks())
    rows = device_corpus.host_token_rows(blocks, recipe.block_len, reader.tokenizer())
  out = count(blocks, np.asarray(rows))
  print(f"recipe {args.recipe} (articles {len(docs)}, lead {chars or 'whole'} chars, block_len {recipe.block_len}): "
        + ", ".join(f"{k} {v}" for k, v in out.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
