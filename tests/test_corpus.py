"""The block corpus on real Wikipedia text: ORQA packing, no text lost, salient spans, the sharded
format on local / gs:// / memory:// roots, bounded memory, TFDS, and bad-input errors."""

import bz2
import collections
import json
import os
import re
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from realm_jax.data import sources
from realm_jax.data.corpus import CorpusError, CorpusReader, build_corpus, split_sentences
from realm_jax.data.documents import DocumentError, read_documents, read_mediawiki
from realm_jax.data.tokenizer import load_tokenizer
from realm_jax.errors import RealmError
from realm_jax.storage import Storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK_LEN = 288


def _norm(text: str) -> str:
  return " ".join(text.split())


@pytest.fixture(scope="module")
def vocab():
  return str(sources.minilm_dir() / "vocab.txt")


@pytest.fixture(scope="module")
def wiki_articles():
  """The articles of the gensim Wikipedia excerpt, read (and stripped of markup) once."""
  return list(read_mediawiki(str(sources.wikipedia_excerpt())))


@pytest.fixture(scope="module")
def wiki_docs(wiki_articles):
  """title -> stripped text."""
  return {d.title: d.text for d in wiki_articles}


@pytest.fixture(scope="module")
def wiki(tmp_path_factory, vocab, wiki_articles):
  """The excerpt built into a local corpus (small shards: several of them)."""
  root = tmp_path_factory.mktemp("wiki")
  manifest = build_corpus(wiki_articles, str(root), tokenizer=vocab, block_len=BLOCK_LEN,
                          shard_blocks=500)
  reader = CorpusReader(str(root))
  return manifest, reader, list(reader.iter_blocks())


def test_blocks_fit_and_carry_titles(wiki, vocab):
  manifest, reader, blocks = wiki
  tok = load_tokenizer(vocab)
  assert manifest["num_blocks"] == reader.num_blocks == len(blocks) > 1000
  assert [b.block_id for b in blocks] == list(range(len(blocks)))
  for b in blocks:
    assert len(b.title_ids) + len(b.body_ids) + 3 <= BLOCK_LEN
    assert b.title and b.title_ids.tolist() == tok.encode(b.title).ids.tolist()
    assert len(b.body_ids) == len(b.body_offsets) > 0
    # Every body token's offsets point inside the block text at that token's characters.
    assert np.all(b.body_offsets[:, 0] <= b.body_offsets[:, 1])
    assert np.all(b.body_offsets[:, 1] <= len(b.text))
  # Greedy packing: blocks are mostly full (only an article's last block may be short).
  sizes = [len(b.title_ids) + len(b.body_ids) + 3 for b in blocks]
  assert np.median(sizes) > 0.85 * BLOCK_LEN
  assert reader.tokenizer().spec() == tok.spec()


def test_no_text_lost_or_duplicated(wiki, wiki_docs):
  _, _, blocks = wiki
  by_title = collections.defaultdict(list)
  for b in blocks:
    by_title[b.title].append(b)
  assert set(by_title) == {t for t, text in wiki_docs.items() if text.strip()}
  for title, text in wiki_docs.items():
    ids = [b.block_id for b in by_title[title]]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # an article's blocks are consecutive
    assert _norm(" ".join(b.text for b in by_title[title])) == _norm(text), title


def test_tokens_are_the_tokenization_of_the_block_text(wiki, vocab):
  _, _, blocks = wiki
  tok = load_tokenizer(vocab)
  assert wiki[0]["stats"]["split_sentences"] > 0  # some sentences were longer than a block
  for b in blocks:  # over-long sentences are cut between words, so this holds for every block.
    assert tok.encode(b.text).ids.tolist() == b.body_ids.tolist(), b.block_id


def test_sentencepiece_corpus(tmp_path, wiki_articles):
  from realm_jax.data.tokenizer import train_sentencepiece

  docs = wiki_articles[:6]
  tok = train_sentencepiece((s for d in docs for s in d.text.split("\n")), 1000, tmp_path / "spm")
  build_corpus(docs, str(tmp_path / "root"), tokenizer=str(tmp_path / "spm"), block_len=128)
  reader = CorpusReader(str(tmp_path / "root"))
  assert reader.tokenizer().spec() == tok.spec() and reader.manifest["tokenizer"]["kind"] == "sentencepiece"
  blocks = list(reader.iter_blocks())
  assert len(blocks) > 50
  for b in blocks:
    assert len(b.title_ids) + len(b.body_ids) + 3 <= 128
    # A block's tokens are its sentences' tokens, sentence by sentence.
    ids = np.concatenate([tok.encode(b.text[s:e]).ids for s, e in b.sentences])
    assert ids.tolist() == b.body_ids.tolist()
  for title in {d.title for d in docs}:
    joined = " ".join(b.text for b in blocks if b.title == title)
    assert _norm(joined) == _norm(next(d.text for d in docs if d.title == title))


def test_sentences_and_salient_spans(wiki):
  manifest, _, blocks = wiki
  sentences = with_span = 0
  for b in blocks:
    starts = b.sentences[:, 0]
    assert np.all(np.diff(starts) > 0) and np.all(b.sentences[:, 0] < b.sentences[:, 1])
    assert b.sentences[-1, 1] <= len(b.text)
    owner = np.searchsorted(starts, b.salient_spans[:, 0], side="right") - 1
    for (s, e), k in zip(b.salient_spans, owner):
      assert k >= 0 and e <= b.sentences[k, 1], (b.text[s:e], b.title)  # inside one sentence
      assert b.text[s:e].strip() == b.text[s:e] != ""
    sentences += len(b.sentences)
    with_span += len(set(owner.tolist()))
  fraction = with_span / sentences
  print(f"\nsalient spans: {fraction:.1%} of {sentences} block sentences have one "
        f"({manifest['stats']['salient_spans']} spans; build: {manifest['stats']['blocks_per_second']} blocks/s)")
  assert fraction > 0.6


def test_lists_and_disambiguation_pages_are_skipped(tmp_path):
  page = ("<page><title>{title}</title><ns>{ns}</ns><id>1</id>{redirect}<revision><text>{text}"
          "</text></revision></page>")
  pages = [
      dict(title="Paris", ns=0, redirect="", text=(
          "'''Paris''' ({{IPA-fr|paʁi}}; {{lang|la|Lutetia}}) is the capital of [[France]]."
          "&lt;ref&gt;A source.&lt;/ref&gt; "
          "It has {{convert|105|km2}} of area.\n\n== History ==\nIt was founded early.\n"
          "[[File:Paris.jpg|thumb|The [[Seine]] river]]\n[[Category:Capitals]]\n[[de:Paris]]")),
      dict(title="List of cities", ns=0, redirect="", text="Paris, Rome."),
      dict(title="Mercury (disambiguation)", ns=0, redirect="", text="Mercury may be a planet."),
      dict(title="Talk:Paris", ns=1, redirect="", text="A discussion."),
      dict(title="Paname", ns=0, redirect='<redirect title="Paris" />', text="#REDIRECT [[Paris]]"),
  ]
  xml = "<mediawiki xmlns=\"http://www.mediawiki.org/xml/export-0.10/\">" + "".join(
      page.format(**p) for p in pages) + "</mediawiki>"
  path = tmp_path / "dump.xml.bz2"
  path.write_bytes(bz2.compress(xml.encode()))
  docs = list(read_documents([str(path)]))
  assert [d.title for d in docs] == ["Paris"]
  assert docs[0].text == "Paris is the capital of France. It has of area.\nHistory\nIt was founded early."


def test_real_excerpt_has_no_list_pages_and_no_markup(wiki_docs):
  assert len(wiki_docs) > 90
  assert not [t for t in wiki_docs if t.startswith("List of ") or t.endswith("(disambiguation)")]
  text = "\n".join(wiki_docs.values())
  for leftover in ("[[", "]]", "{{", "<ref", "Category:", "&lt;"):
    assert text.count(leftover) <= 2, leftover


def test_worker_processes_strip_the_same_text(tmp_path):
  raw = bz2.open(sources.wikipedia_excerpt()).read().decode("utf-8")
  pages = [p for p in re.findall(r"<page>.*?</page>", raw, re.DOTALL) if "<redirect" not in p]
  pages = [p for p in pages if len(p) < 20_000][:8]  # small articles: a fast test
  path = tmp_path / "part.xml"
  path.write_text(f"<mediawiki>{''.join(pages)}</mediawiki>", encoding="utf-8")
  serial = list(read_mediawiki(str(path)))
  parallel = list(read_mediawiki(str(path), workers=2, window=3))
  assert len(serial) >= 5
  assert [(d.title, d.text, d.source) for d in parallel] == [(d.title, d.text, d.source) for d in serial]


def test_text_documents_are_blank_line_separated_with_title_first(tmp_path, vocab):
  path = tmp_path / "docs.txt"
  path.write_text("Paris\nParis is the capital of France.\nIt is on the Seine.\n\n\nRome\n"
                  "Rome is in Italy.\n   \nEmpty title only\n")
  docs = list(read_documents([str(path)]))
  assert [(d.title, d.text) for d in docs] == [
      ("Paris", "Paris is the capital of France.\nIt is on the Seine."), ("Rome", "Rome is in Italy.")]
  assert docs[1].source == f"{path}:6"


def test_sentence_splitter_keeps_abbreviations():
  text = "Dr. Smith met J. R. R. Tolkien in St. Louis, e.g. at home. He left!  \"Why?\" she asked.\nNew line"
  assert [text[s:e] for s, e in split_sentences(text)] == [
      "Dr. Smith met J. R. R. Tolkien in St. Louis, e.g. at home.", "He left!", "\"Why?\" she asked.",
      "New line"]


def _small_docs(wiki_docs, n):
  titles = sorted(wiki_docs)[:n]
  return [{"title": t, "text": wiki_docs[t]} for t in titles]


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def test_reader_round_trip_on_every_root(storage_root, tmp_path, wiki_docs, vocab):
  docs = _write_jsonl(tmp_path / "docs.jsonl", _small_docs(wiki_docs, 4))
  manifest = build_corpus([docs], storage_root, tokenizer=vocab, shard_blocks=7)
  storage = Storage.open(storage_root)
  assert storage.read_json("corpus/manifest.json") == manifest
  reader = CorpusReader(storage)
  n = reader.num_blocks
  assert reader.num_shards == -(-n // 7) and n > 20
  assert [s["num_blocks"] for s in manifest["shards"]] == [7] * (n // 7) + ([n % 7] if n % 7 else [])
  every = list(reader.iter_blocks())
  build_corpus([docs], str(tmp_path / "ref"), tokenizer=vocab, shard_blocks=100)  # one shard, local
  reference = list(CorpusReader(str(tmp_path / "ref")).iter_blocks())
  assert len(every) == len(reference) == n
  for a, b in zip(every, reference):
    assert (a.block_id, a.title, a.text) == (b.block_id, b.title, b.text)
    for field in ("title_ids", "body_ids", "body_offsets", "sentences", "salient_spans"):
      np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  rng = np.random.default_rng(0)
  ids = rng.permutation(n)[:15].tolist() + [n - 1, 0, 0]
  got = CorpusReader(storage_root).get_blocks(ids)
  assert [b.block_id for b in got] == ids
  assert [b.text for b in got] == [every[i].text for i in ids]
  shard = reader.read_shard(1)
  assert shard.block_ids.tolist() == list(range(7, 14))
  assert shard.titles == [every[i].title for i in range(7, 14)]
  assert [x.tolist() for x in shard.body_ids] == [every[i].body_ids.tolist() for i in range(7, 14)]
  with pytest.raises(CorpusError, match=rf"block id {n} out of range"):
    reader.get_blocks([n])
  # Row ranges read only their chunks and give the rows of the whole-shard reads.
  assert reader.token_dtype == np.uint16 and manifest["token_dtype"] == "uint16"
  doc_rows = np.concatenate([reader.read_shard(i).tokens for i in range(reader.num_shards)])
  for lo, hi in [(0, n), (3, 17), (n - 1, n), (5, 5)]:
    np.testing.assert_array_equal(reader.token_rows(lo, hi), doc_rows[lo:hi])
    view = reader.training_view(lo, hi)
    assert view.text is None and view.block_ids.tolist() == list(range(lo, hi))
    for i, block in enumerate(view):
      want = every[lo + i]
      assert block.text is None and block.block_id == want.block_id
      for field in ("title_ids", "body_ids", "sentence_tokens", "salient_tokens"):
        np.testing.assert_array_equal(getattr(block, field), getattr(want, field), err_msg=field)
  with pytest.raises(CorpusError, match=r"block range \[3, 9999\) is outside"):
    reader.token_rows(3, 9999)


def test_corrupt_or_missing_shards_are_refused(tmp_path, wiki_docs, vocab):
  docs = _write_jsonl(tmp_path / "docs.jsonl", _small_docs(wiki_docs, 2))
  root = tmp_path / "root"
  build_corpus([docs], str(root), tokenizer=vocab, shard_blocks=4)
  for name in ("text-00001.npz", "spans-00001.npz", "tokens-00001.npy"):
    shard = root / "corpus" / name
    data = bytearray(shard.read_bytes())
    data[-40] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader = CorpusReader(str(root))
    reader.read_shard(0)
    with pytest.raises(CorpusError, match=rf"{name}: size/sha256 differ"):
      reader.read_shard(1)
    data[-40] ^= 0xFF
    shard.write_bytes(bytes(data))
  reader.read_shard(1)
  # A flipped byte in the token rows fails the chunk checksum of a range read, and only that chunk.
  tokens = root / "corpus" / "tokens-00001.npy"
  data = bytearray(tokens.read_bytes())
  data[-1] ^= 0xFF
  tokens.write_bytes(bytes(data))
  reader.token_rows(0, 4)
  with pytest.raises(CorpusError, match=r"tokens-00001\.npy: rows 0\.\.3 fail their checksum"):
    reader.token_rows(2, 6)
  tokens.write_bytes(bytes(data[:-10]))
  with pytest.raises(CorpusError, match=r"tokens-00001\.npy: shorter than its manifest says"):
    reader.token_rows(4, 8)
  (root / "corpus" / "spans-00002.npz").unlink()
  with pytest.raises(CorpusError, match=r"spans-00002\.npz: shard file listed in the manifest is missing"):
    reader.read_shard(2)
  (root / "corpus" / "tokens-00002.npy").unlink()
  with pytest.raises(CorpusError, match=r"tokens-00002\.npy: missing"):
    reader.token_rows(8, 9)
  with pytest.raises(CorpusError, match="no corpus manifest"):
    CorpusReader(str(tmp_path / "elsewhere"))


def test_a_model_that_cannot_read_the_corpus_is_named_with_the_corpus(tmp_path, wiki_docs, vocab):
  docs = _write_jsonl(tmp_path / "docs.jsonl", _small_docs(wiki_docs, 1))
  build_corpus([docs], str(tmp_path / "root"), tokenizer=vocab, block_len=64)
  reader = CorpusReader(str(tmp_path / "root"))
  n = reader.tokenizer().vocab_size
  reader.check_model(n, 64)  # exactly the ids and the block length the model has: readable
  manifest = re.escape(str(tmp_path / "root" / "corpus" / "manifest.json"))
  with pytest.raises(CorpusError, match=rf"^{manifest}: the corpus tokenizer has {n} ids but the model's vocab_size "
                     rf"is {n - 1}$"):
    reader.check_model(n - 1, 64)
  with pytest.raises(CorpusError, match=rf"^{manifest}: corpus blocks are up to 64 tokens, model.block_len is 32$"):
    reader.check_model(n, 32)


def test_existing_corpus_needs_overwrite_and_stale_shards_go(tmp_path, wiki_docs, vocab):
  docs = _write_jsonl(tmp_path / "docs.jsonl", _small_docs(wiki_docs, 3))
  few = _write_jsonl(tmp_path / "few.jsonl", _small_docs(wiki_docs, 1))
  root = str(tmp_path / "root")
  big = build_corpus([docs], root, tokenizer=vocab, shard_blocks=3)
  with pytest.raises(CorpusError, match="manifest.json exists.*--overwrite"):
    build_corpus([few], root, tokenizer=vocab, shard_blocks=3)
  small = build_corpus([few], root, tokenizer=vocab, shard_blocks=3, overwrite=True)
  assert small["num_blocks"] < big["num_blocks"]
  on_disk = sorted(p.name for p in (tmp_path / "root" / "corpus").glob("*-*.np?"))
  assert on_disk == sorted(s[kind]["path"] for s in small["shards"] for kind in ("tokens", "spans", "text"))
  assert CorpusReader(root).num_blocks == small["num_blocks"]


def test_memory_stays_bounded_by_the_shard(tmp_path, wiki_docs, vocab):
  """Peak Python memory while building 4x more blocks grows by far less than the blocks' size:
  documents are streamed (a batch of 2 here) and each shard (20 blocks) is written as it fills."""
  records = _small_docs(wiki_docs, 6)
  build_corpus([_write_jsonl(tmp_path / "warm.jsonl", records[:1])], str(tmp_path / "warm"),
               tokenizer=vocab)  # imports and caches happen outside the measurement.
  peaks, blocks = [], []
  for copies in (1, 4):
    docs = _write_jsonl(tmp_path / f"docs{copies}.jsonl", records * copies)
    tracemalloc.start()
    manifest = build_corpus([docs], str(tmp_path / f"root{copies}"), tokenizer=vocab, shard_blocks=20,
                            doc_batch=2)
    peaks.append(tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
    blocks.append(manifest)
  def size(manifest):
    return sum(s[kind]["size"] for s in manifest["shards"] for kind in ("tokens", "spans", "text"))
  written = size(blocks[1]) - size(blocks[0])
  grown = peaks[1] - peaks[0]
  print(f"\npeak {peaks[0] / 1e6:.1f} MB for {blocks[0]['num_blocks']} blocks, "
        f"{peaks[1] / 1e6:.1f} MB for {blocks[1]['num_blocks']} blocks ({written / 1e6:.1f} MB more written)")
  assert blocks[1]["num_blocks"] == 4 * blocks[0]["num_blocks"]
  assert max(s["num_blocks"] for s in blocks[1]["shards"]) == 20
  assert grown < 0.25 * written


# ------------------------------------------------------------------------------------------------
# Bad input: every error names the file and the line or record.


@pytest.mark.parametrize("content, pattern", [
    (b'{"title": "A", "text": "ok"}\n\n{"title": "B", "text": broken}\n', r"docs\.jsonl:3: invalid JSON"),
    (b'{"title": "A", "text": "ok"}\n{"title": "B", "text": "caf\xe9"}\n', r"docs\.jsonl:2: not UTF-8 .*0xe9"),
    (b'{"title": "A", "text": "ok"}\n{"text": "no title"}\n', r"docs\.jsonl:2: missing field 'title'"),
    (b'{"title": "A", "text": 5}\n', r"docs\.jsonl:1: field 'text' must be a string"),
    (b'\n{"title": "A", "text": "   "}\n', r"empty corpus: no document with text in .*docs\.jsonl"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, pattern, vocab):
  path = tmp_path / "docs.jsonl"
  path.write_bytes(content)
  root = tmp_path / "root"
  with pytest.raises(DocumentError, match=pattern):
    build_corpus([str(path)], str(root), tokenizer=vocab, shard_blocks=1)
  assert not list(root.rglob("*.npz")) and not list(root.rglob("manifest.json"))  # nothing half-built


def test_bad_xml_and_unknown_format(tmp_path, vocab):
  path = tmp_path / "dump.xml"
  path.write_text("<mediawiki>\n<page><title>A</title>\n<ns>0</ns><revision><text>x</text></revision>\n</mediawiki>")
  with pytest.raises(DocumentError, match=r"dump\.xml:4: invalid XML"):
    list(read_documents([str(path)]))
  with pytest.raises(DocumentError, match=r"notes\.docx: unknown document format"):
    list(read_documents([str(tmp_path / "notes.docx")]))
  with pytest.raises(DocumentError, match=r"missing\.jsonl: no such file"):
    list(read_documents([str(tmp_path / "missing.jsonl")]))


def test_block_len_too_small_for_a_title(tmp_path, vocab):
  docs = _write_jsonl(tmp_path / "docs.jsonl", [
      {"title": "Paris", "text": "Paris is a city."},
      {"title": "The United Kingdom of Great Britain and Northern Ireland", "text": "A country."}])
  n = len(load_tokenizer(vocab).encode("The United Kingdom of Great Britain and Northern Ireland"))
  with pytest.raises(CorpusError, match=r"docs\.jsonl:2: block length 12 is too small for the title "
                     rf"'The United Kingdom.*' \({n} tokens\)"):
    build_corpus([docs], str(tmp_path / "root"), tokenizer=vocab, block_len=12, shard_blocks=1)
  assert not list((tmp_path / "root").rglob("*.npz"))


def test_text_without_tokens_makes_no_block(tmp_path, vocab):
  docs = _write_jsonl(tmp_path / "docs.jsonl", [{"title": "A", "text": "\u200b\u200b"},
                                                {"title": "B", "text": "Real text."}])
  build_corpus([docs], str(tmp_path / "root"), tokenizer=vocab)
  assert [b.title for b in CorpusReader(str(tmp_path / "root")).iter_blocks()] == ["B"]
  only = _write_jsonl(tmp_path / "only.jsonl", [{"title": "A", "text": "\u200b"}])
  with pytest.raises(CorpusError, match=r"empty corpus: the documents of .*only\.jsonl hold no tokens"):
    build_corpus([only], str(tmp_path / "r2"), tokenizer=vocab)
  assert not (tmp_path / "r2" / "corpus" / "manifest.json").exists()


def test_unknown_tagger(tmp_path, vocab):
  docs = _write_jsonl(tmp_path / "docs.jsonl", [{"title": "Paris", "text": "Paris is a city."}])
  with pytest.raises(RealmError, match="unknown salient-span tagger 'bert-ner'"):
    build_corpus([docs], str(tmp_path / "root"), tokenizer=vocab, tagger="bert-ner")


def test_long_sentences_are_cut_on_token_boundaries(tmp_path, vocab):
  words = " ".join(f"word{i}" for i in range(120))  # one 120-word sentence, no boundary inside
  docs = _write_jsonl(tmp_path / "docs.jsonl", [{"title": "Long", "text": f"Short one. {words}. End here."}])
  build_corpus([docs], str(tmp_path / "root"), tokenizer=vocab, block_len=40, shard_blocks=100)
  blocks = list(CorpusReader(str(tmp_path / "root")).iter_blocks())
  tok = load_tokenizer(vocab)
  assert all(len(b.title_ids) + len(b.body_ids) + 3 <= 40 for b in blocks)
  assert len(blocks) >= len(tok.encode(words)) // 36
  assert _norm(" ".join(b.text for b in blocks)) == _norm(f"Short one. {words}. End here.")
  want = tok.encode(f"Short one. {words}. End here.").ids.tolist()
  assert np.concatenate([b.body_ids for b in blocks]).tolist() == want


# ------------------------------------------------------------------------------------------------
# CLI and TFDS.


def test_cli_build_info_show_and_errors(tmp_path, wiki_docs, vocab, capsys):
  from realm_jax.cli.main import main

  docs = _write_jsonl(tmp_path / "docs.jsonl", _small_docs(wiki_docs, 2))
  root = str(tmp_path / "root")
  assert main(["corpus", "build", "--input", docs, "--storage", root, "--tokenizer", vocab, "--quiet"]) == 0
  n = CorpusReader(root).num_blocks
  assert re.search(rf"wrote {n} blocks in 1 shards", capsys.readouterr().out)
  assert main(["corpus", "show", "--storage", root, "0", str(n - 1)]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["block_id"] for r in rows] == [0, n - 1] and all(r["tokens"] <= 288 for r in rows)
  assert main(["corpus", "info", "--storage", root]) == 0
  assert json.loads(capsys.readouterr().out)["num_blocks"] == n
  # A real process: exit status 2 and one clear line naming the file and line, no traceback.
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"title": "A", "text": "x"}\n{"title": "B"\n')
  proc = subprocess.run([sys.executable, "-m", "realm_jax.cli.main", "corpus", "build", "--input", str(bad),
                         "--storage", str(tmp_path / "r2"), "--tokenizer", vocab],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 2 and "bad.jsonl:2: invalid JSON" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_tfds_builder_without_tensorflow(tmp_path, wiki_docs, vocab, gcs_server):
  """Prepare from a built corpus and from JSONL documents, and with `realm-jax corpus tfds` from
  a gs:// corpus into a gs:// data dir; read back with tfds.data_source, in processes that never
  import TensorFlow."""
  docs_dir = tmp_path / "docs"
  docs_dir.mkdir()
  _write_jsonl(docs_dir / "docs.jsonl", _small_docs(wiki_docs, 2))
  build_corpus([str(docs_dir / "docs.jsonl")], str(tmp_path / "root"), tokenizer="minilm")
  bucket = gcs_server.new_bucket()
  build_corpus([str(docs_dir / "docs.jsonl")], bucket + "/run", tokenizer="minilm")
  proc = subprocess.run([sys.executable, "-m", "realm_jax.cli.main", "corpus", "tfds", "--storage", bucket + "/run",
                         "--data-dir", bucket + "/tfds"], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  code = f"""
import sys, json
import tensorflow_datasets as tfds
from realm_jax.data.tfds_corpus import RealmBlocks, example_to_block
from realm_jax.data.corpus import CorpusReader
expected = list(CorpusReader({str(tmp_path / 'root')!r}).iter_blocks())
for name, manual in (("from_corpus", {str(tmp_path / 'root' / 'corpus')!r}), ("from_docs", {str(docs_dir)!r}),
                     ("from_gcs", None)):
  data_dir = {str(tmp_path)!r} + "/tfds_" + name if manual else {bucket + '/tfds'!r}
  if manual:
    RealmBlocks(data_dir=data_dir, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual))
  source = tfds.data_source("realm_blocks", data_dir=data_dir)["train"]
  assert len(source) == len(expected), (len(source), len(expected))
  for i in range(len(source)):
    got, want = example_to_block(source[i]), expected[i]
    assert (got.block_id, got.title, got.text) == (want.block_id, want.title, want.text)
    assert got.body_ids.tolist() == want.body_ids.tolist()
    assert got.salient_spans.tolist() == want.salient_spans.tolist()
print("tensorflow imported:", "tensorflow" in sys.modules, len(expected))
"""
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "tensorflow imported: False" in proc.stdout
