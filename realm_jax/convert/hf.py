"""Load HuggingFace PyTorch weights (BertModel, and the Realm* modules of transformers 4.40.2).

Works on plain `{name: array}` state dicts (torch tensors or numpy), so it needs neither torch nor
transformers unless reading a `pytorch_model.bin`. Loading is strict: every parameter of the target
module must be found with the right shape, and every source weight must be used or deliberately
skipped (pooler of the encoder, tied MLM decoder, optimizer state); anything else is an error that
names it.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Iterable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from realm_jax.config import BertConfig, RealmConfig
from realm_jax.convert.names import ConversionError, bert_name, dense_name, normalise_hf_key

# A rule maps our sub-module prefix to a source-name prefix; kind says how names below it are spelt.
Rule = tuple[tuple, str, str]  # (our path prefix, source prefix, "bert" | "linear" | "norm" | "param")


def embedder_rules(prefix: str = "") -> list[Rule]:
  """Our RetrieverEmbedder <- HF RealmEmbedder (`realm.*`, `cls.dense`, `cls.LayerNorm`)."""
  return [(("bert",), prefix + "realm.", "bert"),
          (("projection",), prefix + "cls.dense.", "linear"),
          (("projection_norm",), prefix + "cls.LayerNorm.", "norm")]


def encoder_rules(prefix: str = "") -> list[Rule]:
  """Our KnowledgeAugEncoder <- HF RealmKnowledgeAugEncoder (`realm.*`, `cls.predictions.*`)."""
  return [(("bert",), prefix + "realm.", "bert"),
          (("mlm", "transform"), prefix + "cls.predictions.transform.dense.", "linear"),
          (("mlm", "transform_norm"), prefix + "cls.predictions.transform.LayerNorm.", "norm"),
          (("mlm", "output_bias"), prefix + "cls.predictions.bias", "param")]


def reader_rules(prefix: str = "") -> list[Rule]:
  """Our SpanReader <- HF RealmReader (`realm.*`, `qa_outputs.*`)."""
  return [(("bert",), prefix + "realm.", "bert"),
          (("span_intermediate",), prefix + "qa_outputs.dense_intermediate.", "linear"),
          (("span_norm",), prefix + "qa_outputs.layer_normalization.", "norm"),
          (("span_output",), prefix + "qa_outputs.dense_output.", "linear")]


def retriever_rules(prefix: str = "", shared: bool = True) -> list[Rule]:
  """Our Retriever <- HF RealmScorer (`embedder.*`, plus `query_embedder.*` when not shared)."""
  doc = _nest(("doc_embedder",), embedder_rules(prefix + "embedder."))
  if shared:  # NNX stores a shared module once, under whichever name it meets first.
    return _nest(("query_embedder",), embedder_rules(prefix + "embedder.")) + doc
  return _nest(("query_embedder",), embedder_rules(prefix + "query_embedder.")) + doc


def retriever_skip(shared: bool = True) -> list[str]:
  """Source keys a RealmScorer carries beyond our Retriever: with shared towers, HF lists the
  same query-embedder tensors a second time under `query_embedder.`."""
  return SKIP_EMBEDDER + ([r"(^|\.)query_embedder\."] if shared else [])


def _nest(outer: tuple, rules: list[Rule]) -> list[Rule]:
  return [(outer + ours, src, kind) for ours, src, kind in rules]


# Source weights that exist in HF checkpoints but have no counterpart by design.
SKIP_EMBEDDER = [r"cls\.predictions\."]  # RealmScorerProjection carries an unused MLM head
SKIP_ENCODER = [r"realm\.pooler\.", r"cls\.predictions\.decoder\."]  # pooler unused; decoder tied
SKIP_READER = [r"realm\.pooler\.", r"cls\."]  # RealmReader carries an unused MLM head
SKIP_ALWAYS = [r"(^|\.)position_ids$", r"(^|\.)adam_[mv]$", r"global_step$"]


def match_rules(module: nnx.Module, rules: Iterable[Rule]) -> Iterator[tuple[tuple, str, str, tuple]]:
  """(our path, source prefix, kind, path below the rule's prefix) for every Param of `module`;
  a parameter no rule covers is an error that names it."""
  rules = list(rules)
  for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    for ours, src, kind in rules:
      if path[:len(ours)] == ours:
        yield path, src, kind, path[len(ours):]
        break
    else:
      raise ConversionError(f"no conversion rule covers parameter {'/'.join(map(str, path))}")


def param_names(module: nnx.Module, rules: Iterable[Rule]) -> dict[tuple, tuple[str, bool]]:
  """Our parameter path -> (source name, transposed) for every Param of `module`."""
  out = {}
  for path, src, kind, rest in match_rules(module, rules):
    if kind == "bert":
      name, transposed = bert_name(rest)
      out[path] = (src + name, transposed)
    elif kind == "param":
      out[path] = (src, False)
    else:
      leaf, transposed = dense_name(rest[-1], kind, path)
      out[path] = (src + leaf, transposed)
  return out


def to_numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):  # torch tensor
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, dtype=np.float32)


def load_state_dict(module: nnx.Module, state_dict: Mapping[str, Any], rules: Iterable[Rule],
                    skip: Iterable[str] = (), source: str = "state dict", strict: bool = True) -> list[str]:
  """Copies weights named by `rules` from `state_dict` into `module`, in place.

  Returns the source keys that were used. With `strict`, any source key neither used nor matching
  a `skip` pattern is an error; a missing or mis-shaped weight always is.
  """
  sd = {normalise_hf_key(k): v for k, v in state_dict.items()}
  names = param_names(module, rules)
  state = nnx.state(module, nnx.Param)
  flat = nnx.to_flat_state(state)
  missing, bad_shape, used = [], [], set()
  new_leaves = []
  for path, var in flat:
    name, transposed = names[path]
    if name not in sd:
      missing.append(f"{name} (for {'/'.join(map(str, path))}, shape {tuple(var.get_value().shape)})")
      new_leaves.append(var)
      continue
    arr = to_numpy(sd[name])
    if transposed:
      arr = arr.T
    if arr.shape != tuple(var.get_value().shape):
      bad_shape.append(f"{name}: expected {tuple(var.get_value().shape)}"
                       f"{' (transposed)' if transposed else ''}, got {arr.shape}")
    used.add(name)
    new_leaves.append(var.replace(jnp.asarray(arr, var.get_value().dtype)))
  skip_re = [re.compile(p) for p in list(skip) + SKIP_ALWAYS]
  unexpected = sorted(k for k in sd if k not in used and not any(p.search(k) for p in skip_re))
  problems = []
  if missing:
    problems.append("missing weights:\n  " + "\n  ".join(missing))
  if bad_shape:
    problems.append("wrong shapes:\n  " + "\n  ".join(bad_shape))
  if strict and unexpected:
    problems.append("unexpected weights (neither mapped nor skipped):\n  " + "\n  ".join(unexpected))
  if problems:
    raise ConversionError(f"cannot load {source}: " + "\n".join(problems))
  nnx.update(module, nnx.from_flat_state([(p, v) for (p, _), v in zip(flat, new_leaves)]))
  return sorted(used)


def check_tied_decoder(state_dict: Mapping[str, Any], prefix: str = "") -> None:
  """Our MLM head ties its output weights to the word embeddings; refuse untied checkpoints."""
  dec = state_dict.get(prefix + "cls.predictions.decoder.weight")
  emb = state_dict.get(prefix + "realm.embeddings.word_embeddings.weight")
  if dec is not None and emb is not None and not np.array_equal(to_numpy(dec), to_numpy(emb)):
    raise ConversionError(f"{prefix}cls.predictions.decoder.weight differs from the word embeddings: "
                          "realm-jax ties the MLM output weights to the input embeddings")


# -- configs ---------------------------------------------------------------------------------

def realm_config_from_hf(hf: Mapping[str, Any], **overrides) -> RealmConfig:
  """RealmConfig from a HuggingFace `config.json` dict (RealmConfig or BertConfig)."""
  missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size") if k not in hf]
  if missing:
    raise ConversionError(f"config.json has no {', '.join(missing)} (not a BERT/REALM config)")
  bert = BertConfig(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
      max_position_embeddings=hf.get("max_position_embeddings", 512),
      type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
      hidden_act=hf.get("hidden_act", "gelu_new"), dropout_rate=hf.get("hidden_dropout_prob", 0.1),
      initializer_range=hf.get("initializer_range", 0.02))
  kwargs = dict(bert=bert)
  for ours, theirs in [("retriever_dim", "retriever_proj_size"), ("span_hidden_size", "span_hidden_size"),
                       ("max_span_width", "max_span_width"), ("reader_beam_size", "reader_beam_size"),
                       ("reader_layer_norm_eps", "reader_layer_norm_eps"), ("reader_len", "reader_seq_len"),
                       ("num_candidates", "num_candidates")]:
    if theirs in hf:
      kwargs[ours] = hf[theirs]
  kwargs.update(overrides)
  return RealmConfig(**kwargs)


def hf_config_dict(cfg: RealmConfig) -> dict[str, Any]:
  """The transformers 4.40.2 `RealmConfig` kwargs equivalent to `cfg`."""
  b = cfg.bert
  return dict(vocab_size=b.vocab_size, hidden_size=b.hidden_size, num_hidden_layers=b.num_layers,
              num_attention_heads=b.num_heads, intermediate_size=b.intermediate_size,
              hidden_act=b.hidden_act, hidden_dropout_prob=b.dropout_rate,
              attention_probs_dropout_prob=b.dropout_rate, max_position_embeddings=b.max_position_embeddings,
              type_vocab_size=b.type_vocab_size, initializer_range=b.initializer_range,
              layer_norm_eps=b.layer_norm_eps, retriever_proj_size=cfg.retriever_dim,
              num_candidates=cfg.num_candidates, span_hidden_size=cfg.span_hidden_size,
              max_span_width=cfg.max_span_width, reader_layer_norm_eps=cfg.reader_layer_norm_eps,
              reader_beam_size=cfg.reader_beam_size, reader_seq_len=cfg.reader_len)


# -- files -----------------------------------------------------------------------------------

def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Weights from a HF directory, a `.safetensors` file or a `pytorch_model.bin` (needs torch)."""
  path = pathlib.Path(path)
  if path.is_dir():
    for name in ("model.safetensors", "pytorch_model.bin"):
      if (path / name).exists():
        return read_state_dict(path / name)
    raise ConversionError(f"{path}: no model.safetensors or pytorch_model.bin")
  if not path.exists():
    raise ConversionError(f"{path}: no such file")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file
    try:
      return dict(load_file(str(path)))
    except Exception as e:  # SafetensorError (truncated, not a safetensors file), OSError
      raise ConversionError(f"{path}: not a readable safetensors file ({e}); truncated or damaged?") from None
  try:
    import torch
  except ImportError as e:
    raise ConversionError(f"{path}: reading PyTorch .bin files needs torch (pip install 'realm-jax[convert]')") from e
  try:
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # pickle/zip errors of a truncated or foreign file
    raise ConversionError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}: {e})") from None
  return {k: to_numpy(v) for k, v in sd.items()}


def read_config(path: str | pathlib.Path) -> dict[str, Any]:
  path = pathlib.Path(path)
  cfg_path = path / "config.json" if path.is_dir() else path.parent / "config.json"
  if not cfg_path.exists():
    raise ConversionError(f"{cfg_path}: missing (a HuggingFace directory needs config.json)")
  try:
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f"{cfg_path}: not a valid JSON config ({e})") from None
  if not isinstance(config, dict):
    raise ConversionError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
  return config


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """Keys under `prefix` with the prefix removed (e.g. 'bert.' of BertForPreTraining)."""
  return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_bert(bert_module: nnx.Module, state_dict: Mapping[str, Any], source: str = "BERT weights") -> None:
  """Loads a plain HF `BertModel` state dict (with or without a `bert.` prefix) into a BertEncoder."""
  sd = {normalise_hf_key(k): v for k, v in state_dict.items()}
  if any(k.startswith("bert.") for k in sd):
    sd = strip_prefix(sd, "bert.")
  rules = [((), "", "bert")]
  has_pooler = getattr(bert_module, "pooler", None) is not None
  skip = [r"^pooler\."] if not has_pooler else []
  load_state_dict(bert_module, sd, rules, skip=skip + [r"^cls\."], source=source)


TOWERS = ("retriever.query_embedder", "retriever.doc_embedder", "encoder", "reader")


def init_from_bert(model: nnx.Module, state_dict: Mapping[str, Any], source: str = "BERT weights",
                   parts: tuple[str, ...] | None = None) -> list[str]:
  """Initialises every BERT inside a RealmModel/OpenQAModel from one plain `BertModel` state dict
  (only the towers under `parts`, e.g. `("retriever",)`, when given).

  The retriever towers, the knowledge-augmented encoder and the reader all start from the same
  pre-trained BERT (as REALM starts from BERT); projections and heads keep their fresh init, except
  that a mean-pooling retriever tower gets `init_sentence_head` (a head that keeps the BERT's
  mean-pooled ranking). Returns the names of the initialised encoders.
  """
  from realm_jax.models.retriever import init_sentence_head

  done, seen = [], set()
  for name in TOWERS:
    if parts is not None and name.split(".")[0] not in parts:
      continue
    obj = model
    for attr in name.split("."):
      obj = getattr(obj, attr, None)
    if obj is not None and id(obj) not in seen:  # a shared tower is loaded once
      load_bert(obj.bert, state_dict, source=source)
      if getattr(obj, "pooling", None) == "mean":
        init_sentence_head(obj)
        name += " (mean pooling, sentence head)"
      done.append(name)
      seen.add(id(obj))
  if not done:
    raise ConversionError(f"{type(model).__name__} holds no BERT tower named {parts or TOWERS}")
  return done


_LAYER_KEY = re.compile(r"^(?:bert\.)?encoder\.layer\.(\d+)\.")


def num_layers_of(state_dict: Mapping[str, Any]) -> int:
  """How many encoder layers a HF BERT state dict holds."""
  return len({int(m.group(1)) for k in state_dict if (m := _LAYER_KEY.match(k))})


def first_layers(state_dict: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """The state dict of a BERT cut to its first `num_layers` layers (a cheap, still pre-trained
  model: the lower layers of a BERT are a BERT). Refuses to add layers that are not there."""
  have = num_layers_of(state_dict)
  if num_layers > have:
    raise ConversionError(f"asked for {num_layers} layers but the weights have {have}")
  return {k: v for k, v in state_dict.items() if not ((m := _LAYER_KEY.match(k)) and int(m.group(1)) >= num_layers)}


def init_from_minilm(model: nnx.Module, num_layers: int | None = None, parts: tuple[str, ...] | None = None) -> str:
  """Initialises every BERT of `model` (those under `parts` when given) from the packaged MiniLM-L6
  (its first `num_layers` layers when the model is shallower); returns a log line saying what
  was loaded."""
  from realm_jax.data import sources  # data -> convert would be circular at import time
  sd = read_state_dict(sources.minilm_dir())
  have = num_layers_of(sd)
  source = "MiniLM-L6"
  if num_layers is not None and num_layers < have:
    sd, source = first_layers(sd, num_layers), f"the first {num_layers} of MiniLM-L6's {have} layers"
  done = init_from_bert(model, sd, source=source, parts=parts)
  return f"initialised {', '.join(done)} from {source} (packaged BERT)"
