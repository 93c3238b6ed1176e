"""`realm-jax convert tf|hf|index` and `realm-jax export hf`: checkpoints in and out of realm-jax."""

from __future__ import annotations

import argparse


def _convert_tf(args: argparse.Namespace) -> int:
  from realm_jax.convert import tf as tfconv

  config = tfconv.parse_config(args.config) if args.config else None
  tfconv.convert_tf(args.checkpoint, args.kind, args.out, config=config)
  return 0


def _convert_hf(args: argparse.Namespace) -> int:
  from realm_jax.convert import export_hf, tf as tfconv

  config = tfconv.parse_config(args.config) if args.config else None
  export_hf.convert_hf(args.path, args.out, kind=args.kind, config=config)
  return 0


def _convert_index(args: argparse.Namespace) -> int:
  from realm_jax.convert import index, tf as tfconv

  config = tfconv.parse_config(args.config) if args.config else None
  index.convert_index(args.checkpoint, args.storage, var=args.var, blocks=args.blocks, titles=args.titles,
                      rows_per_shard=args.rows_per_shard, build_scann=not args.no_scann,
                      tokenizer=args.tokenizer, tagger=args.tagger, config=config, step=args.step)
  return 0


def _export_hf(args: argparse.Namespace) -> int:
  from realm_jax.convert import export_hf

  export_hf.export_hf(args.weights, args.kind, args.out)
  return 0


def register(sub: argparse._SubParsersAction) -> None:
  from realm_jax.convert.names import EXPORT_KINDS, HF_KINDS, TF_KINDS

  parser = sub.add_parser("convert", help="Convert TF/HF REALM, ORQA or BERT weights (and the ORQA index) to realm-jax")
  cmds = parser.add_subparsers(dest="convert_command", metavar="SOURCE", required=True)

  tf = cmds.add_parser("tf", help="original TF REALM/ORQA checkpoints -> realm-jax weights",
                       description="Variables of every --checkpoint are merged (e.g. the REALM embedder "
                       "module and the encoder checkpoint for --kind realm). Optimizer slots are skipped.")
  tf.add_argument("--checkpoint", action="append", required=True, metavar="PATH",
                  help="checkpoint prefix, Estimator dir or TF-Hub module dir (local or storage URI); repeatable")
  tf.add_argument("--kind", required=True, choices=TF_KINDS)
  tf.add_argument("--out", required=True, metavar="URI", help="new weights directory (local or gs://)")
  tf.add_argument("--config", help="preset name, JSON file or inline JSON (default: inferred from shapes)")
  tf.set_defaults(func=_convert_tf)

  hf = cmds.add_parser("hf", help="a local HuggingFace directory (google/realm-* or plain BERT) -> realm-jax weights")
  hf.add_argument("--path", required=True, metavar="DIR", help="directory with config.json and weights")
  hf.add_argument("--kind", choices=HF_KINDS, help="default: detected from config.json `architectures`")
  hf.add_argument("--out", required=True, metavar="URI")
  hf.add_argument("--config", help="only for plain BERT: preset / JSON for the non-BERT sizes")
  hf.set_defaults(func=_convert_hf)

  ix = cmds.add_parser("index", help="ORQA/REALM block_emb + blocks.tfr -> our corpus, embeddings and ScaNN index",
                       description="Streams the embedding variable in row slices (never two copies in "
                       "memory) into embedding shards, and the TFRecords of block texts into our corpus.")
  ix.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint prefix holding the embeddings")
  ix.add_argument("--var", default="block_emb", help="variable name (default block_emb)")
  ix.add_argument("--blocks", metavar="TFR", help="blocks.tfr (one UTF-8 block text per record); without it only "
                  "embedding shards are written, under imported-embeddings/")
  ix.add_argument("--titles", metavar="TFR", help="titles.tfr (one title per record, same order)")
  ix.add_argument("--storage", required=True, metavar="URI", help="storage root to write into")
  ix.add_argument("--rows-per-shard", type=int, default=50_000, help="blocks per corpus / embedding shard")
  ix.add_argument("--tokenizer", default="minilm", help="tokenizer for the corpus (default: bert-base-uncased vocab)")
  ix.add_argument("--tagger", default=None, help="salient-span tagger for the corpus (rule, spacy); default none")
  ix.add_argument("--config", help="model config the embeddings belong to (preset/JSON; default base), "
                  "recorded as the index's config fingerprint")
  ix.add_argument("--step", type=int, default=0, help="checkpoint step recorded in the index version")
  ix.add_argument("--no-scann", action="store_true", help="write the embedding shards only")
  ix.set_defaults(func=_convert_index)

  export = sub.add_parser("export", help="Export realm-jax weights to a HuggingFace directory (transformers 4.40.2)")
  ecmds = export.add_subparsers(dest="export_command", metavar="TARGET", required=True)
  ehf = ecmds.add_parser("hf", help="realm-jax weights -> HuggingFace Realm* directory")
  ehf.add_argument("--weights", required=True, metavar="URI", help="realm-jax weights directory")
  ehf.add_argument("--kind", required=True, choices=EXPORT_KINDS)
  ehf.add_argument("--out", required=True, metavar="DIR", help="new local directory or storage URI")
  ehf.set_defaults(func=_export_hf)
