"""Index versions: build + publish + load round trips on every backend, resume at the same step,
retention, and refusal of corrupted, missing or mismatched indices."""

import json

import numpy as np
import pytest

from realm_jax import publish
from realm_jax.data.features import blocks_doc_inputs
from realm_jax.errors import RealmError
from realm_jax.retrieval import index as index_lib
from realm_jax.retrieval.embed import make_embed_fn
from realm_jax.storage import Storage
from tests.helpers.ranking import assert_top_k
from tests.test_embed import BLOCK_LEN, CFG, CrashAfter, make_corpus, make_embedder, reference


@pytest.fixture(scope="module")
def embedder():
  return make_embedder()


@pytest.fixture(scope="module")
def embed_fn(embedder):
  return make_embed_fn(embedder, batch_size=8)


def _expected(embedder, corpus) -> np.ndarray:
  blocks = list(corpus.iter_blocks())
  return reference(embedder, blocks_doc_inputs(blocks, BLOCK_LEN, corpus.tokenizer()))


def _build(storage, embedder, corpus, step, **kw):
  return index_lib.build_and_publish_index(storage, embedder, corpus, CFG, step=step, **kw)


def test_round_trip(storage_root, tmp_path, embedder):
  storage = Storage.open(storage_root)
  corpus = make_corpus(storage, tmp_path)
  assert index_lib.latest_index_info(storage) is None
  with pytest.raises(index_lib.IndexLoadError, match="no index published"):
    index_lib.load_index(storage)

  built = _build(storage, embedder, corpus, 100, with_scann=True)  # default mesh: 8 devices
  info = index_lib.latest_index_info(storage)
  assert info.version == built.version and info.version.startswith("000000000100-")
  assert (info.step, info.num_blocks, info.dim, info.dtype) == (100, corpus.num_blocks, 128, "float32")
  assert info.config_fingerprint == CFG.fingerprint()
  assert info.corpus_sha256 == index_lib.corpus_fingerprint(corpus)
  assert info.has_scann and info.timings["embed_seconds"] > 0 and info.timings["scann_seconds"] > 0
  assert [r for _, r in info.shards] == [s["num_blocks"] for s in corpus.shards]
  assert storage.list(index_lib.WORK_PREFIX) == []  # staging cleaned after publishing

  loaded = index_lib.load_index(storage, corpus=corpus, config=CFG)
  assert loaded.version == built.version and loaded.metadata["step"] == 100
  want = _expected(embedder, corpus)
  assert loaded.embeddings.dtype == np.float32
  np.testing.assert_allclose(loaded.embeddings, want, atol=1e-5)  # jitted vs eager, O(1) outputs: ~1e-6

  searcher = loaded.load_searcher()  # staged through a temp dir, files checked
  queries = want[:4] + 0.01
  result = searcher.search(queries, 5)
  # LayerNorm-ed 128-d rows (norm ~ sqrt(128)): scores reach ~128, and a float32 dot product of 128
  # terms is off by up to 128 * 2^-24 * 128 ~ 1e-3 depending on the kernel's summation order.
  assert_top_k(result.ids, queries, want, 5, atol=1e-3, scores=result.scores)
  staged = loaded.stage_searcher(tmp_path / "stage")
  assert (staged / "scann" / "part-00000-0000" / "realm_searcher.json").is_file()  # a small corpus: one partition
  assert info.scann_parts == ({"dir": "scann/part-00000-0000", "first_row": 0, "rows": corpus.num_blocks},)
  # Any row ranges, read by byte range and checked chunk by chunk, equal the whole version's rows.
  n = corpus.num_blocks
  rows = index_lib.load_index_rows(storage, [(0, n), (1, 4), (n - 2, n)], corpus=corpus, config=CFG)
  for lo, hi in [(0, n), (1, 4), (n - 2, n), (2, 3)]:
    np.testing.assert_array_equal(rows.rows(lo, hi), loaded.embeddings[lo:hi])
  assert rows.version == loaded.version and rows.bytes_read >= n * 128 * 4


def test_a_process_splits_its_searcher_into_partitions(tmp_path, embedder, embed_fn):
  """`ScannConfig.partition_rows` caps each searcher's rows: a process's rows become consecutive
  partitions, each published with its global first row, and searched as one they return the
  exact top-k of the whole corpus (brute-force partitions at this size: exact)."""
  from realm_jax.retrieval import scann_index
  storage = Storage.open(str(tmp_path / "root"))
  corpus = make_corpus(storage, tmp_path)
  n = corpus.num_blocks
  info = _build(storage, embedder, corpus, 1, with_scann=True, embed_fn=embed_fn,
                scann_config=scann_index.ScannConfig(partition_rows=n // 3))
  parts = info.scann_parts
  assert len(parts) == 4 if n % 3 else len(parts) == 3
  assert [p["first_row"] for p in parts] == [0] + np.cumsum([p["rows"] for p in parts])[:-1].tolist()
  assert sum(p["rows"] for p in parts) == n and max(p["rows"] for p in parts) <= n // 3
  assert len({p["dir"] for p in parts}) == len(parts)
  want = _expected(embedder, corpus)
  queries = want[::5] + 0.01
  result = index_lib.load_index(storage, corpus=corpus, config=CFG).load_searcher().search(queries, 5)
  assert_top_k(result.ids, queries, want, 5, atol=1e-3, scores=result.scores)


def test_versions_retention_and_conflict(tmp_path, embedder, embed_fn):
  storage = Storage.open(str(tmp_path / "root"))
  corpus = make_corpus(storage, tmp_path, num_docs=4, shard_blocks=4)
  infos = [_build(storage, embedder, corpus, step, keep=2, embed_fn=embed_fn) for step in (10, 20, 30)]
  assert publish.list_versions(storage, "index") == [i.version for i in infos[1:]]
  assert index_lib.latest_index_info(storage).step == 30
  old = index_lib.load_index(storage, infos[1].version)
  assert old.info.step == 20
  np.testing.assert_array_equal(old.embeddings, index_lib.load_index(storage).embeddings)
  with pytest.raises(publish.PublishConflict, match="not older"):
    _build(storage, embedder, corpus, 20, embed_fn=embed_fn)


def test_resume_at_same_step(tmp_path, embedder, embed_fn):
  storage = Storage.open(str(tmp_path / "root"))
  corpus = make_corpus(storage, tmp_path)
  assert corpus.num_shards == 4
  crashing = CrashAfter(embed_fn, crash_on=4)
  with pytest.raises(RuntimeError, match="simulated"):
    _build(storage, embedder, corpus, 7, embed_fn=crashing)
  assert index_lib.latest_index_info(storage) is None  # nothing published
  assert len([p for p in storage.list(index_lib.WORK_PREFIX) if p.endswith(".npy")]) == 3

  resumed = CrashAfter(embed_fn)
  info = _build(storage, embedder, corpus, 7, embed_fn=resumed)
  assert resumed.calls == 1  # only the last shard was left
  np.testing.assert_allclose(index_lib.load_index(storage, corpus=corpus).embeddings,
                             _expected(embedder, corpus), atol=1e-5)
  assert info.step == 7 and storage.list(index_lib.WORK_PREFIX) == []


def _published(storage, embedder, embed_fn, corpus, step):
  info = _build(storage, embedder, corpus, step, embed_fn=embed_fn, keep=5)
  return info, f"index/{info.version}"


def test_corrupt_or_missing_files_refused(shared_storage_root, tmp_path, embedder, embed_fn):
  storage = Storage.open(shared_storage_root)
  corpus = make_corpus(storage, tmp_path, num_docs=6, shard_blocks=4)
  assert corpus.num_shards >= 2

  info, vdir = _published(storage, embedder, embed_fn, corpus, 1)
  name = "embeddings/emb-00001.npy"
  data = bytearray(storage.read_bytes(f"{vdir}/{name}"))
  data[-1] ^= 0xFF  # same size, one flipped byte
  storage.write_bytes(f"{vdir}/{name}", bytes(data))
  assert index_lib.latest_index_info(storage).version == info.version  # cheap: no data read
  with pytest.raises(RealmError, match=r"emb-00001\.npy"):
    index_lib.load_index(storage)
  n = corpus.num_blocks
  with pytest.raises(RealmError, match=r"emb-00001\.npy: (rows .* fail their checksum|generation .* replaced)"):
    index_lib.load_index_rows(storage, [(0, n)])

  info, vdir = _published(storage, embedder, embed_fn, corpus, 2)
  storage.delete(f"{vdir}/embeddings/emb-00000.npy")
  with pytest.raises(RealmError, match=r"emb-00000\.npy"):
    index_lib.load_index(storage)
  # A process whose rows are all in another file still sees the missing one (a stat, no read).
  with pytest.raises(RealmError, match=r"emb-00000\.npy: missing"):
    index_lib.load_index_rows(storage, [(n - 1, n)])

  info, vdir = _published(storage, embedder, embed_fn, corpus, 3)
  storage.write_bytes(f"{vdir}/manifest.json", b'{"format": 1, "files": ')
  with pytest.raises(RealmError, match=r"manifest\.json"):
    index_lib.latest_index_info(storage)
  with pytest.raises(RealmError, match=r"manifest\.json"):
    index_lib.load_index(storage)

  # A manifest whose checksum does not describe the (intact) bytes: the row checksums combined
  # with the header do not give it, so a range reader refuses the file too.
  info, vdir = _published(storage, embedder, embed_fn, corpus, 4)
  index_lib.load_index_rows(storage, [(0, n)])
  bad = _copy_behind_latest(storage, info.version, "bad", lambda m: m["files"][name].update(crc32c="0badc0de"))
  first = info.first_rows[1]  # a row of emb-00001
  with pytest.raises(RealmError, match=rf"index/{bad}/embeddings/emb-00001\.npy: .*manifest says .*0badc0de"):
    index_lib.load_index_rows(storage, [(first, first + 1)])
  with pytest.raises(RealmError, match=rf"index/{bad}/embeddings/emb-00001\.npy"):
    index_lib.load_index(storage)


def _copy_behind_latest(storage, version: str, suffix: str, edit) -> str:
  """A copy of `version` (the same bytes, new objects) whose manifest `edit` changes, put behind
  LATEST by hand as a damaged publisher would; returns its name."""
  bad = f"{version[:12]}-{suffix}"
  manifest = storage.read_json(f"index/{version}/manifest.json")
  for f, entry in manifest["files"].items():
    entry["generation"] = storage.write_bytes(f"index/{bad}/{f}",
                                              storage.read_bytes(f"index/{version}/{f}")).generation
  manifest["version"] = bad
  edit(manifest)
  written = storage.write_bytes(f"index/{bad}/manifest.json", json.dumps(manifest).encode())
  storage.write_json("index/LATEST", {"format": publish.FORMAT, "version": bad,
                                      "manifest_generation": written.generation,
                                      "published": "2026-01-01T00:00:00+00:00"})
  return bad


def test_row_ranges_that_do_not_cover_the_corpus_are_refused(tmp_path, embedder, embed_fn):
  storage = Storage.open(str(tmp_path / "root"))
  corpus = make_corpus(storage, tmp_path, num_docs=6, shard_blocks=4)
  info = _build(storage, embedder, corpus, 1, embed_fn=embed_fn)
  n = corpus.num_blocks

  def short_shard(m):  # the shards' rows add up to less than the corpus
    m["metadata"]["shards"][-1]["rows"] -= 1

  def scann_gap(m):  # the searcher partitions leave rows out
    m["metadata"]["scann_parts"][0]["rows"] -= 1

  cases = [("short", short_shard, rf"rows add up to {n - 1}, not num_blocks {n} \(the row ranges do not cover"),
           ("gap", scann_gap, rf"ScaNN partitions cover rows .*, not \[0, {n}\)")]
  for suffix, edit, pattern in cases:
    bad = _copy_behind_latest(storage, info.version, suffix, edit)
    for load in (lambda: index_lib.load_index_rows(storage, [(0, n)], corpus=corpus),
                 lambda: index_lib.load_index(storage, corpus=corpus)):
      with pytest.raises(index_lib.IndexLoadError, match=rf"index/{bad}/manifest\.json: .*({pattern})"):
        load()


def test_mismatched_corpus_or_config_refused(tmp_path, embedder, embed_fn):
  storage = Storage.open(str(tmp_path / "root"))
  corpus = make_corpus(storage, tmp_path)
  smaller = make_corpus(storage, tmp_path, num_docs=6, prefix="corpus-small")
  assert smaller.num_blocks != corpus.num_blocks
  _build(storage, embedder, corpus, 1, embed_fn=embed_fn)
  index_lib.load_index(storage, corpus=corpus, config=CFG)
  with pytest.raises(index_lib.IndexMismatch,
                     match=rf"{corpus.num_blocks} blocks, the corpus has {smaller.num_blocks}"):
    index_lib.load_index(storage, corpus=smaller)
  with pytest.raises(index_lib.IndexMismatch, match="model config"):
    index_lib.load_index(storage, config=CFG.replace(retriever_dim=64))


def test_a_second_version_of_latests_step_is_refused(tmp_path, embedder, embed_fn):
  storage = Storage.open(str(tmp_path / "root"))
  corpus = make_corpus(storage, tmp_path, num_docs=4, shard_blocks=4)
  first = _build(storage, embedder, corpus, 40, embed_fn=embed_fn)
  with pytest.raises(publish.PublishConflict, match="not older"):
    _build(storage, embedder, corpus, 40, embed_fn=embed_fn)
  assert publish.list_versions(storage, "index") == [first.version]  # one version of step 40


def _vanishing_staging(storage, on_first_read):
  """Makes the first read of a staged embedding file call `on_first_read()` first."""
  real, calls = storage.read_bytes, []

  def read_bytes(path, *args, **kwargs):
    if path.startswith(index_lib.WORK_PREFIX) and not calls:
      calls.append(path)
      on_first_read()
    return real(path, *args, **kwargs)

  storage.read_bytes = read_bytes
  return calls


def test_losing_the_race_for_a_step_removes_this_publishers_version(tmp_path, embedder, embed_fn):
  root = str(tmp_path / "root")
  storage = Storage.open(root)
  corpus = make_corpus(storage, tmp_path, num_docs=4, shard_blocks=4)
  winner = []
  # Another publisher of step 50 wins while this one uploads, and cleans the staged embeddings.
  calls = _vanishing_staging(storage, lambda: winner.append(_build(Storage.open(root), embedder, corpus, 50,
                                                                   embed_fn=embed_fn)))
  with pytest.raises(publish.PublishConflict, match="staged embeddings are gone"):
    _build(storage, embedder, corpus, 50, embed_fn=embed_fn)
  assert calls and winner
  assert publish.list_versions(storage, "index") == [winner[0].version]
  assert [p for p in storage.list("index") if not p.startswith(f"index/{winner[0].version}/")] == ["index/LATEST"]
  assert index_lib.latest_index_info(storage).version == winner[0].version


def test_vanished_staging_without_a_winner_is_an_error(tmp_path, embedder, embed_fn):
  storage = Storage.open(str(tmp_path / "root"))
  corpus = make_corpus(storage, tmp_path, num_docs=4, shard_blocks=4)
  _vanishing_staging(storage, lambda: Storage.open(str(tmp_path / "root")).delete(index_lib.WORK_PREFIX))
  with pytest.raises(FileNotFoundError):
    _build(storage, embedder, corpus, 60, embed_fn=embed_fn)
  assert index_lib.latest_index_info(storage) is None
