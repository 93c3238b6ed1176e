"""REALM masking on real Wikipedia text (gensim's excerpt) with the real bert-base-uncased vocab."""

import bz2
import functools
import re
import unicodedata
import xml.etree.ElementTree as ET

import mwparserfromhell
import numpy as np
import pytest
from tokenizers import BertWordPieceTokenizer

from realm_jax.data import masking, sources
from realm_jax.data.blocks import Block

SPECIAL = masking.Specials()  # bert-base-uncased: [CLS] 101, [SEP] 102, [PAD] 0, [MASK] 103
UNK = 100


@functools.lru_cache(maxsize=None)
def tokenizer() -> BertWordPieceTokenizer:
  return BertWordPieceTokenizer.from_file(str(sources.minilm_dir() / "vocab.txt"), lowercase=True)


def make_block(block_id: int, title: str, text: str) -> Block:
  """A Block built by hand: regex sentences, years and capitalised runs as salient spans."""
  enc = tokenizer().encode(text, add_special_tokens=False)
  sentences = [(m.start(), m.start() + len(m.group().rstrip()))
               for m in re.finditer(r"[^.!?]+(?:[.!?]+[\"')\]]*|$)\s*", text) if m.group().strip()]
  spans = [m.span() for m in re.finditer(r"\b(1[0-9]{3}|20[0-9]{2})\b", text)]
  for s, e in sentences:  # capitalised runs that do not start the sentence
    spans += [(s + m.start(), s + m.end()) for m in re.finditer(r"\b[A-Z][a-z]+(?: [A-Z][a-z]+)*", text[s:e])
              if m.start() > 0]
  return Block(block_id=block_id, title=title, text=text,
               title_ids=tokenizer().encode(title, add_special_tokens=False).ids,
               body_ids=enc.ids, body_offsets=enc.offsets, sentences=sentences,
               salient_spans=sorted(spans))


@functools.lru_cache(maxsize=None)
def wikipedia_blocks(max_blocks: int = 60) -> tuple[Block, ...]:
  """Real paragraphs of the first articles of the gensim Wikipedia excerpt, one block each."""
  blocks = []
  with bz2.open(sources.wikipedia_excerpt()) as f:
    for _, el in ET.iterparse(f):
      if not el.tag.endswith("}page"):
        continue
      ns = el.tag[:-4]
      title, wiki = el.find(f"{ns}title").text, el.find(f".//{ns}text").text or ""
      el.clear()
      for para in mwparserfromhell.parse(wiki).strip_code().split("\n"):
        para = " ".join(para.split())
        if len(para) < 200 or re.search(r"[|{}\[\]<>=]", para):
          continue
        # Keep paragraphs that fit a 288-token block with their title.
        if len(tokenizer().encode(para, add_special_tokens=False).ids) <= 250:
          blocks.append(make_block(len(blocks), title, para))
        if len(blocks) >= max_blocks:
          return tuple(blocks)
  return tuple(blocks)


def squash(text: str) -> str:
  """What WordPiece decoding keeps of a text: lowercase, no accents, no whitespace."""
  text = unicodedata.normalize("NFD", text.lower())
  return "".join(ch for ch in text if not ch.isspace() and unicodedata.category(ch) != "Mn")


def query_tokens(ex: dict) -> np.ndarray:
  n = int(ex["attention_mask"].sum())
  assert ex["input_ids"][0] == SPECIAL.cls_id and ex["input_ids"][n - 1] == SPECIAL.sep_id
  assert (ex["input_ids"][n:] == SPECIAL.pad_id).all()
  return ex["input_ids"][1:n - 1]


def masked_positions(ex: dict) -> np.ndarray:
  k = int(ex["mlm_weights"].sum())
  return ex["mlm_positions"][:k]


def check_label_layout(ex: dict, query_len: int, max_masks: int):
  """mlm_labels (full length, -100 elsewhere) and the compact positions/targets agree."""
  pos = masked_positions(ex)
  k = len(pos)
  assert ex["input_ids"].shape == ex["mlm_labels"].shape == (query_len,)
  assert ex["mlm_positions"].shape == ex["mlm_targets"].shape == (max_masks,)
  assert 1 <= k <= max_masks and (ex["mlm_weights"][k:] == 0).all() and (ex["mlm_span_ids"][k:] == -1).all()
  expected = np.full(query_len, -100)
  expected[pos] = ex["mlm_targets"][:k]
  np.testing.assert_array_equal(ex["mlm_labels"], expected)
  assert (pos >= 1).all() and (pos < ex["attention_mask"].sum() - 1).all()  # never [CLS]/[SEP]


# ------------------------------------------------------------------------------------------------


def test_salient_queries_decode_to_the_sentence_with_exactly_the_span_masked():
  blocks = wikipedia_blocks()
  assert len(blocks) >= 40
  tok = tokenizer()
  made = 0
  for seed, block in enumerate(blocks):
    rng = np.random.default_rng(seed)
    ex = masking.salient_span_query(block, rng, SPECIAL)
    if ex is None:
      assert not masking.salient_candidates(block)
      continue
    made += 1
    check_label_layout(ex, 96, 10)
    assert ex["block_id"] == block.block_id
    ids = query_tokens(ex)
    pos = masked_positions(ex) - 1  # index into the sentence tokens
    assert (np.diff(pos) == 1).all() and (ex["mlm_span_ids"][:len(pos)] == 0).all()
    assert (ids[pos] == SPECIAL.mask_id).sum() == len(pos) == (ids == SPECIAL.mask_id).sum()
    restored = ids.copy()
    restored[pos] = ex["mlm_targets"][:len(pos)]
    # Which sentence and span: the masked tokens' char offsets are one of the salient spans.
    starts = [i for i in range(len(block.body_ids) - len(restored) + 1)
              if (block.body_ids[i:i + len(restored)] == restored).all()]
    assert starts, "the query is not a contiguous piece of the block"
    start = starts[0]
    a, b = start + pos[0], start + pos[-1] + 1
    span = (int(block.body_offsets[a, 0]), int(block.body_offsets[b - 1, 1]))
    assert span in {tuple(s) for s in block.salient_spans}
    sentence = next((s, e) for s, e in block.sentences if s <= span[0] and span[1] <= e)
    s, e = sentence
    # The query is the whole sentence (all fit in 94 tokens here) ...
    assert len(restored) <= 94
    assert restored.tolist() == tok.encode(block.text[s:e], add_special_tokens=False).ids
    if UNK not in restored:
      assert squash(tok.decode(restored.tolist())) == squash(block.text[s:e])
    # ... with exactly the span replaced: text before and after it is untouched.
    before = tok.encode(block.text[s:span[0]], add_special_tokens=False).ids
    inside = tok.encode(block.text[span[0]:span[1]], add_special_tokens=False).ids
    after = tok.encode(block.text[span[1]:e], add_special_tokens=False).ids
    assert ids.tolist() == before + [SPECIAL.mask_id] * len(inside) + after
    assert tok.decode(ex["mlm_targets"][:len(pos)].tolist()) == tok.decode(inside)
  assert made >= 0.7 * len(blocks)


def test_salient_choice_is_seeded_and_covers_the_spans():
  block = max(wikipedia_blocks(), key=lambda b: len(b.salient_spans))
  def run(seed):
    return masking.salient_span_query(block, np.random.default_rng(seed), SPECIAL)
  a, b = run(7), run(7)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  candidates = {tuple(block.body_ids[a:b]) for spans in masking.salient_candidates(block).values()
                for a, b in spans}
  chosen = set()
  for seed in range(300):
    ex = run(seed)
    chosen.add(tuple(ex["mlm_targets"][:int(ex["mlm_weights"].sum())]))
  assert len(candidates) >= 5 and chosen == candidates


def test_spans_longer_than_max_masks_are_skipped():
  words = "Alpha Beta Gamma Delta Epsilon Zeta Eta Theta Iota Kappa Lambda Mu"
  text = f"It was named the {words} prize. The prize was given to Ada Lovelace in 1843."
  block = make_block(3, "Prize", text)
  long_start = text.index("Alpha")
  block.salient_spans = np.array([[long_start, long_start + len(words)],
                                  [text.index("Ada"), text.index("Ada") + len("Ada Lovelace")]], np.int32)
  n_long = len(tokenizer().encode(words, add_special_tokens=False).ids)
  assert n_long > 10
  for seed in range(30):
    ex = masking.salient_span_query(block, np.random.default_rng(seed), SPECIAL)
    assert int(ex["mlm_weights"].sum()) <= 10
    assert tokenizer().decode(ex["mlm_targets"][:int(ex["mlm_weights"].sum())].tolist()) == "ada lovelace"
  n_ada = len(tokenizer().encode("Ada Lovelace", add_special_tokens=False).ids)
  ex = masking.salient_span_query(block, np.random.default_rng(0), SPECIAL, max_masks=n_ada)
  assert int(ex["mlm_weights"].sum()) == n_ada and ex["mlm_positions"].shape == (n_ada,)
  assert masking.salient_span_query(block, np.random.default_rng(0), SPECIAL, max_masks=n_ada - 1) is None
  only_long = make_block(4, "Prize", text)
  only_long.salient_spans = block.salient_spans[:1]
  assert masking.salient_span_query(only_long, np.random.default_rng(0), SPECIAL) is None
  ex = masking.salient_span_query(only_long, np.random.default_rng(0), SPECIAL, query_len=40, max_masks=n_long)
  assert int(ex["mlm_weights"].sum()) == n_long and ex["mlm_span_ids"].shape == (n_long,)


def test_long_sentence_is_truncated_around_the_span():
  filler = " ".join(f"word{i}" for i in range(60))  # ~180 tokens
  text = f"{filler} and finally Marie Curie arrived in Paris in 1891 {filler}."
  block = make_block(5, "Curie", text)
  block.salient_spans = np.array([[text.index("1891"), text.index("1891") + 4]], np.int32)
  ex = masking.salient_span_query(block, np.random.default_rng(0), SPECIAL, query_len=96)
  assert ex["attention_mask"].sum() == 96 and ex["input_ids"][-1] == SPECIAL.sep_id
  ids = query_tokens(ex)
  assert len(ids) == 94
  pos = masked_positions(ex) - 1
  window = block.body_ids.copy()
  a = int(np.flatnonzero(block.body_offsets[:, 0] == text.index("1891"))[0])
  window_start = a - pos[0]
  restored = ids.copy()
  restored[pos] = ex["mlm_targets"][:len(pos)]
  np.testing.assert_array_equal(restored, window[window_start:window_start + 94])
  assert 30 <= pos[0] <= 64  # centred, not at an edge
  check_label_layout(ex, 96, 10)


def test_random_token_baseline():
  blocks = wikipedia_blocks()
  kinds = {"mask": 0, "random": 0, "same": 0}
  for seed, block in enumerate(blocks * 6):
    ex = masking.random_token_query(block, np.random.default_rng(seed), SPECIAL)
    check_label_layout(ex, 96, 10)
    ids = query_tokens(ex)
    pos = masked_positions(ex)
    k = len(pos)
    assert k == min(10, max(1, round(0.15 * len(ids))))
    np.testing.assert_array_equal(ex["mlm_span_ids"][:k], np.arange(k))
    restored = ids.copy()
    restored[pos - 1] = ex["mlm_targets"][:k]
    found = any((block.body_ids[i:i + len(restored)] == restored).all()
                for i in range(len(block.body_ids) - len(restored) + 1))
    assert found  # unmasked positions are the sentence's own tokens
    for p, t in zip(pos - 1, ex["mlm_targets"][:k]):
      kinds["mask" if ids[p] == SPECIAL.mask_id else "same" if ids[p] == t else "random"] += 1
  total = sum(kinds.values())
  assert total > 1000
  assert 0.75 < kinds["mask"] / total < 0.85 and 0.05 < kinds["same"] / total < 0.15


def test_random_span_baseline():
  for seed, block in enumerate(wikipedia_blocks()):
    ex = masking.random_span_query(block, np.random.default_rng(seed), SPECIAL)
    check_label_layout(ex, 96, 10)
    ids = query_tokens(ex)
    pos = masked_positions(ex)
    k = len(pos)
    assert k == min(10, max(1, round(0.15 * len(ids))))
    assert (ids[pos - 1] == SPECIAL.mask_id).all() and (ids == SPECIAL.mask_id).sum() == k
    span_ids = ex["mlm_span_ids"][:k]
    for s in np.unique(span_ids):  # each span is a contiguous run of positions
      run = pos[span_ids == s]
      assert (np.diff(run) == 1).all()


def test_ict_removes_the_sentence_about_90_percent_of_the_time():
  blocks = [b for b in wikipedia_blocks() if len(b.sentences) >= 2]
  removed, n = 0, 0
  for seed in range(1500):
    block = blocks[seed % len(blocks)]
    ex = masking.ict_example(block, np.random.default_rng(seed), SPECIAL)
    assert ex["query_input_ids"].shape == (64,) and ex["block_input_ids"].shape == (288,)
    assert ex["block_id"] == block.block_id
    q = ex["query_input_ids"][1:int(ex["query_attention_mask"].sum()) - 1]
    n_doc = int(ex["block_attention_mask"].sum())
    doc = ex["block_input_ids"][:n_doc]
    t = len(block.title_ids)
    assert doc[0] == SPECIAL.cls_id and doc[t + 1] == SPECIAL.sep_id and doc[-1] == SPECIAL.sep_id
    np.testing.assert_array_equal(doc[1:t + 1], block.title_ids)
    np.testing.assert_array_equal(ex["block_token_type_ids"][:n_doc], [0] * (t + 2) + [1] * (n_doc - t - 2))
    body = doc[t + 2:-1]
    origins = [(a, b) for a, b in masking.sentence_ranges(block)
               if b > a and np.array_equal(block.body_ids[a:a + len(q)], q)]
    assert origins and all(len(q) == min(b - a, 62) for a, b in origins)
    if ex["sentence_removed"]:
      removed += 1
      assert any(np.array_equal(body, np.concatenate([block.body_ids[:a], block.body_ids[b:]]))
                 for a, b in origins)
    else:
      np.testing.assert_array_equal(body, block.body_ids)
    n += 1
  assert 0.87 < removed / n < 0.93


def test_ict_drops_a_one_sentence_block_whose_sentence_would_be_removed():
  """ORQA drops the example rather than keep the sentence in its block (a trivial lexical match)."""
  block = make_block(9, "Solo", "Ada Lovelace wrote the first program in 1843.")
  for seed in range(20):
    assert masking.ict_example(block, np.random.default_rng(seed), SPECIAL, remove_prob=1.0) is None
    ex = masking.ict_example(block, np.random.default_rng(seed), SPECIAL, remove_prob=0.0)
    assert not ex["sentence_removed"]
    assert int(ex["block_attention_mask"].sum()) == 3 + 1 + len(block.body_ids)
  kept = [masking.ict_example(block, np.random.default_rng(seed), SPECIAL) for seed in range(2000)]
  assert 0.08 < np.mean([ex is not None for ex in kept]) < 0.12  # 1 - remove_prob = 0.1 of them


def test_blocks_without_spans_or_sentences_give_none():
  block = make_block(1, "T", "all lower case words here.")
  assert masking.salient_span_query(block, np.random.default_rng(0), SPECIAL) is None
  empty = Block(2, "T", "", [1996], [], np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0, 2)))
  for fn in (masking.salient_span_query, masking.random_token_query, masking.random_span_query,
             masking.ict_example):
    assert fn(empty, np.random.default_rng(0), SPECIAL) is None
  with pytest.raises(ValueError, match="unknown masking"):
    masking.make_masker("whole_word", SPECIAL)
