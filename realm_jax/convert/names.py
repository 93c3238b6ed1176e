"""Parameter-name mapping between our NNX modules and BERT-style checkpoints (HF and TF).

Our parameter paths are tuples such as `('bert', 'layers', 3, 'attention', 'query', 'kernel')`.
`bert_name` maps the part below a `BertEncoder` to the HuggingFace dotted name; `to_hf` and
`to_tf` spell names for each ecosystem. The reverse direction (export) uses the same table.
"""

from __future__ import annotations

import re

from realm_jax.errors import RealmError


class ConversionError(RealmError):
  """A checkpoint does not match the target model (missing, unexpected or mis-shaped weights)."""


# What each converter reads or writes (jax-free, so `realm-jax --help` can list them cheaply).
TF_KINDS = ("embedder", "scorer", "encoder", "orqa", "realm")  # `convert tf --kind`
HF_KINDS = ("embedder", "scorer", "encoder", "reader", "orqa", "bert")  # `convert hf --kind`
EXPORT_KINDS = ("embedder", "scorer", "encoder", "reader", "orqa", "realm")  # `export hf --kind`


# Our leaf name -> HF leaf name, per module kind.
_LINEAR = {"kernel": "weight", "bias": "bias"}
_NORM = {"scale": "weight", "bias": "bias"}
_EMBED = {"embedding": "weight"}

_LAYER_PARTS = {
    ("attention", "query"): ("attention.self.query", _LINEAR),
    ("attention", "key"): ("attention.self.key", _LINEAR),
    ("attention", "value"): ("attention.self.value", _LINEAR),
    ("attention", "output"): ("attention.output.dense", _LINEAR),
    ("attention_norm",): ("attention.output.LayerNorm", _NORM),
    ("intermediate",): ("intermediate.dense", _LINEAR),
    ("output",): ("output.dense", _LINEAR),
    ("output_norm",): ("output.LayerNorm", _NORM),
}


def _leaf(table: dict[str, str], leaf: str, path) -> str:
  if leaf not in table:
    raise ConversionError(f"no checkpoint name for parameter {'/'.join(map(str, path))}")
  return table[leaf]


def bert_name(path: tuple) -> tuple[str, bool]:
  """Path inside a BertEncoder -> (HF dotted name, whether the array is a transposed kernel)."""
  head, leaf = path[:-1], path[-1]
  if head and head[0] == "embeddings":
    if head[1] == "layer_norm":
      return f"embeddings.LayerNorm.{_leaf(_NORM, leaf, path)}", False
    return f"embeddings.{head[1]}.{_leaf(_EMBED, leaf, path)}", False
  if head and head[0] == "layers":
    layer, part = head[1], tuple(head[2:])
    if part not in _LAYER_PARTS:
      raise ConversionError(f"no checkpoint name for parameter {'/'.join(map(str, path))}")
    name, table = _LAYER_PARTS[part]
    hf_leaf = _leaf(table, leaf, path)
    return f"encoder.layer.{layer}.{name}.{hf_leaf}", leaf == "kernel"
  if head == ("pooler",):
    return f"pooler.dense.{_leaf(_LINEAR, leaf, path)}", leaf == "kernel"
  raise ConversionError(f"no checkpoint name for parameter {'/'.join(map(str, path))}")


def dense_name(leaf: str, kind: str, path) -> tuple[str, bool]:
  """Leaf of a Linear (`kind='linear'`) or LayerNorm (`kind='norm'`) -> (HF leaf, transposed)."""
  table = _LINEAR if kind == "linear" else _NORM
  return _leaf(table, leaf, path), (kind == "linear" and leaf == "kernel")


# Legacy HF/TF spellings accepted on import.
_LEGACY = [(re.compile(r"LayerNorm\.gamma$"), "LayerNorm.weight"), (re.compile(r"LayerNorm\.beta$"), "LayerNorm.bias")]


def normalise_hf_key(key: str) -> str:
  for pattern, repl in _LEGACY:
    key = pattern.sub(repl, key)
  return key


def hf_to_tf(hf_name: str) -> str:
  """HF dotted BERT name -> TF variable name (`encoder.layer.0.x.weight` -> `encoder/layer_0/x/kernel`)."""
  name = re.sub(r"encoder\.layer\.(\d+)\.", r"encoder.layer_\1.", hf_name)
  parts = name.split(".")
  leaf = parts[-1]
  stem = parts[:-1]
  if stem and stem[-1] == "LayerNorm":
    leaf = {"weight": "gamma", "bias": "beta"}[leaf]
  elif stem and stem[-1].endswith("_embeddings"):
    return "/".join(stem)
  else:
    leaf = {"weight": "kernel", "bias": "bias"}.get(leaf, leaf)
  return "/".join(stem + [leaf])
