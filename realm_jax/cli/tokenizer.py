"""`realm-jax tokenizer`: train a SentencePiece tokenizer on documents; encode text with any tokenizer."""

from __future__ import annotations

import argparse
import json


def _train(args: argparse.Namespace) -> int:
  from realm_jax.data.corpus import split_sentences
  from realm_jax.data.documents import read_documents
  from realm_jax.data.tokenizer import train_sentencepiece

  def sentences():
    for doc in read_documents(args.input):
      yield doc.title
      for s, e in split_sentences(doc.text):
        yield doc.text[s:e]

  tok = train_sentencepiece(sentences(), args.vocab_size, args.out, model_type=args.model_type)
  print(f"wrote a {tok.vocab_size}-piece SentencePiece tokenizer to {args.out} "
        f"([PAD]={tok.pad_id} [UNK]={tok.unk_id} [CLS]={tok.cls_id} [SEP]={tok.sep_id} [MASK]={tok.mask_id})")
  return 0


def _encode(args: argparse.Namespace) -> int:
  from realm_jax.data.tokenizer import load_tokenizer

  tok = load_tokenizer(args.tokenizer)
  for text in args.text:
    enc = tok.encode(text)
    print(json.dumps({"text": text, "ids": enc.ids.tolist(),
                      "tokens": [tok.id_to_token(i) for i in enc.ids],
                      "offsets": enc.offsets.tolist(), "decoded": tok.decode(enc.ids)}, ensure_ascii=False))
  return 0


def register(sub) -> None:
  parser = sub.add_parser("tokenizer", help="Train or inspect tokenizers")
  cmds = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

  train = cmds.add_parser("train", help="train a SentencePiece tokenizer on document files")
  train.add_argument("--input", nargs="+", required=True, metavar="FILE",
                     help="document files (.jsonl, .txt, .xml, .xml.bz2), as for `corpus build`")
  train.add_argument("--vocab-size", type=int, required=True, metavar="N")
  train.add_argument("--out", required=True, metavar="DIR", help="directory to write the tokenizer to")
  train.add_argument("--model-type", default="unigram", choices=("unigram", "bpe"))
  train.set_defaults(func=_train)

  encode = cmds.add_parser("encode", help="print ids, tokens and char offsets of texts (JSON lines)")
  encode.add_argument("--tokenizer", default="minilm", help="tokenizer dir, vocab.txt, .model or 'minilm'")
  encode.add_argument("text", nargs="+")
  encode.set_defaults(func=_encode)
