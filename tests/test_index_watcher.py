"""The trainer's index watcher: a version that another process chose first is read once per
process, whether this process's watcher thread is reading it at that moment or has not seen it."""

import threading
import time

import pytest

from realm_jax.logs import RunLog
from realm_jax.retrieval import index as index_lib
from realm_jax.retrieval.embed import make_embed_fn
from realm_jax.storage import Storage
from realm_jax.train.index_watcher import IndexWatcher
from tests.test_embed import CFG, make_corpus, make_embedder


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("watch")
  storage = Storage.open(str(tmp / "run"))
  corpus = make_corpus(storage, tmp, num_docs=6, shard_blocks=4)
  embedder = make_embedder()
  fn = make_embed_fn(embedder, batch_size=8)
  versions = [index_lib.build_and_publish_index(storage, embedder, corpus, CFG, step=step, embed_fn=fn,
                                                with_scann=False).version for step in (1, 2)]
  return storage, versions


class CountingLoader:
  """The trainer's loader (`load_index_rows` of every row), counting its calls; `gate` holds a
  call until set."""

  def __init__(self, storage):
    self.storage, self.calls = storage, []
    self.started, self.gate = threading.Event(), threading.Event()
    self.gate.set()

  def __call__(self, version):
    self.calls.append(version)
    self.started.set()
    assert self.gate.wait(30)
    n = index_lib.latest_index_info(self.storage).num_blocks
    return index_lib.load_index_rows(self.storage, [(0, n)], version), None


def test_a_version_the_thread_is_reading_is_waited_for_not_read_again(two_versions):
  storage, (first, second) = two_versions
  loader = CountingLoader(storage)
  loader.gate.clear()
  watcher = IndexWatcher(storage, loader, first, poll_s=0.01, log=RunLog("test-watcher"))
  watcher.start()
  try:
    assert loader.started.wait(30)  # the thread is reading `second` (LATEST)
    got = {}
    asker = threading.Thread(target=lambda: got.setdefault("ready", watcher.load_now(second)))
    asker.start()
    time.sleep(0.3)
    assert "ready" not in got  # waiting for the thread's read, not reading again
    loader.gate.set()
    asker.join(30)
    assert got["ready"][0].info.version == second
    assert loader.calls == [second]
    assert watcher.take() is None  # handed over once
  finally:
    watcher.stop()
    watcher.join(10)


def test_a_version_read_on_demand_is_not_read_again_by_the_thread(two_versions):
  storage, (first, second) = two_versions
  loader = CountingLoader(storage)
  watcher = IndexWatcher(storage, loader, first, poll_s=0.01, log=RunLog("test-watcher"))
  ready = watcher.load_now(second)  # before the thread has looked at LATEST
  assert ready[0].info.version == second and loader.calls == [second]
  watcher.start()
  try:
    time.sleep(0.5)  # 50 polls of LATEST, which names `second`
    assert loader.calls == [second]
  finally:
    watcher.stop()
    watcher.join(10)


def test_a_version_loaded_before_process_0_chose_it_is_kept_for_the_swap(two_versions):
  """This process's thread read the new version first; process 0 has not, so the step swaps
  nothing (`ready_version` is only looked at); when process 0 chooses it, no second read."""
  storage, (first, second) = two_versions
  loader = CountingLoader(storage)
  watcher = IndexWatcher(storage, loader, first, poll_s=0.01, log=RunLog("test-watcher"))
  watcher.start()
  try:
    deadline = time.monotonic() + 30
    while watcher.ready_version() != second and time.monotonic() < deadline:
      time.sleep(0.01)
    assert watcher.ready_version() == second  # looked at, not handed over
    assert watcher.load_now(second)[0].info.version == second
    assert loader.calls == [second] and watcher.ready_version() is None
  finally:
    watcher.stop()
    watcher.join(10)
