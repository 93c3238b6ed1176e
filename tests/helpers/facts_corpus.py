"""A small corpus of invented facts: each fact about an invented entity is stated in exactly one
block, so the masked entity of a query can only be recovered by retrieving that block."""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np

FIRST = ["Zorblat", "Quendry", "Mavrik", "Tellosa", "Brundig", "Ossiwen", "Pyrrhane", "Kelvaro",
         "Drusilde", "Vantrope", "Emberlyn", "Glaswick", "Hollistar", "Irvandel", "Jostrava", "Kremlow"]
CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo",
          "Athens", "Warsaw", "Budapest", "Brussels", "Helsinki", "Stockholm"]


def write_documents(path: pathlib.Path, n: int = 16, seed: int = 0) -> list[dict]:
  """One JSONL document per invented person; the city of birth appears only there."""
  rng = np.random.default_rng(seed)
  cities = rng.permutation(CITIES)[:n]
  docs = []
  for i in range(n):
    name = FIRST[i]
    text = (f"{name} was born in {cities[i]}. "
            f"{name} worked as a cartographer for many years. "
            f"Later {name} moved to a small village near the coast.")
    docs.append({"title": name, "text": text, "city": str(cities[i])})
  path.write_text("".join(json.dumps({"title": d["title"], "text": d["text"]}) + "\n" for d in docs))
  return docs


# ------------------------------------------------------------------------------------------------
# Two corpora for the REALM learning test: facts to retrieve from, and masked queries about them.

# Cities that are one WordPiece each in the bert-base-uncased vocabulary (MiniLM's), so a masked
# city is one [MASK] that the encoder can copy from a retrieved block.
ONE_PIECE_CITIES = [
    "Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo", "Athens",
    "Warsaw", "Budapest", "Brussels", "Helsinki", "Stockholm", "Tokyo", "Cairo", "Lima", "Moscow", "Delhi",
    "Sydney", "Toronto", "Chicago", "Boston", "Seoul", "Bangkok", "Nairobi", "Havana", "Manila", "Geneva",
    "Milan", "Munich", "Naples", "Venice", "Florence", "Hamburg", "Zurich", "Lyon", "Oxford", "Glasgow",
    "Edinburgh", "Sofia", "Riga", "Kiev", "Beijing", "Shanghai", "Denver", "Dallas", "Houston", "Miami",
    "Seattle", "Phoenix", "Atlanta", "Detroit", "Montreal", "Vancouver", "Mumbai", "Kabul", "Tehran", "Baghdad"]
JOBS = ["cartographer", "baker", "sailor", "painter", "teacher", "miner", "weaver", "potter"]
NAME_FIRST = ["Zor", "Quen", "Mav", "Tel", "Brun", "Oss", "Pyr", "Kel", "Dru", "Van", "Emb", "Glas"]
NAME_MIDDLE = ["bla", "dri", "ro", "vi", "mek", "sun"]
NAME_LAST = ["t", "x", "ndel", "wick", "gar", "phine"]
QUERY_TEMPLATES = ["The hometown of {name} is {city}.", "{name} grew up in {city}."]
FACT_TEMPLATE = "{name} was born in {city}. {name} worked as a {job}."


def invented_names(n: int, seed: int = 7) -> list[str]:
  """`n` distinct invented person names (no real words), in a seeded order."""
  rng = np.random.default_rng(seed)
  names = sorted(a + b + c for a in NAME_FIRST for b in NAME_MIDDLE for c in NAME_LAST)
  if n > len(names):
    raise ValueError(f"at most {len(names)} invented names, asked for {n}")
  return [str(x) for x in rng.permutation(names)[:n]]


class CityTagger:
  """A salient-span tagger that marks only the known cities (the fact to recover)."""

  name = "cities"

  def __init__(self, cities):
    self.pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, cities)) + r")\b")

  def tag_batch(self, sentences):
    return [[m.span() for m in self.pattern.finditer(s)] for s in sentences]


def small_tokenizer():
  """A WordPiece tokenizer over just this corpus' words (~160 tokens): names split into their
  syllables, one piece per city. Models with a small vocabulary train much faster on CPU."""
  from realm_jax.data.tokenizer import WordPieceTokenizer

  letters = "abcdefghijklmnopqrstuvwxyz"
  words = re.findall(r"[a-z]+", " ".join(QUERY_TEMPLATES + [FACT_TEMPLATE]).lower().replace("{name}", "")
                     .replace("{city}", "").replace("{job}", ""))
  pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "'"]
  pieces += sorted(set(words)) + [c.lower() for c in ONE_PIECE_CITIES] + JOBS + [f.lower() for f in NAME_FIRST]
  pieces += [f"##{p}" for p in NAME_MIDDLE + NAME_LAST] + list(letters) + [f"##{c}" for c in letters]
  vocab = list(dict.fromkeys(pieces))
  return WordPieceTokenizer(("\n".join(vocab) + "\n").encode())


def build_fact_corpora(storage, n: int = 48, seed: int = 0, block_len: int = 32, tokenizer="minilm",
                       first_name: int = 0, knowledge_prefix: str = "corpus",
                       query_prefix: str = "queries", city_words: int = 1, queries_in_knowledge: bool = False,
                       distractors: list[dict] = ()) -> list[dict]:
  """Builds two corpora under `storage`: `knowledge_prefix` holds one block per invented person
  ("X was born in CITY. X worked as a JOB."), `query_prefix` one block per person and query
  template, whose only salient span is the city ("The hometown of X is CITY."). Cities are
  distinct up to len(ONE_PIECE_CITIES) people (then drawn with repeats); either way a person's
  city is stated only in that person's block.
  `tokenizer`: "minilm", "small" (`small_tokenizer()`) or a Tokenizer; `first_name`: where in the
  seeded name order the people start (disjoint ranges give disjoint people).
  `city_words` > 1: each hometown is that many one-piece cities ("Paris Lima"), distinct per person
  here, so the masked span is several tokens. `queries_in_knowledge`: the knowledge corpus also
  holds the query sentences (after the facts), with the cities as its only salient spans, so queries
  can be drawn from the corpus they retrieve from. `distractors`: people (as returned by another
  call) whose fact blocks follow in the knowledge corpus, except those sharing a hometown with one
  of these people. Returns the people (`name`, `city`, `job`, `block_id` of the fact,
  `query_block_ids` in the query corpus, `knowledge_query_block_ids` in the knowledge corpus when
  `queries_in_knowledge`)."""
  from realm_jax.data.corpus import build_corpus
  from realm_jax.data.documents import Document

  tok = small_tokenizer() if tokenizer == "small" else tokenizer
  rng = np.random.default_rng(seed)
  names = invented_names(first_name + n)[first_name:]
  if city_words == 1:
    cities = [str(c) for c in (rng.permutation(ONE_PIECE_CITIES)[:n] if n <= len(ONE_PIECE_CITIES)
                                else rng.choice(ONE_PIECE_CITIES, size=n))]
  else:
    cities = []
    while len(cities) < n:  # distinct hometowns, each of distinct cities
      c = " ".join(rng.choice(ONE_PIECE_CITIES, size=city_words, replace=False))
      if c not in cities:
        cities.append(c)
  jobs = [str(j) for j in rng.choice(JOBS, size=n)]
  facts = [Document(nm, FACT_TEMPLATE.format(name=nm, city=c, job=j)) for nm, c, j in zip(names, cities, jobs)]
  queries = [Document(nm, t.format(name=nm, city=c)) for nm, c in zip(names, cities) for t in QUERY_TEMPLATES]
  facts += [Document(p["name"], FACT_TEMPLATE.format(name=p["name"], city=p["city"], job=p["job"]))
            for p in distractors if p["city"] not in set(cities)]
  tagger = CityTagger(sorted(set(cities)))
  if queries_in_knowledge:
    build_corpus(facts + queries, storage, prefix=knowledge_prefix, tokenizer=tok, block_len=block_len,
                 tagger=tagger, title_spans=False)
  else:
    build_corpus(facts, storage, prefix=knowledge_prefix, tokenizer=tok, block_len=block_len)
  build_corpus(queries, storage, prefix=query_prefix, tokenizer=tok, block_len=block_len, tagger=tagger,
               title_spans=False)
  k = len(QUERY_TEMPLATES)
  people = [{"name": nm, "city": c, "job": j, "block_id": i, "query_block_ids": list(range(k * i, k * i + k))}
            for i, (nm, c, j) in enumerate(zip(names, cities, jobs))]
  if queries_in_knowledge:
    for p in people:
      p["knowledge_query_block_ids"] = [len(facts) + i for i in p["query_block_ids"]]
  return people
