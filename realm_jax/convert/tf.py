"""The original TF REALM / ORQA checkpoints -> realm-jax weights (`realm-jax convert tf`).

Variable names follow the released checkpoints (and transformers 4.40.2's
`load_tf_weights_in_realm`): the pre-trained embedder TF-Hub module `module/module/module/bert/...`,
`module/module/dense`, `module/module/LayerNorm`; the fine-tuned ORQA embedder one `module/` deeper;
the knowledge-augmented encoder `bert/...` + `cls/predictions/...`; the ORQA reader
`reader/module/bert/...`, `reader/dense`, `reader/layer_normalization`, `reader/dense_1`.
Every source variable is mapped or deliberately skipped (`SKIPPED`); anything else is an error.
TensorFlow (the `convert` extra) reads the checkpoint; checkpoints on `gs://` are staged locally
through `realm_jax.storage` first.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import tempfile
from typing import Callable, Iterable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from realm_jax.config import BertConfig, RealmConfig, get_preset
from realm_jax.convert.hf import Rule, _nest, match_rules
from realm_jax.convert.names import TF_KINDS, ConversionError, bert_name, hf_to_tf
from realm_jax.errors import ConfigError
from realm_jax.models import KnowledgeAugEncoder, Retriever, SpanReader

KINDS = TF_KINDS

# Parts of our weights format each kind produces.
KIND_PARTS = {"embedder": ["retriever"], "scorer": ["retriever"], "encoder": ["encoder"],
              "orqa": ["retriever", "reader"], "realm": ["retriever", "encoder"]}

# TF scopes of the towers. The fine-tuned ORQA embedder lives one `module/` deeper.
EMBEDDER_PRETRAINED = ("module/module/module/bert/", "module/module/dense/", "module/module/LayerNorm/")
EMBEDDER_FINETUNED = ("module/module/module/module/bert/", "module/module/module/dense/",
                      "module/module/module/LayerNorm/")
ENCODER_BERT = "bert/"
READER_BERT = "reader/module/bert/"

# Deliberately skipped source variables: (pattern, reason). Listed in docs/CONVERSION.md.
SKIPPED = [
    (r"(^|/)(adam_m|adam_v|Adam|Adam_1)$", "optimizer slot"),
    (r"(^|/)(AdamWeightDecayOptimizer|AdamWeightDecayOptimizer_1)(/|$)", "optimizer slot"),
    (r"(^|/)(global_step|beta1_power|beta2_power)$", "optimizer step / moments"),
    (r"^module/module/module/(module/)?cls/predictions/", "the embedder module's unused MLM head"),
    (r"^bert/pooler/", "the encoder's pooler (REALM's encoder reads tokens, not [CLS])"),
    (r"^cls/seq_relationship/", "BERT's next-sentence head"),
    (r"^reader/module/bert/pooler/", "the reader's pooler (unused by span scoring)"),
    (r"^reader/module/cls/", "the reader module's unused MLM head"),
    (r"^block_emb$", "the document index: convert it with `realm-jax convert index`"),
]


def _fail(msg: str) -> ConversionError:
  return ConversionError(msg)


# -- reading checkpoints -----------------------------------------------------------------------

def _import_tf():
  try:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("EPATH_USE_TF", "false")  # keep etils/orbax on gcsfs (docs/DESIGN.md §6)
    import tensorflow as tf
  except ImportError as e:
    raise ConversionError("reading TF checkpoints needs TensorFlow: pip install 'realm-jax[convert]' "
                          "(tensorflow-cpu==2.20.0, the version scann 1.4.2 is built against)") from e
  return tf


def _resolve_prefix(exists: Callable[[str], bool], read_text: Callable[[str], str], path: str) -> str:
  """A checkpoint prefix from a prefix, an Estimator directory (`checkpoint` file) or a TF-Hub
  module directory (`variables/variables`)."""
  path = path.rstrip("/")
  if exists(path + ".index"):
    return path
  if exists(path + "/variables/variables.index"):
    return path + "/variables/variables"
  if exists(path + "/checkpoint"):
    m = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', read_text(path + "/checkpoint"), re.M)
    if m:
      name = m.group(1)
      prefix = name if name.startswith(("/", "gs://")) else f"{path}/{name}"
      if exists(prefix + ".index"):
        return prefix
  raise ConversionError(f"{path}: no TF checkpoint there (looked for {path}.index, "
                        f"{path}/variables/variables.index and {path}/checkpoint)")


@contextlib.contextmanager
def local_checkpoint(uri: str) -> Iterator[str]:
  """Yields a local checkpoint prefix for `uri`; remote checkpoints are staged to a temp dir."""
  from realm_jax.storage import Storage
  if "://" not in uri or uri.startswith("file://"):
    local = uri[len("file://"):] if uri.startswith("file://") else uri
    yield _resolve_prefix(lambda p: os.path.exists(p), lambda p: pathlib.Path(p).read_text(), local)
    return
  parent, _, base = uri.rstrip("/").rpartition("/")
  store = Storage.open(parent)
  def rel(p):
    return p[len(parent) + 1:]
  prefix = _resolve_prefix(lambda p: store.exists(rel(p)), lambda p: store.read_bytes(rel(p)).decode(), uri)
  head, _, stem = rel(prefix).rpartition("/")
  with tempfile.TemporaryDirectory(prefix="realm-tf-ckpt-") as tmp:
    for f in store.list(head):
      name = f.rpartition("/")[2]
      if name.startswith(stem + ".") and (f.rpartition("/")[0] == head):
        store.get_file(f, os.path.join(tmp, name))
    yield os.path.join(tmp, stem)


class TfCheckpoint:
  """The variables of one or more TF checkpoints: `shapes` up front, arrays read on demand."""

  def __init__(self, prefixes: Iterable[str]):
    tf = _import_tf()
    self._readers = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    self.origin: dict[str, str] = {}
    for prefix in prefixes:
      try:
        reader = tf.train.load_checkpoint(prefix)
      except Exception as e:  # TF raises many kinds (NotFoundError, DataLossError, ...)
        raise ConversionError(f"{prefix}: cannot read TF checkpoint: {e}") from None
      for name, shape in reader.get_variable_to_shape_map().items():
        if name in self.shapes:
          raise ConversionError(f"variable {name} is in both {self.origin[name]} and {prefix}")
        self.shapes[name] = tuple(int(d) for d in shape)
        self.origin[name] = prefix
        self._readers[name] = reader

  def get(self, name: str) -> np.ndarray:
    return np.asarray(self._readers[name].get_tensor(name))


# -- names -------------------------------------------------------------------------------------

def embedder_rules(scopes: tuple[str, str, str]) -> list[Rule]:
  bert, dense, norm = scopes
  return [(("bert",), bert, "bert"), (("projection",), dense, "linear"), (("projection_norm",), norm, "norm")]


def retriever_rules(scopes: tuple[str, str, str]) -> list[Rule]:
  """Both towers read the one TF embedder (shared towers are stored once; separate ones get a copy)."""
  emb = embedder_rules(scopes)
  return _nest(("query_embedder",), emb) + _nest(("doc_embedder",), emb)


def encoder_rules() -> list[Rule]:
  return [(("bert",), ENCODER_BERT, "bert"),
          (("mlm", "transform"), "cls/predictions/transform/dense/", "linear"),
          (("mlm", "transform_norm"), "cls/predictions/transform/LayerNorm/", "norm"),
          (("mlm", "output_bias"), "cls/predictions/output_bias", "param")]


def reader_rules() -> list[Rule]:
  return [(("bert",), READER_BERT, "bert"), (("span_intermediate",), "reader/dense/", "linear"),
          (("span_norm",), "reader/layer_normalization/", "norm"), (("span_output",), "reader/dense_1/", "linear")]


_TF_LEAF = {"linear": {"kernel": "kernel", "bias": "bias"}, "norm": {"scale": "gamma", "bias": "beta"}}


def tf_param_names(module: nnx.Module, rules: Iterable[Rule]) -> dict[tuple, str]:
  """Our parameter path -> TF variable name (TF kernels are `[in, out]`, as ours: no transposes)."""
  out = {}
  for path, src, kind, rest in match_rules(module, rules):
    if kind == "bert":
      out[path] = src + hf_to_tf(bert_name(rest)[0])
    elif kind == "param":
      out[path] = src
    else:
      leaf = _TF_LEAF[kind].get(rest[-1])
      if leaf is None:
        raise _fail(f"no TF name for parameter {'/'.join(map(str, path))}")
      out[path] = src + leaf
  return out


def skip_reason(name: str) -> str | None:
  for pattern, reason in SKIPPED:
    if re.search(pattern, name):
      return reason
  return None


def embedder_scopes(names: Iterable[str]) -> tuple[str, str, str]:
  """The pre-trained (REALM) or fine-tuned (ORQA, one `module/` deeper) embedder scopes."""
  names = set(names)
  if EMBEDDER_FINETUNED[0] + "embeddings/word_embeddings" in names:
    return EMBEDDER_FINETUNED
  return EMBEDDER_PRETRAINED


# -- config inference --------------------------------------------------------------------------

def _bert_from_shapes(shapes: Mapping[str, tuple], scope: str) -> BertConfig:
  def need(name):
    if scope + name not in shapes:
      raise _fail(f"cannot infer the config: variable {scope + name} is missing")
    return shapes[scope + name]
  vocab, hidden = need("embeddings/word_embeddings")
  layers = {int(m.group(1)) for n in shapes if (m := re.match(re.escape(scope) + r"encoder/layer_(\d+)/", n))}
  if not layers:
    raise _fail(f"cannot infer the config: no {scope}encoder/layer_N/ variables")
  if hidden % 64:
    raise _fail(f"cannot infer num_heads for hidden size {hidden} (not a multiple of BERT's head size 64): "
                "pass --config")
  return BertConfig(vocab_size=vocab, hidden_size=hidden, num_layers=max(layers) + 1, num_heads=hidden // 64,
                    intermediate_size=need("encoder/layer_0/intermediate/dense/kernel")[1],
                    max_position_embeddings=need("embeddings/position_embeddings")[0],
                    type_vocab_size=need("embeddings/token_type_embeddings")[0])


def infer_config(shapes: Mapping[str, tuple], kind: str) -> RealmConfig:
  """A RealmConfig from the checkpoint's shapes (heads = hidden / 64, BERT's convention)."""
  berts, kwargs = [], {}
  if kind in ("embedder", "scorer", "orqa", "realm"):
    scopes = embedder_scopes(shapes)
    berts.append(_bert_from_shapes(shapes, scopes[0]))
    if scopes[1] + "kernel" in shapes:
      kwargs["retriever_dim"] = shapes[scopes[1] + "kernel"][1]
  if kind in ("encoder", "realm"):
    berts.append(_bert_from_shapes(shapes, ENCODER_BERT))
  if kind == "orqa":
    berts.append(_bert_from_shapes(shapes, READER_BERT))
    if "reader/dense/kernel" in shapes:
      kwargs["span_hidden_size"] = shapes["reader/dense/kernel"][1] // 2
  if any(b != berts[0] for b in berts):
    raise _fail(f"the towers in the checkpoint have different BERT shapes: {berts}")
  bert = berts[0]
  lengths = {}
  if bert.max_position_embeddings < 384:  # shrink the default sequence lengths to fit
    p = bert.max_position_embeddings
    lengths = dict(query_len=p // 4, block_len=p - p // 4, reader_len=p)
  return RealmConfig(bert=bert, **kwargs, **lengths)


def parse_config(spec: str) -> RealmConfig:
  """`--config`: a preset name, inline JSON, or a JSON file (a RealmConfig dict)."""
  if spec.lstrip().startswith("{"):
    return RealmConfig.from_dict(json.loads(spec))
  if os.path.exists(spec) or "://" in spec:
    from realm_jax.storage import Storage
    parent, _, name = spec.rpartition("/")
    try:
      return RealmConfig.from_dict(Storage.open(parent or ".").read_json(name))
    except json.JSONDecodeError as e:
      raise ConfigError(f"{spec}: not valid JSON: {e}") from None
  return get_preset(spec)


# -- loading -----------------------------------------------------------------------------------

class Towers(nnx.Module):
  """Only the parts a conversion produces (`retriever`, `encoder`, `reader`), for `save_weights`."""

  def __init__(self, cfg: RealmConfig, parts: Iterable[str], *, rngs: nnx.Rngs):
    parts = set(parts)
    self.config = cfg
    if "retriever" in parts:
      self.retriever = Retriever(cfg, rngs=rngs)
    if "encoder" in parts:
      self.encoder = KnowledgeAugEncoder(cfg, rngs=rngs)
    if "reader" in parts:
      self.reader = SpanReader(cfg, rngs=rngs)


def part_rules(kind: str, names: Iterable[str]) -> dict[str, list[Rule]]:
  """Rules per part of `kind`."""
  scopes = embedder_scopes(names)
  out = {}
  if "retriever" in KIND_PARTS[kind]:
    out["retriever"] = retriever_rules(scopes)
  if "encoder" in KIND_PARTS[kind]:
    out["encoder"] = encoder_rules()
  if "reader" in KIND_PARTS[kind]:
    out["reader"] = reader_rules()
  return out


def load_tf(model: nnx.Module, ckpt: TfCheckpoint, kind: str) -> dict[str, list[str]]:
  """Copies the checkpoint's variables into `model`'s parts for `kind`, strictly.

  Returns {"used": [...], "skipped": ["name (reason)", ...]}. Raises ConversionError naming every
  missing variable (with the expected shape), wrong shape, and variable neither mapped nor skipped.
  """
  if kind not in KINDS:
    raise _fail(f"unknown kind {kind!r}; choose one of {KINDS}")
  missing, bad_shape, used, updates = [], [], set(), []
  for part, rules in part_rules(kind, ckpt.shapes).items():
    module = getattr(model, part)
    names = tf_param_names(module, rules)
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    leaves = []
    for path, var in flat:
      name, want = names[path], tuple(var.get_value().shape)
      if name not in ckpt.shapes:
        missing.append(f"{name} (expected shape {want}, for {part}/{'/'.join(map(str, path))})")
      elif ckpt.shapes[name] != want:
        bad_shape.append(f"{name}: expected shape {want}, got {ckpt.shapes[name]}")
      else:
        used.add(name)
        leaves.append((path, var, name))
    updates.append((module, flat, leaves))
  skipped, unknown = [], []
  for name in sorted(ckpt.shapes):
    if name in used:
      continue
    reason = skip_reason(name)
    if reason is None:
      unknown.append(f"{name} {ckpt.shapes[name]}")
    else:
      skipped.append(f"{name} ({reason})")
  problems = []
  if missing:
    problems.append("missing variables:\n  " + "\n  ".join(missing))
  if bad_shape:
    problems.append("wrong shapes:\n  " + "\n  ".join(bad_shape))
  if unknown:
    problems.append(f"unknown variables (neither mapped nor skipped for kind {kind!r}):\n  " + "\n  ".join(unknown))
  if problems:
    origins = sorted(set(ckpt.origin.values()))
    raise _fail(f"cannot convert {', '.join(origins)} as {kind!r}: " + "\n".join(problems))
  cache: dict[str, jnp.ndarray] = {}
  for module, flat, leaves in updates:
    new = {path: var for path, var in flat}
    for path, var, name in leaves:
      if name not in cache:  # both towers of a retriever read one variable
        cache[name] = jnp.asarray(ckpt.get(name), jnp.float32)
      new[path] = var.replace(cache[name])
    nnx.update(module, nnx.from_flat_state([(p, new[p]) for p, _ in flat]))
  return {"used": sorted(used), "skipped": skipped}


def convert_tf(checkpoints: list[str], kind: str, out: str, config: RealmConfig | None = None,
               log: Callable[[str], None] = print) -> RealmConfig:
  """Reads TF checkpoint(s) (local or any storage URI), converts them as `kind`, writes our weights."""
  from realm_jax import weights
  if kind not in KINDS:
    raise _fail(f"unknown kind {kind!r}; choose one of {KINDS}")
  with contextlib.ExitStack() as stack:
    prefixes = [stack.enter_context(local_checkpoint(c)) for c in checkpoints]
    ckpt = TfCheckpoint(prefixes)
    cfg = config or infer_config(ckpt.shapes, kind)
    if config is None:
      b = cfg.bert
      log(f"inferred config: vocab {b.vocab_size}, hidden {b.hidden_size}, layers {b.num_layers}, "
          f"heads {b.num_heads} (hidden/64), intermediate {b.intermediate_size}, "
          f"retriever_dim {cfg.retriever_dim}, span_hidden {cfg.span_hidden_size}")
    parts = KIND_PARTS[kind]
    model = Towers(cfg, parts, rngs=nnx.Rngs(0))
    report = load_tf(model, ckpt, kind)
  for s in report["skipped"]:
    log(f"skipped {s}")
  weights.save_weights(out, model, cfg, parts,
                       metadata={"converted_from": checkpoints, "source_format": "tf", "kind": kind})
  log(f"wrote {', '.join(parts)} ({len(report['used'])} variables) to {out}")
  return cfg
