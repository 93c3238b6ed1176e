"""`realm-jax corpus`: build a block corpus from JSONL, text or a MediaWiki dump; inspect it."""

from __future__ import annotations

import argparse
import json
import sys


def _build(args: argparse.Namespace) -> int:
  from realm_jax.cli.progress import blocks_bar
  from realm_jax.data.corpus import build_corpus

  with blocks_bar("building corpus", enabled=not args.quiet) as progress:
    manifest = build_corpus(args.input, args.storage, prefix=args.prefix, tokenizer=args.tokenizer,
                            block_len=args.block_len, tagger=args.tagger, shard_blocks=args.shard_blocks,
                            overwrite=args.overwrite, progress=progress, workers=args.workers,
                            title_spans=not args.no_title_spans)
  s = manifest["stats"]
  frac = s["sentences_with_salient"] / max(1, s["sentences"])
  print(f"wrote {manifest['num_blocks']:,} blocks in {len(manifest['shards'])} shards to "
        f"{args.storage.rstrip('/')}/{args.prefix}: {s['documents']:,} documents, "
        f"{s['sentences']:,} sentences ({frac:.1%} with a salient span), "
        f"{s['seconds']:.1f} s, {s['blocks_per_second']:,.0f} blocks/s "
        f"({manifest['num_blocks'] / max(s['cpu_seconds'], 1e-9):,.0f} per CPU-second)")
  return 0


def _convert(args: argparse.Namespace) -> int:
  from realm_jax.data.corpus_v1 import convert_corpus_v1

  convert_corpus_v1(args.storage, args.prefix)
  return 0


def _info(args: argparse.Namespace) -> int:
  from realm_jax.data.corpus import CorpusReader

  reader = CorpusReader(args.storage, prefix=args.prefix)
  m = dict(reader.manifest)
  m["shards"] = f"{reader.num_shards} shards"
  json.dump(m, sys.stdout, indent=1)
  print()
  return 0


def _show(args: argparse.Namespace) -> int:
  from realm_jax.data.corpus import CorpusReader

  reader = CorpusReader(args.storage, prefix=args.prefix)
  for block in reader.get_blocks(args.ids):
    spans = [block.text[s:e] for s, e in block.salient_spans]
    print(json.dumps({"block_id": block.block_id, "title": block.title, "text": block.text,
                      "tokens": int(len(block.title_ids) + len(block.body_ids) + 3),
                      "sentences": len(block.sentences), "salient": spans}, ensure_ascii=False))
  return 0


def _tfds(args: argparse.Namespace) -> int:
  import tempfile

  import tensorflow_datasets as tfds

  from realm_jax.data.corpus import CorpusReader
  from realm_jax.data.tfds_corpus import RealmBlocks
  from realm_jax.storage import Storage

  storage = Storage.open(args.storage)
  reader = CorpusReader(storage, prefix=args.prefix)  # checks the manifest before any work
  remote = "://" in args.data_dir and not args.data_dir.startswith("file://")
  with tempfile.TemporaryDirectory(prefix="realm-tfds-") as tmp:
    local = tmp if remote else args.data_dir
    builder = RealmBlocks(data_dir=local, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=storage.uri(args.prefix)))
    if remote:  # array_record writes local files only: copy the prepared dataset up.
      Storage.open(args.data_dir).upload_dir(f"{tmp}/{RealmBlocks.name}", RealmBlocks.name)
  print(f"prepared {reader.num_blocks:,} blocks as {RealmBlocks.name} in {args.data_dir}; read with "
        f"tfds.data_source({RealmBlocks.name!r}, data_dir={args.data_dir!r})['train']")
  return 0


def register(sub) -> None:
  parser = sub.add_parser("corpus", help="Build a block corpus from JSONL, text or a MediaWiki dump")
  cmds = parser.add_subparsers(dest="corpus_command", metavar="ACTION", required=True)

  build = cmds.add_parser(
      "build", help="documents -> sharded blocks under STORAGE/corpus",
      description="Inputs by extension: .jsonl ({\"title\",\"text\"} per line), .txt (blank-line "
      "separated documents, first line = title), .xml/.xml.bz2 (MediaWiki dump).")
  build.add_argument("--input", nargs="+", required=True, metavar="FILE", help="document files")
  build.add_argument("--storage", required=True, metavar="URI", help="storage root (dir or gs://)")
  build.add_argument("--prefix", default="corpus", help="folder under the root (default: corpus)")
  build.add_argument("--tokenizer", default="minilm",
                     help="tokenizer dir, vocab.txt, .model, or 'minilm' (bert-base-uncased vocab)")
  build.add_argument("--block-len", type=int, default=288, help="tokens per block with specials")
  build.add_argument("--tagger", default="rule", help="salient-span tagger: rule, rule-nonumbers, spacy")
  build.add_argument("--no-title-spans", action="store_true",
                     help="do not add mentions of the article title as salient spans")
  build.add_argument("--shard-blocks", type=int, default=10_000, help="blocks per shard")
  build.add_argument("--workers", type=int, default=1,
                     help="processes stripping MediaWiki markup (the slow step for dumps)")
  build.add_argument("--overwrite", action="store_true", help="replace an existing corpus")
  build.add_argument("--quiet", action="store_true", help="no progress bar")
  build.set_defaults(func=_build)

  prep = cmds.add_parser("tfds", help="prepare the corpus as the TFDS ArrayRecord dataset realm_blocks",
                         description="Prepare once, then read on every host with tfds.data_source "
                         "(no TensorFlow needed).")
  prep.add_argument("--storage", required=True, metavar="URI", help="storage root holding the corpus")
  prep.add_argument("--prefix", default="corpus")
  prep.add_argument("--data-dir", required=True, metavar="DIR", help="TFDS data dir (local or gs://)")
  prep.set_defaults(func=_tfds)

  convert = cmds.add_parser("convert", help="convert a format-1 corpus (shard-*.npz) to format 2 in place",
                            description="Writes the format-2 files next to the old ones, then the new "
                            "manifest; the old shard-*.npz files are left for you to delete.")
  convert.add_argument("--storage", required=True, metavar="URI", help="storage root holding the corpus")
  convert.add_argument("--prefix", default="corpus")
  convert.set_defaults(func=_convert)

  info = cmds.add_parser("info", help="print the corpus manifest")
  info.add_argument("--storage", required=True, metavar="URI")
  info.add_argument("--prefix", default="corpus")
  info.set_defaults(func=_info)

  show = cmds.add_parser("show", help="print blocks by id as JSON lines")
  show.add_argument("--storage", required=True, metavar="URI")
  show.add_argument("--prefix", default="corpus")
  show.add_argument("ids", nargs="+", type=int)
  show.set_defaults(func=_show)
