"""Tokenizers on real Wikipedia text: WordPiece against HF transformers, SentencePiece training,
offsets that point back at the text, save/load, the CLI, and clear errors."""

import json
import os
import subprocess
import sys
import unicodedata

import numpy as np
import pytest

from realm_jax.data import sources
from realm_jax.data.corpus import split_sentences
from realm_jax.data.documents import read_mediawiki
from realm_jax.data.tokenizer import (
  SentencePieceTokenizer,
  TokenizerError,
  WordPieceTokenizer,
  load_tokenizer,
  train_sentencepiece,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sentences():
  """About 4,000 real sentences from the first articles of the gensim Wikipedia excerpt."""
  out = []
  for i, doc in enumerate(read_mediawiki(str(sources.wikipedia_excerpt()))):
    out += [doc.text[s:e] for s, e in split_sentences(doc.text)]
    if i == 8:
      break
  return out


@pytest.fixture(scope="module")
def vocab_path():
  return sources.minilm_dir() / "vocab.txt"


def _fold(text: str) -> str:
  """BERT-uncased normalisation of a surface string: lowercase, accents stripped."""
  return "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")


@pytest.fixture(scope="module")
def hf_ref(vocab_path):
  from transformers import BertTokenizer  # the slow, pure-Python reference implementation.

  return BertTokenizer(str(vocab_path), do_lower_case=True)


def test_wordpiece_matches_hf_bert_tokenizer(sentences, vocab_path, hf_ref):
  ref = hf_ref
  tok = load_tokenizer(str(vocab_path))
  sample = sentences[::10]
  for text in sample:
    assert tok.encode(text).ids.tolist() == ref.encode(text, add_special_tokens=False), text
  lines = vocab_path.read_text(encoding="utf-8").split("\n")
  for name in ("cls", "sep", "pad", "mask", "unk"):
    assert lines[getattr(tok, f"{name}_id")] == f"[{name.upper()}]"
  assert tok.vocab_size == len(ref.vocab) == 30522


def test_wordpiece_offsets_point_at_token_text(sentences, vocab_path):
  tok = WordPieceTokenizer.from_file(vocab_path)
  checked = 0
  for text, enc in zip(sentences, tok.encode_batch(sentences)):
    assert np.all(np.diff(enc.offsets[:, 0]) >= 0)
    for idx, (s, e) in zip(enc.ids, enc.offsets):
      piece = tok.id_to_token(idx)
      if idx == tok.unk_id:
        continue
      assert _fold(text[s:e]) == piece.removeprefix("##"), (text, piece, text[s:e])
      checked += 1
  assert checked > 50_000


def test_wordpiece_decode_matches_hf(sentences, vocab_path, hf_ref):
  ref = hf_ref
  tok = load_tokenizer(f"wordpiece:{vocab_path}")
  for text in sentences[::160]:  # HF's slow decode costs ~40 ms a call
    ids = tok.encode(text).ids
    assert tok.decode(ids) == ref.decode(ids.tolist())
  masked = tok.encode("the [MASK] of paris")
  assert masked.ids.tolist()[1] == tok.mask_id
  assert tok.decode(np.concatenate([[tok.cls_id], masked.ids, [tok.sep_id, tok.pad_id]])) == "the [MASK] of paris"


def test_save_load_and_specs(tmp_path, vocab_path):
  tok = load_tokenizer("minilm")
  saved = tok.save(tmp_path / "wp")
  for spec in (saved, str(vocab_path), f"wordpiece:{vocab_path}", vocab_path.parent):
    again = load_tokenizer(spec)
    assert isinstance(again, WordPieceTokenizer)
    assert again.spec() == tok.spec()
    assert again.encode("Zürich in 1990").ids.tolist() == tok.encode("Zürich in 1990").ids.tolist()
  with pytest.raises(TokenizerError, match="unknown tokenizer 'nope'"):
    load_tokenizer("nope")
  bad = tmp_path / "vocab.txt"
  bad.write_text("a\nb\n[CLS]\n")
  with pytest.raises(TokenizerError, match=r"lacks the special tokens .*\[SEP\]"):
    load_tokenizer(bad)


@pytest.fixture(scope="module")
def spm_tok(sentences, tmp_path_factory):
  return train_sentencepiece(sentences, 2000, tmp_path_factory.mktemp("spm") / "tok")


def test_sentencepiece_training_specials_and_offsets(spm_tok, sentences):
  tok = spm_tok
  assert tok.vocab_size == 2000
  assert [tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id] == [0, 1, 2, 3, 4]
  assert [tok.id_to_token(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  enc = tok.encode("Achilles [MASK] Troy")
  assert tok.mask_id in enc.ids.tolist()
  checked = 0
  for text in sentences:
    enc = tok.encode(text)
    assert np.all(enc.offsets[:, 0] <= enc.offsets[:, 1])
    assert np.all(np.diff(enc.offsets[:, 0]) >= 0)
    if unicodedata.normalize("NFKC", text) != text or "  " in text:
      continue  # NFKC/whitespace normalisation changes the surface; offsets are then approximate.
    # Offsets cover the text: joining the token spans, separated by the gaps, gives the text back.
    rebuilt = "".join(text[s:e] for s, e in enc.offsets)
    assert rebuilt == text.replace(" ", ""), text
    for idx, (s, e) in zip(enc.ids, enc.offsets):
      if idx != tok.unk_id:
        assert text[s:e] == tok.id_to_token(idx).lstrip("\u2581")
    if tok.unk_id not in enc.ids:  # [UNK] decodes to " ⁇ ", not to the unknown character.
      assert tok.decode(enc.ids) == text
      checked += 1
  assert checked > len(sentences) // 2


def test_sentencepiece_round_trip_through_files(spm_tok, tmp_path):
  path = spm_tok.save(tmp_path / "copy")
  for spec in (path, path / "spm.model", f"sentencepiece:{path / 'spm.model'}"):
    again = load_tokenizer(spec)
    assert isinstance(again, SentencePieceTokenizer)
    assert again.spec() == spm_tok.spec()
    text = "Aristotle taught Alexander"
    assert again.encode(text).ids.tolist() == spm_tok.encode(text).ids.tolist()


def test_sentencepiece_refuses_empty_input(tmp_path):
  with pytest.raises(TokenizerError, match="no text"):
    train_sentencepiece(["", "  "], 100, tmp_path / "x")


def test_cli_train_and_encode(tmp_path, sentences, capsys):
  from realm_jax.cli.main import main

  docs = tmp_path / "docs.jsonl"
  with docs.open("w") as f:
    for i in range(0, 2000, 50):
      f.write(json.dumps({"title": f"doc {i}", "text": " ".join(sentences[i:i + 50])}) + "\n")
  out = tmp_path / "tok"
  assert main(["tokenizer", "train", "--input", str(docs), "--vocab-size", "500", "--out", str(out)]) == 0
  assert "500-piece" in capsys.readouterr().out
  assert main(["tokenizer", "encode", "--tokenizer", str(out), "Plato and [MASK]"]) == 0
  row = json.loads(capsys.readouterr().out)
  tok = load_tokenizer(out)
  assert row["ids"] == tok.encode("Plato and [MASK]").ids.tolist()
  assert row["tokens"][-1] == "[MASK]"
  proc = subprocess.run([sys.executable, "-m", "realm_jax.cli.main", "tokenizer", "encode", "--tokenizer",
                         str(tmp_path / "missing"), "x"], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 2 and "unknown tokenizer" in proc.stderr and "Traceback" not in proc.stderr
