"""A small corpus of invented facts: each fact about an invented entity is stated in exactly one
block, so the masked entity of a query can only be recovered by retrieving that block."""

from __future__ import annotations

import json
import pathlib

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
