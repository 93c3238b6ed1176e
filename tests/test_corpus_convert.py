"""Format-1 corpora (one shard-*.npz each, int32 ids beside the text) are refused with the command
that converts them, and `realm-jax corpus convert` turns them into the same format-2 corpus a
fresh build makes; nothing of the old corpus is deleted."""

import hashlib
import io
import json

import numpy as np
import pytest

from realm_jax.cli.main import main
from realm_jax.data.corpus import CorpusError, CorpusReader, build_corpus
from realm_jax.storage import Storage


def _ragged(rows, dtype, width=None):
  splits = np.zeros(len(rows) + 1, np.int64)
  splits[1:] = np.cumsum([len(r) for r in rows])
  flat = np.concatenate([np.asarray(r, dtype).reshape(-1, width) if width else np.asarray(r, dtype)
                         for r in rows])
  return flat, splits


def write_format_1(storage: Storage, blocks, manifest2: dict, shard_blocks: int) -> None:
  """The format-1 layout, written field by field as realm-jax 0.1 wrote it."""
  shards = []
  for first in range(0, len(blocks), shard_blocks):
    part = blocks[first:first + shard_blocks]
    arrays = {"block_ids": np.asarray([b.block_id for b in part], np.int64)}
    for name, rows, dt, width in [("title_ids", [b.title_ids for b in part], np.int32, None),
                                  ("body_ids", [b.body_ids for b in part], np.int32, None),
                                  ("sentences", [b.sentences for b in part], np.int32, 2),
                                  ("salient_spans", [b.salient_spans for b in part], np.int32, 2),
                                  ("titles", [np.frombuffer(b.title.encode(), np.uint8) for b in part], np.uint8, None),
                                  ("texts", [np.frombuffer(b.text.encode(), np.uint8) for b in part], np.uint8, None)]:
      arrays[name], arrays[name + "_splits"] = _ragged(rows, dt, width)
    arrays["body_offsets"], _ = _ragged([b.body_offsets for b in part], np.int32, 2)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    name = f"shard-{len(shards):05d}.npz"
    storage.write_bytes(f"old/{name}", data)
    shards.append({"path": name, "first_block": first, "num_blocks": len(part), "size": len(data),
                   "sha256": hashlib.sha256(data).hexdigest()})
  for name in manifest2["tokenizer"]["files"]:
    storage.write_bytes(f"old/tokenizer/{name}", storage.read_bytes(f"corpus/tokenizer/{name}"))
  storage.write_json("old/manifest.json", {
      "format": "realm-jax-corpus", "version": 1, "num_blocks": len(blocks), "block_len": manifest2["block_len"],
      "tokenizer": manifest2["tokenizer"], "tagger": manifest2["tagger"], "shard_blocks": shard_blocks,
      "shards": shards, "stats": manifest2["stats"], "inputs": manifest2["inputs"]})


def test_format_1_is_refused_then_converted(tmp_path, capsys):
  docs = tmp_path / "docs.jsonl"
  docs.write_text("".join(json.dumps({"title": f"Person {i}", "text": f"Person {i} was born in Paris in 19{i:02d}. "
                                      f"Later they moved to Rome. They wrote {i} books."}) + "\n" for i in range(30)))
  root = tmp_path / "root"
  storage = Storage.open(str(root))
  manifest = build_corpus([str(docs)], storage, block_len=24, shard_blocks=8)
  fresh = list(CorpusReader(storage).iter_blocks())
  write_format_1(storage, fresh, manifest, shard_blocks=8)
  with pytest.raises(CorpusError, match=rf"format-1 corpus .*realm-jax corpus convert --storage {root} --prefix old"):
    CorpusReader(storage, "old")
  assert main(["corpus", "convert", "--storage", str(root), "--prefix", "old"]) == 0
  assert "can be deleted" in capsys.readouterr().out
  converted = CorpusReader(storage, "old")
  assert converted.manifest["converted_from"] == 1 and converted.token_dtype == np.uint16
  assert [s["num_blocks"] for s in converted.shards] == [s["num_blocks"] for s in manifest["shards"]]
  for a, b in zip(converted.iter_blocks(), fresh):
    assert (a.block_id, a.title, a.text) == (b.block_id, b.title, b.text)
    for field in ("title_ids", "body_ids", "body_offsets", "sentences", "salient_spans", "sentence_tokens",
                  "salient_tokens"):
      np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
  n = len(fresh)
  np.testing.assert_array_equal(converted.token_rows(0, n), CorpusReader(storage).token_rows(0, n))
  assert len(list((root / "old").glob("shard-*.npz"))) == -(-n // 8) > 1  # the old files are still there
  assert main(["corpus", "convert", "--storage", str(root), "--prefix", "old"]) == 2  # already format 2
  assert "not a format-1 corpus" in capsys.readouterr().err


def test_overwriting_a_format_1_corpus_builds_format_2_beside_it_then_removes_it(tmp_path):
  docs = tmp_path / "docs.jsonl"
  docs.write_text("".join(json.dumps({"title": f"Person {i}", "text": f"Person {i} was born in Paris in 19{i:02d}."})
                          + "\n" for i in range(20)))
  root = tmp_path / "root"
  storage = Storage.open(str(root))
  manifest = build_corpus([str(docs)], storage, block_len=24, shard_blocks=8)
  write_format_1(storage, list(CorpusReader(storage).iter_blocks()), manifest, shard_blocks=8)
  assert list((root / "old").glob("shard-*.npz"))
  new = build_corpus([str(docs)], storage, prefix="old", block_len=24, shard_blocks=8, overwrite=True)
  tag = new["tokenizer"]["dir"].removeprefix("tokenizer-")
  assert len(tag) == 8 and all(s[k]["path"].startswith(f"{k}-{tag}-") for s in new["shards"] for k in s
                               if k in ("tokens", "spans", "text"))
  listed = {s[k]["path"] for s in new["shards"] for k in ("tokens", "spans", "text")}
  assert {p.name for p in (root / "old").iterdir() if p.is_file()} == listed | {"manifest.json"}
  assert {p.name for p in (root / "old").iterdir() if p.is_dir()} == {new["tokenizer"]["dir"]}
  reader = CorpusReader(storage, "old")
  reader.tokenizer()
  assert [b.title for b in reader.iter_blocks()] == [b.title for b in CorpusReader(storage).iter_blocks()]
