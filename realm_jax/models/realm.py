"""Top-level REALM models: the pre-training model (retriever + knowledge-augmented encoder) and
the Open-QA model (retriever + span reader). Both keep the retriever under `.retriever`, so a
pre-trained checkpoint's retriever initialises the Open-QA model directly."""

from __future__ import annotations

from flax import nnx

from realm_jax.config import RealmConfig
from realm_jax.models.encoder import KnowledgeAugEncoder
from realm_jax.models.reader import SpanReader
from realm_jax.models.retriever import Retriever


class RealmModel(nnx.Module):
  """What REALM pre-training trains: both retriever towers and the encoder."""

  def __init__(self, cfg: RealmConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.retriever = Retriever(cfg, rngs=rngs)
    self.encoder = KnowledgeAugEncoder(cfg, rngs=rngs)


class OpenQAModel(nnx.Module):
  """What Open-QA fine-tuning trains: the query tower and the reader (document index frozen)."""

  def __init__(self, cfg: RealmConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.retriever = Retriever(cfg, rngs=rngs)
    self.reader = SpanReader(cfg, rngs=rngs)
