"""HuggingFace directories in and out: `realm-jax convert hf` and `realm-jax export hf`.

In: a local directory (`config.json` + `model.safetensors` or `pytorch_model.bin`) of any
`google/realm-*` model (the class is read from `architectures`) or a plain BERT, which initialises
every tower. Out: our weights as a transformers 4.40.2 `Realm*` directory (`from_pretrained` loads
it without missing or unexpected keys): tied MLM decoder weights are written out, and the heads HF
carries but REALM never uses (the embedder's and reader's MLM heads, the encoder's and reader's
pooler) are filled deterministically (zeros, LayerNorm scale one, decoder = word embeddings).
Export needs neither torch nor transformers.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import tempfile
from typing import Any, Callable, Iterator

import numpy as np
from flax import nnx

from realm_jax import weights
from realm_jax.config import RealmConfig
from realm_jax.convert import hf as hfc
from realm_jax.convert.names import EXPORT_KINDS, ConversionError
from realm_jax.convert.tf import Towers

ARCHS = {"RealmEmbedder": "embedder", "RealmScorer": "scorer", "RealmKnowledgeAugEncoder": "encoder",
         "RealmReader": "reader", "RealmForOpenQA": "orqa", "BertModel": "bert", "BertForPreTraining": "bert",
         "BertForMaskedLM": "bert"}
HF_CLASS = {"embedder": "RealmEmbedder", "scorer": "RealmScorer", "encoder": "RealmKnowledgeAugEncoder",
            "reader": "RealmReader", "orqa": "RealmForOpenQA"}
PARTS = {"embedder": ["retriever"], "scorer": ["retriever"], "encoder": ["encoder"], "reader": ["reader"],
         "orqa": ["retriever", "reader"], "bert": ["retriever", "encoder", "reader"]}


def _single_embedder_rules(prefix: str = "") -> list[hfc.Rule]:
  """A RealmEmbedder's weights feed both of our towers (stored once when shared)."""
  emb = hfc.embedder_rules(prefix)
  return hfc._nest(("query_embedder",), emb) + hfc._nest(("doc_embedder",), emb)


MLM_HEAD_RULES = [(("transform",), "cls.predictions.transform.dense.", "linear"),
                  (("transform_norm",), "cls.predictions.transform.LayerNorm.", "norm"),
                  (("output_bias",), "cls.predictions.bias", "param")]


def _rules(kind: str, part: str, shared: bool) -> tuple[list[hfc.Rule], list[str], str]:
  """(rules, skip patterns, source prefix) for one part of one HF class."""
  if kind == "embedder":
    return _single_embedder_rules(), hfc.SKIP_EMBEDDER, ""
  if kind == "scorer":
    return hfc.retriever_rules(shared=shared), hfc.retriever_skip(shared), ""
  if kind == "encoder":
    return hfc.encoder_rules(), hfc.SKIP_ENCODER, ""
  if kind == "reader":
    return hfc.reader_rules(), hfc.SKIP_READER, ""
  if kind == "orqa" and part == "retriever":
    return _single_embedder_rules(), hfc.SKIP_EMBEDDER, "embedder."
  if kind == "orqa" and part == "reader":
    return hfc.reader_rules(), hfc.SKIP_READER, "reader."
  raise ConversionError(f"no HuggingFace layout for kind {kind!r} part {part!r}")


# -- in ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _local_dir(uri: str) -> Iterator[pathlib.Path]:
  if "://" not in uri or uri.startswith("file://"):
    yield pathlib.Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    return
  from realm_jax.storage import Storage
  with tempfile.TemporaryDirectory(prefix="realm-hf-") as tmp:
    yield Storage.open(uri).download_dir("", tmp)


def detect_kind(hf_config: dict[str, Any], where: str) -> str:
  archs = hf_config.get("architectures") or []
  for arch in archs:
    if arch in ARCHS:
      return ARCHS[arch]
  if hf_config.get("model_type") == "bert":
    return "bert"
  raise ConversionError(f"{where}/config.json: architectures {archs} is none of {sorted(ARCHS)}; pass --kind")


def read_weights(d: pathlib.Path, drop: tuple[str, ...] = ()) -> dict[str, Any]:
  """A HF directory's weights without the tensors in `drop` (RealmForOpenQA's 6.8 GB `block_emb`
  is never read: safetensors are opened lazily, `.bin` files memory-mapped)."""
  if (d / "model.safetensors").exists():
    from safetensors import safe_open
    try:
      with safe_open(str(d / "model.safetensors"), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    except Exception as e:  # SafetensorError: truncated or not a safetensors file
      raise ConversionError(f"{d / 'model.safetensors'}: not a readable safetensors file ({e}); truncated or "
                            "damaged?") from None
  if (d / "pytorch_model.bin").exists():
    try:
      import torch
    except ImportError as e:
      raise ConversionError(f"{d}: reading pytorch_model.bin needs torch (pip install 'realm-jax[convert]')") from e
    try:
      sd = torch.load(str(d / "pytorch_model.bin"), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated or foreign file
      raise ConversionError(f"{d / 'pytorch_model.bin'}: not a readable PyTorch weights file "
                            f"({type(e).__name__}: {e})") from None
    return {k: hfc.to_numpy(v) for k, v in sd.items() if k not in drop}
  return hfc.read_state_dict(d)  # names what is missing


def load_hf_into(model: nnx.Module, sd: dict[str, Any], kind: str, cfg: RealmConfig, source: str) -> list[str]:
  """Copies a HF state dict of `kind` into `model`'s parts, strictly; returns the parts."""
  if kind == "bert":
    hfc.init_from_bert(model, sd, source=source)
    if "cls.predictions.transform.dense.weight" in sd:  # BertForPreTraining / MaskedLM: the MLM head too
      hfc.check_tied_decoder({k.replace("bert.", "realm.", 1): v for k, v in sd.items()})
      hfc.load_state_dict(model.encoder.mlm, sd, MLM_HEAD_RULES, source=source, strict=False)
    return PARTS[kind]
  if kind == "encoder":
    hfc.check_tied_decoder(sd)
  leftover = set(sd)
  for part in PARTS[kind]:
    rules, skip, prefix = _rules(kind, part, cfg.share_embedders)
    part_sd = hfc.strip_prefix(sd, prefix) if prefix else sd
    leftover -= {prefix + k for k in part_sd}
    hfc.load_state_dict(getattr(model, part), part_sd, rules, skip=skip, source=source)
  leftover -= {"block_emb"}  # RealmForOpenQA's document index: see `realm-jax convert index`
  if leftover:
    raise ConversionError(f"cannot load {source}: unexpected weights (neither mapped nor skipped):\n  "
                          + "\n  ".join(sorted(leftover)))
  return PARTS[kind]


def convert_hf(path: str, out: str, kind: str | None = None, config: RealmConfig | None = None,
               log: Callable[[str], None] = print) -> RealmConfig:
  """A HuggingFace directory (local or storage URI) -> our weights at `out`."""
  with _local_dir(path) as d:
    hf_cfg = hfc.read_config(d)
    found = detect_kind(hf_cfg, path)
    if kind is not None and kind != found:
      raise ConversionError(f"{path}: config.json says {hf_cfg.get('architectures')} ({found}), not {kind}")
    kind = found
    cfg = config or hfc.realm_config_from_hf(hf_cfg)
    sd = read_weights(d, drop=("block_emb",))
  model = Towers(cfg, PARTS[kind], rngs=nnx.Rngs(0))
  parts = load_hf_into(model, sd, kind, cfg, source=f"{path} ({kind})")
  weights.save_weights(out, model, cfg, parts, metadata={"converted_from": path, "source_format": "hf", "kind": kind})
  log(f"wrote {', '.join(parts)} from {path} ({kind}) to {out}")
  return cfg


# -- out ---------------------------------------------------------------------------------------

def _ours_to_hf(module: nnx.Module, rules: list[hfc.Rule], prefix: str) -> dict[str, np.ndarray]:
  names = hfc.param_names(module, rules)
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    name, transposed = names[path]
    arr = np.asarray(var.get_value(), np.float32)
    out[name] = np.ascontiguousarray(arr.T if transposed else arr)
  return {prefix + k: v for k, v in out.items()}


def _unused_heads(sd: dict[str, np.ndarray], cls: str, cfg: RealmConfig, prefix: str = "") -> None:
  """Fills the tensors HF's class carries that our model has no use for (deterministic values)."""
  h, v = cfg.bert.hidden_size, cfg.bert.vocab_size
  word = sd[prefix + "realm.embeddings.word_embeddings.weight"]
  if cls in ("RealmKnowledgeAugEncoder", "RealmReader"):
    sd.setdefault(prefix + "realm.pooler.dense.weight", np.zeros((h, h), np.float32))
    sd.setdefault(prefix + "realm.pooler.dense.bias", np.zeros((h,), np.float32))
  if cls in ("RealmEmbedder", "RealmReader"):  # an MLM head nobody reads
    sd.setdefault(prefix + "cls.predictions.transform.dense.weight", np.zeros((h, h), np.float32))
    sd.setdefault(prefix + "cls.predictions.transform.dense.bias", np.zeros((h,), np.float32))
    sd.setdefault(prefix + "cls.predictions.transform.LayerNorm.weight", np.ones((h,), np.float32))
    sd.setdefault(prefix + "cls.predictions.transform.LayerNorm.bias", np.zeros((h,), np.float32))
    sd.setdefault(prefix + "cls.predictions.bias", np.zeros((v,), np.float32))
  # The decoder is tied to the word embeddings and its bias to cls.predictions.bias.
  sd[prefix + "cls.predictions.decoder.weight"] = word.copy()
  sd[prefix + "cls.predictions.decoder.bias"] = sd[prefix + "cls.predictions.bias"].copy()


def hf_state_dict(model: nnx.Module, kind: str, cfg: RealmConfig) -> dict[str, np.ndarray]:
  """Our parts -> the complete state dict of the HF class for `kind`."""
  if kind in ("embedder", "scorer", "orqa") and not cfg.share_embedders:
    raise ConversionError("HF's Realm* classes hold one retriever embedder; these weights have separate "
                          "query and document towers (share_embedders=False)")
  if kind in ("embedder", "scorer", "orqa") and cfg.retriever_pooling != "cls":
    raise ConversionError(f"HF's Realm* classes pool the [CLS] token; these weights' retriever uses "
                          f"retriever_pooling={cfg.retriever_pooling!r}, which no HF class computes")
  sd: dict[str, np.ndarray] = {}
  if kind == "embedder":
    sd.update(_ours_to_hf(model.retriever.query_embedder, hfc.embedder_rules(), ""))
    _unused_heads(sd, "RealmEmbedder", cfg)
  elif kind == "scorer":
    emb = _ours_to_hf(model.retriever.query_embedder, hfc.embedder_rules(), "")
    _unused_heads(emb, "RealmEmbedder", cfg)
    for name, arr in emb.items():  # HF lists the shared tower under both names
      sd["embedder." + name] = arr
      sd["query_embedder." + name] = arr
  elif kind == "encoder":
    sd.update(_ours_to_hf(model.encoder, hfc.encoder_rules(), ""))
    _unused_heads(sd, "RealmKnowledgeAugEncoder", cfg)
  elif kind == "reader":
    sd.update(_ours_to_hf(model.reader, hfc.reader_rules(), ""))
    _unused_heads(sd, "RealmReader", cfg)
  elif kind == "orqa":
    sd.update(_ours_to_hf(model.retriever.query_embedder, hfc.embedder_rules(), "embedder."))
    _unused_heads(sd, "RealmEmbedder", cfg, "embedder.")
    sd.update(_ours_to_hf(model.reader, hfc.reader_rules(), "reader."))
    _unused_heads(sd, "RealmReader", cfg, "reader.")
    sd["block_emb"] = np.zeros((0, cfg.retriever_dim), np.float32)  # attach the index in HF itself
  else:
    raise ConversionError(f"unknown export kind {kind!r}; choose one of {EXPORT_KINDS}")
  return sd


def hf_config_json(cfg: RealmConfig, kind: str) -> dict[str, Any]:
  out = {"architectures": [HF_CLASS[kind]], "model_type": "realm", "transformers_version": "4.40.2",
         "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, **hfc.hf_config_dict(cfg)}
  if kind == "orqa":
    out["num_block_records"] = 0
  return out


def _write_dir(local: pathlib.Path, model: nnx.Module, kind: str, cfg: RealmConfig) -> None:
  from safetensors.numpy import save_file
  local.mkdir(parents=True)
  save_file(hf_state_dict(model, kind, cfg), str(local / "model.safetensors"), metadata={"format": "pt"})
  (local / "config.json").write_text(json.dumps(hf_config_json(cfg, kind), indent=2, sort_keys=True) + "\n")


def export_hf(weights_uri: str, kind: str, out: str, log: Callable[[str], None] = print) -> list[str]:
  """Our weights -> HF directory (or `scorer/` + `encoder/` for kind `realm`); returns the dirs."""
  if kind not in EXPORT_KINDS:
    raise ConversionError(f"unknown export kind {kind!r}; choose one of {EXPORT_KINDS}")
  cfg = weights.read_config(weights_uri)
  kinds = ["scorer", "encoder"] if kind == "realm" else [kind]
  needed = sorted({p for k in kinds for p in PARTS[k]})
  model = Towers(cfg, needed, rngs=nnx.Rngs(0))
  weights.load_weights(weights_uri, model, parts=needed)
  from realm_jax.storage import Storage
  store = Storage.open(out)
  if store.list(""):
    raise ConversionError(f"{out}: not empty; choose a new directory")
  written = []
  with tempfile.TemporaryDirectory(prefix="realm-export-") as tmp:
    for k in kinds:
      sub = k if kind == "realm" else ""
      _write_dir(pathlib.Path(tmp) / (sub or "model"), model, k, cfg)
      store.upload_dir(pathlib.Path(tmp) / (sub or "model"), sub, exclusive=True)
      written.append(store.uri(sub) if sub else store.root)
  log(f"wrote {', '.join(written)} ({', '.join(HF_CLASS[k] for k in kinds)})")
  return written
