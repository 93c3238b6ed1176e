"""Format-1 corpora (one `shard-*.npz` per shard, int32 title/body ids held beside the text) read
once more, to convert them in place to format 2 (`realm-jax corpus convert`).

Conversion writes the format-2 files of every shard next to the old ones, then replaces the
manifest (the only file it overwrites, as asked); the old `shard-*.npz` stay until the user
deletes them. A conversion killed half-way leaves the format-1 manifest in charge, and a rerun
starts over.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np

from realm_jax.data.blocks import Block
from realm_jax.data.corpus import ShardWriter, write_tokenizer
from realm_jax.data.corpus_reader import MANIFEST, open_storage
from realm_jax.data.shards import CorpusError
from realm_jax.data.tokenizer import tokenizer_from_files

_RAGGED = ("title_ids", "body_ids", "sentences", "salient_spans", "titles", "texts")


def _v1_blocks(data: bytes, where: str) -> list[Block]:
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      a = {k: npz[k] for k in npz.files}
  except (ValueError, OSError, EOFError) as e:
    raise CorpusError(f"{where}: not a valid format-1 corpus shard: {e}") from None
  missing = [k for k in ["block_ids", "body_offsets"] + [f for n in _RAGGED for f in (n, n + "_splits")] if k not in a]
  if missing:
    raise CorpusError(f"{where}: format-1 corpus shard lacks arrays {missing}")

  def row(name: str, i: int, splits: str | None = None) -> np.ndarray:
    s = a[(splits or name) + "_splits"]
    return a[name][s[i]:s[i + 1]]

  return [Block(int(a["block_ids"][i]), row("titles", i).tobytes().decode("utf-8"),
                row("texts", i).tobytes().decode("utf-8"), row("title_ids", i), row("body_ids", i),
                row("body_offsets", i, "body_ids"), row("sentences", i), row("salient_spans", i))
          for i in range(len(a["block_ids"]))]


def convert_corpus_v1(storage, prefix: str = "corpus", log: Callable[[str], None] = print) -> dict:
  """Converts the format-1 corpus under `<storage>/<prefix>/` to format 2 in place; returns the
  new manifest. A corpus already in format 2 is left alone (CorpusError says so)."""
  import hashlib

  storage = open_storage(storage)
  prefix = prefix.strip("/")
  path = f"{prefix}/{MANIFEST}"
  if not storage.exists(path):
    raise CorpusError(f"{storage.uri(path)}: no corpus manifest")
  old = storage.read_json(path)
  if not isinstance(old, dict) or old.get("version") != 1:
    raise CorpusError(f"{storage.uri(path)}: not a format-1 corpus (version {old.get('version')!r}); "
                      "nothing to convert")
  files = {}
  tok_dir = f"{prefix}/{old['tokenizer'].get('dir', 'tokenizer')}"  # `tokenizer-<tag>/` after an --overwrite
  for name, info in old["tokenizer"]["files"].items():
    data = storage.read_bytes(f"{tok_dir}/{name}")
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
      raise CorpusError(f"{storage.uri(f'{tok_dir}/{name}')}: checksum mismatch")
    files[name] = data
  tok = tokenizer_from_files(files)
  writer = ShardWriter(storage, prefix, int(old.get("shard_blocks", 10_000)), int(old["block_len"]), tok)
  for shard in old["shards"]:
    where = storage.uri(f"{prefix}/{shard['path']}")
    data = storage.read_bytes(f"{prefix}/{shard['path']}")
    if len(data) != shard["size"] or hashlib.sha256(data).hexdigest() != shard["sha256"]:
      raise CorpusError(f"{where}: size/sha256 differ from the manifest (corrupt shard): not converted")
    for block in _v1_blocks(data, where):
      writer.add(block)
    writer.flush()  # the same shard boundaries as before
  if writer.next_id != old["num_blocks"]:
    raise CorpusError(f"{storage.uri(path)}: shards hold {writer.next_id} blocks, manifest says {old['num_blocks']}")
  extra = {k: old[k] for k in ("title_spans",) if k in old}
  manifest = writer.manifest(write_tokenizer(storage, prefix, tok), old.get("tagger", "unknown"),
                             old.get("stats", {}), old.get("inputs", []), converted_from=1, **extra)
  storage.write_json(path, manifest)
  log(f"converted {manifest['num_blocks']:,} blocks in {len(manifest['shards'])} shards under {storage.uri(prefix)} "
      f"to format 2; the format-1 files ({', '.join(s['path'] for s in old['shards'][:2])}"
      f"{', ...' if len(old['shards']) > 2 else ''}) are no longer read and can be deleted")
  return manifest
