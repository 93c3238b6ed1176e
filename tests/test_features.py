"""Model inputs against HF transformers' BERT pair encoding (the oracle for `[CLS] a [SEP] b [SEP]`
with segment ids and padding), plus the reader's position maps and the batched forms."""

import numpy as np
import pytest

from realm_jax.data import features, sources
from realm_jax.data.corpus import CorpusReader, build_corpus
from realm_jax.data.documents import read_mediawiki
from realm_jax.data.tokenizer import load_tokenizer, train_sentencepiece


@pytest.fixture(scope="module")
def vocab():
  return str(sources.minilm_dir() / "vocab.txt")


@pytest.fixture(scope="module")
def hf(vocab):
  from transformers import BertTokenizerFast

  return BertTokenizerFast(vocab, do_lower_case=True)


@pytest.fixture(scope="module")
def blocks(tmp_path_factory, vocab):
  """Real blocks: the first three articles of the Wikipedia excerpt."""
  docs = []
  for i, doc in enumerate(read_mediawiki(str(sources.wikipedia_excerpt()))):
    docs.append(doc)
    if i == 2:
      break
  root = str(tmp_path_factory.mktemp("blocks"))
  build_corpus(docs, root, tokenizer=vocab)
  return list(CorpusReader(root).iter_blocks())


def _hf_pair(hf, a, b, length, truncation="only_second"):
  out = hf(a, b, max_length=length, padding="max_length", truncation=truncation,
           return_token_type_ids=True, return_attention_mask=True)
  return {k: np.asarray(out[k], np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}


def _assert_same(ours, ref):
  for key in ("input_ids", "attention_mask", "token_type_ids"):
    np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
    assert ours[key].dtype == np.int32


def test_doc_inputs_match_hf_pair_encoding(blocks, hf, vocab):
  tok = load_tokenizer(vocab)
  assert len(blocks) > 40
  for b in blocks:
    ours = features.doc_inputs(b.title_ids, b.body_ids, 288, tok)
    _assert_same(ours, _hf_pair(hf, b.title, b.text, 288))
  # Defaults are the bert-base-uncased ids, so `tok` may be left out.
  _assert_same(features.doc_inputs(blocks[0].title_ids, blocks[0].body_ids, 288),
               features.doc_inputs(blocks[0].title_ids, blocks[0].body_ids, 288, tok))


def test_doc_inputs_truncate_the_body(blocks, hf):
  b = blocks[0]
  _assert_same(features.doc_inputs(b.title_ids, b.body_ids, 64), _hf_pair(hf, b.title, b.text, 64))


def test_null_document():
  # REALM's null document is the empty title and body: `[CLS] [SEP] [SEP]`, segments 0 0 1.
  ours = features.null_doc_inputs(288)
  assert ours["input_ids"][:3].tolist() == [101, 102, 102] and not ours["input_ids"][3:].any()
  assert ours["attention_mask"].tolist() == [1, 1, 1] + [0] * 285
  assert ours["token_type_ids"].tolist() == [0, 0, 1] + [0] * 285


def test_query_block_inputs_match_hf(blocks, hf, vocab):
  tok = load_tokenizer(vocab)
  query_len, block_len = 96, 288
  for q, b in zip(blocks[:10], blocks[10:20]):
    # A real masked query: the first sentence of another block with a few tokens masked.
    s, e = q.sentences[0]
    query = tok.encode(q.text[s:e]).ids[:query_len - 2].copy()
    query[1:4] = tok.mask_id
    ours = features.query_block_inputs(query, b.body_ids, query_len, block_len, tok)
    ref = hf.prepare_for_model(query.tolist(), b.body_ids.tolist(), max_length=query_len + block_len,
                               truncation="only_second", padding="max_length", return_token_type_ids=True)
    _assert_same(ours, {k: np.asarray(v) for k, v in ref.items()})
    # The query sits where it sits in the query tower's `[CLS] query [SEP]`.
    assert ours["input_ids"][1:1 + len(query)].tolist() == query.tolist()
  long_query = np.arange(1000, 1200, dtype=np.int32)
  ours = features.query_block_inputs(long_query, blocks[0].body_ids, query_len, block_len, tok)
  assert ours["input_ids"][1:query_len - 1].tolist() == long_query[:query_len - 2].tolist()
  assert ours["input_ids"][query_len - 1] == tok.sep_id
  assert ours["attention_mask"].sum() == query_len + len(blocks[0].body_ids) + 1


def test_reader_inputs_map_positions_to_body_tokens(blocks, hf, vocab):
  tok = load_tokenizer(vocab)
  question = tok.encode("who wrote the discourse on voluntary servitude?").ids
  for b in blocks[:10]:
    out = features.reader_inputs(question, b.body_ids, 320, tok)
    _assert_same(out, _hf_pair(hf, "who wrote the discourse on voluntary servitude?", b.text, 320))
    inside = out["block_mask"].astype(bool)
    assert inside.sum() == min(len(b.body_ids), 320 - len(question) - 3)
    np.testing.assert_array_equal(out["input_ids"][inside], b.body_ids[out["token_to_body"][inside]])
    np.testing.assert_array_equal(out["token_to_body"][inside], np.arange(inside.sum()))
    assert np.all(out["token_to_body"][~inside] == -1)
    # Specials, question and padding are never span positions.
    assert not inside[:len(question) + 2].any() and not inside[out["attention_mask"] == 0].any()
    # A body token's char offsets locate the answer text of a span.
    first = np.flatnonzero(inside)[0]
    s, e = b.body_offsets[out["token_to_body"][first]]
    assert b.text[s:e].lower().startswith(tok.id_to_token(out["input_ids"][first]).removeprefix("##")[:1])


def test_batched_forms_stack_the_single_ones(blocks, vocab):
  tok = load_tokenizer(vocab)
  batch = features.blocks_doc_inputs(blocks[:5], 288, tok)
  assert batch["input_ids"].shape == (5, 288)
  for i, b in enumerate(blocks[:5]):
    single = features.doc_inputs(b.title_ids, b.body_ids, 288, tok)
    for k in single:
      np.testing.assert_array_equal(batch[k][i], single[k])
  queries = [b.body_ids[:20] for b in blocks[:4]]
  bodies = [b.body_ids for b in blocks[4:8]]
  qb = features.batch_query_block_inputs(queries, bodies, 96, 288, tok)
  rd = features.batch_reader_inputs(queries, bodies, 320, tok)
  assert qb["input_ids"].shape == (4, 384) and rd["token_to_body"].shape == (4, 320)
  for i in range(4):
    one_qb = features.query_block_inputs(queries[i], bodies[i], 96, 288, tok)
    np.testing.assert_array_equal(qb["input_ids"][i], one_qb["input_ids"])
    one_rd = features.reader_inputs(queries[i], bodies[i], 320, tok)
    np.testing.assert_array_equal(rd["block_mask"][i], one_rd["block_mask"])
  from realm_jax.data.shards import decode_shard, encode_shard

  shard = features.blocks_doc_inputs(decode_shard(encode_shard(blocks, 288, tok)), 288, tok)  # vectorised path
  looped = features.batch_doc_inputs([b.title_ids for b in blocks], [b.body_ids for b in blocks], 288, tok)
  for k in looped:
    np.testing.assert_array_equal(shard[k], looped[k])
  assert features.batch_doc_inputs([], [], 288)["input_ids"].shape == (0, 288)
  with pytest.raises(ValueError, match="2 titles but 1 bodies"):
    features.batch_doc_inputs([blocks[0].title_ids] * 2, [blocks[0].body_ids], 288)


@pytest.mark.parametrize("block_len", [288, 64, 8, 3])
def test_vectorised_shard_path_equals_the_loop(tmp_path, block_len, vocab):
  from realm_jax.data.blocks import Block
  from realm_jax.data.shards import decode_shard, encode_shard

  tok = load_tokenizer(vocab)
  texts = [("Paris", "Paris is the capital of France."), ("", "A block without a title."),
           ("Long title " * 5, "x " * 300), ("Rome", "")]
  blocks = [Block(i, t, b, tok.encode(t).ids, tok.encode(b).ids, tok.encode(b).offsets, [], [])
            for i, (t, b) in enumerate(texts)]
  shard = decode_shard(encode_shard(blocks, 400, tok))  # stored rows longer or shorter than asked
  fast = features.blocks_doc_inputs(shard, block_len, tok)
  slow = features.batch_doc_inputs([b.title_ids for b in blocks], [b.body_ids for b in blocks], block_len, tok)
  for k in slow:
    np.testing.assert_array_equal(fast[k], slow[k], err_msg=k)


def test_sentencepiece_specials_are_used(blocks):
  tok = train_sentencepiece([b.text for b in blocks], 400)
  title, body = tok.encode("Anarchism").ids, tok.encode(blocks[0].text).ids
  out = features.doc_inputs(title, body, 288, tok)
  n = int(out["attention_mask"].sum())
  assert out["input_ids"][0] == tok.cls_id == 2
  assert out["input_ids"][len(title) + 1] == tok.sep_id and out["input_ids"][n - 1] == tok.sep_id
  assert np.all(out["input_ids"][n:] == tok.pad_id)


def test_reader_bodies_cut_from_stored_token_rows_equal_the_blocks_bodies(blocks, vocab):
  """Evaluation and answering place the reader's body table from the stored document-tower rows;
  it must be exactly the table built from whole blocks (their body ids, padded)."""
  from realm_jax.openqa import features as qa_features
  from realm_jax.openqa.loading import host_bodies

  tok = load_tokenizer(vocab)
  rows = features.blocks_doc_inputs(blocks, 288, tok)["input_ids"]
  want = qa_features.body_table(blocks, 288, tok.pad_id)
  assert len(blocks) > 3
  np.testing.assert_array_equal(host_bodies(rows, tok.sep_id, tok.pad_id), want)
