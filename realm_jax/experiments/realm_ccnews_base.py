"""REALM pre-training with X = CC-News (the paper's second row): masked queries come from a news
corpus (`ccnews/`, built with `realm-jax corpus build --prefix ccnews`), retrieval stays over the
Wikipedia blocks (`corpus/`). Optimisation is identical to realm_wiki_base."""

from realm_jax.train.config import load_config


def get_config():
  return load_config("realm_wiki_base").replace(query_corpus_prefix="ccnews")
