"""The demo's stages, each cached in the work directory so a second run resumes or reuses:

sources -> corpus (blocks with salient spans) -> questions answerable from it -> REALM
pre-training with the refresher as a second process -> recall of every published index ->
Open-QA fine-tuning -> evaluation. `report.py` turns the results into the table and the plot.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import time
from typing import Callable

import numpy as np

from realm_jax.cli.progress import blocks_bar
from realm_jax.data import documents, qa, sources
from realm_jax.data.corpus import CorpusReader, build_corpus
from realm_jax.data.qa import QAExample
from realm_jax.demo import questions as demo_questions
from realm_jax.demo.recall import RecallProbe
from realm_jax.demo.recipe import Recipe
from realm_jax.demo.refresher import RefresherProcess
from realm_jax.errors import RealmError
from realm_jax.storage import Storage
from realm_jax.train.metrics import read_metrics

RECALL_K = 5
RECALL_KS = (1, RECALL_K, 20)


class DemoError(RealmError):
  """A demo stage cannot run (missing input, too few questions, a failed child process)."""


def lead(doc: documents.Document, chars: int) -> documents.Document:
  """The first `chars` characters of a document, cut at the last sentence end inside them."""
  if len(doc.text) <= chars:
    return doc
  text = doc.text[:chars]
  cut = text.rfind(". ")
  return documents.Document(doc.title, text[:cut + 1] if cut > 0 else text)


def fingerprint(weights_dir: str) -> str:
  """sha256 of every file of a weights directory (names and bytes): which start a run loaded."""
  root = pathlib.Path(weights_dir)
  if not root.is_dir():  # a named init ("minilm"): the name says which weights
    return weights_dir
  h = hashlib.sha256()
  for p in sorted(root.rglob("*")):
    if p.is_file():
      h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
  return h.hexdigest()[:16]


class Demo:
  """Runs the stages in order; each stage's result is a JSON file under `<workdir>/state/`."""

  def __init__(self, workdir: pathlib.Path, recipe: Recipe, ui):
    self.workdir, self.recipe, self.ui = pathlib.Path(workdir), recipe, ui
    self.state_dir = self.workdir / "state"
    self.pretrain_root = str(self.workdir / "pretrain")
    self.openqa_root = str(self.workdir / "openqa")
    self.state_dir.mkdir(parents=True, exist_ok=True)
    self._check_recipe()

  def _check_recipe(self) -> None:
    path = self.workdir / "recipe.json"
    mine = {"name": self.recipe.name, "model": self.recipe.model.to_dict(), "seed": self.recipe.seed}
    if path.exists():
      theirs = json.loads(path.read_text())
      if theirs != mine:
        raise DemoError(f"{self.workdir} holds a demo run with the {theirs.get('name')!r} recipe and seed "
                        f"{theirs.get('seed', 0)}; use another --workdir (or delete it) for the "
                        f"{self.recipe.name!r} recipe with seed {self.recipe.seed}")
    else:
      path.write_text(json.dumps(mine, indent=1) + "\n")

  # -- stage bookkeeping ---------------------------------------------------------------------------
  def stage(self, name: str, fn: Callable[[], dict]) -> dict:
    path = self.state_dir / f"{name}.json"
    if path.exists():
      result = json.loads(path.read_text())
      self.ui.cached(name, result)
      return result
    t0, c0 = time.perf_counter(), os.times()
    self.ui.begin(name)
    result = fn()
    c1 = os.times()
    result["seconds"] = time.perf_counter() - t0
    # user + system CPU time of this process and of the children it waited for (the refresher)
    result["cpu_seconds"] = sum(c1[:4]) - sum(c0[:4])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)  # a stage is done only once its result is written whole
    self.ui.end(name, result)
    return result

  def run(self) -> dict:
    results = {}
    results["sources"] = self.stage("sources", self.fetch_sources)
    results["corpus"] = self.stage("corpus", self.build_corpus)
    results["questions"] = self.stage("questions", self.pick_questions)
    results["references"] = self.stage("references", self.references)
    if self.recipe.ict_steps:
      results["ict"] = self.stage("ict", self.ict)
    if self.recipe.reading_steps:
      results["reading"] = self.stage("reading", self.reading)
    results["pretrain"] = self.stage("pretrain", self.pretrain)
    if self.recipe.control:
      results["control"] = self.stage("control", self.control)
    results["openqa_index"] = self.stage("openqa_index", self.openqa_index)
    results["recall"] = self.stage("recall", self.recall_curve)
    results["finetune"] = self.stage("finetune", self.finetune)
    return results

  # -- stages --------------------------------------------------------------------------------------
  def fetch_sources(self) -> dict:
    wiki = sources.wikipedia_excerpt()
    minilm = sources.minilm_dir() if self.recipe.init == "minilm" else None
    files = {name: str(sources.question_file(name)) for name in demo_questions.QUESTION_SETS}
    return {"wikipedia": str(wiki), "minilm": str(minilm) if minilm else None, "questions": files}

  def build_corpus(self) -> dict:
    storage = Storage.open(self.pretrain_root)
    docs = []
    for doc in documents.read_mediawiki(str(sources.wikipedia_excerpt())):
      docs.append(lead(doc, self.recipe.article_chars))
      if self.recipe.max_articles and len(docs) >= self.recipe.max_articles:
        break
    with blocks_bar("building corpus", enabled=self.ui.show_progress) as progress:
      manifest = build_corpus(docs, storage, block_len=self.recipe.block_len, overwrite=True, progress=progress)
    stats = manifest["stats"]
    return {"articles": len(docs), "blocks": manifest["num_blocks"], "sentences": stats["sentences"],
            "salient_spans": stats["salient_spans"], "sentences_with_salient": stats["sentences_with_salient"]}

  def _blocks(self):
    reader = CorpusReader(Storage.open(self.pretrain_root))
    return reader, list(reader.iter_blocks())

  def pick_questions(self) -> dict:
    _, blocks = self._blocks()
    pool = []
    for name in demo_questions.QUESTION_SETS:
      pool.extend(qa.load_questions(name))
    picked = demo_questions.select_questions(blocks, pool)
    if len(picked) < self.recipe.min_questions:
      raise DemoError(f"only {len(picked)} questions of {len(pool)} are answerable from the corpus "
                      f"(the recipe needs {self.recipe.min_questions})")
    train, test = demo_questions.split(picked, self.recipe.test_fraction)
    for name, rows in (("train", train), ("test", test)):
      with open(self.workdir / f"questions-{name}.jsonl", "w") as f:
        for ex in rows:
          f.write(json.dumps({"qid": ex.qid, "question": ex.question, "answers": ex.answers,
                              "answer_type": ex.answer_type}) + "\n")
    return {"pool": len(pool), "answerable": len(picked), "train": len(train), "test": len(test)}

  def questions(self, split: str | None = None) -> list[QAExample]:
    names = (split,) if split else ("train", "test")
    out = []
    for name in names:
      with open(self.workdir / f"questions-{name}.jsonl") as f:
        out.extend(QAExample(d["qid"], d["question"], d["answers"], d["answer_type"])
                   for d in map(json.loads, f))
    return out

  def references(self) -> dict:
    """recall@k of BM25 and of the full 6-layer MiniLM sentence embedder on the same blocks and
    questions (`references.py`)."""
    from realm_jax.demo import references

    reader, blocks = self._blocks()
    examples = self.questions()
    out = {"bm25": references.bm25_recall(blocks, examples, ks=RECALL_KS)}
    if self.recipe.init == "minilm":
      m = self.recipe.model
      out["minilm"] = references.minilm_recall(blocks, examples, reader.tokenizer(), m.block_len, m.query_len,
                                               ks=RECALL_KS)
    return out

  @property
  def ict_root(self) -> str:
    return str(self.workdir / "ict")

  @property
  def ict_weights(self) -> str:
    return str(self.workdir / "ict-weights")

  def ict(self) -> dict:
    """ICT warm start of the retriever (ORQA; REALM starts pre-training from it), with the recall
    of the initial retriever measured first."""
    from realm_jax import weights
    from realm_jax.train.trainer import Trainer

    cfg = self.recipe.ict_config()
    self._copy_corpus(self.ict_root)
    bar = self.ui.steps("ICT warm start", cfg.num_train_steps)
    trainer = Trainer(cfg, self.ict_root, resume=True, log_fn=self.ui.log, on_step=bar.update)
    recall_init = None
    if trainer.step == 0:
      reader, blocks = self._blocks()
      probe = RecallProbe(blocks, self.questions(), reader.tokenizer(), cfg.model.block_len, cfg.model.query_len,
                          ks=RECALL_KS)
      recall_init = {f"recall@{k}": v for k, v in probe(trainer.model.retriever).items()}
      (self.state_dir / "recall-init.json").write_text(json.dumps(recall_init) + "\n")
    else:
      recall_init = json.loads((self.state_dir / "recall-init.json").read_text())
    bar.update(trainer.step, cfg.num_train_steps)
    try:
      result = trainer.run()
    finally:
      bar.close()
    shutil.rmtree(self.ict_weights, ignore_errors=True)
    weights.save_weights(self.ict_weights, trainer.model, cfg.model,
                         metadata={"source": f"ICT warm start, step {result.step}"})
    rows = self.metrics_rows("ict", self.ict_root)
    return {"steps": result.step, "recall_init": recall_init,
            "ict_accuracy_last": float(np.mean([r["ict_accuracy"] for r in rows[-5:]])) if rows else None}

  @property
  def start_weights(self) -> str:
    return str(self.workdir / "start-weights")

  def reading(self) -> dict:
    """The reading warm start of the knowledge-augmented encoder (`reading.py`), from the ICT
    warm start's weights; its result is the start checkpoint of REALM and of the control."""
    from realm_jax import weights
    from realm_jax.demo import reading
    from realm_jax.train.trainer import init_model

    r = self.recipe
    cfg = r.pretrain_config(init=self.ict_weights if r.ict_steps else None)
    model = init_model(cfg, self.ui.log)
    reader, blocks = self._blocks()
    data = reading.ReadingData(blocks, reader.tokenizer(), r.model.block_len, r.model.query_len, cfg.max_masks,
                               queries_per_block=r.reading_queries_per_block, held_out_every=10, seed=r.seed)
    before = reading.reading_accuracy(model.encoder, data)
    bar = self.ui.steps("reading warm start", r.reading_steps)
    try:
      losses = reading.teach_reading(model.encoder, data, steps=r.reading_steps, batch=r.reading_batch,
                                     learning_rate=r.reading_lr, seed=r.seed, on_step=bar.update)
    finally:
      bar.close()
    after = reading.reading_accuracy(model.encoder, data)
    shutil.rmtree(self.start_weights, ignore_errors=True)
    weights.save_weights(self.start_weights, model, cfg.model,
                         metadata={"source": "ICT warm start + reading warm start of the encoder"})
    return {"steps": r.reading_steps, "queries": len(data.owner), "gold_fraction": data.gold_fraction,
            "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:])),
            "accuracy_before": before, "accuracy_after": after, "start": fingerprint(self.start_weights)}

  def start_init(self) -> str | None:
    """The weights REALM and the control start from."""
    if self.recipe.reading_steps:
      return self.start_weights
    return self.ict_weights if self.recipe.ict_steps else None

  def pretrain_config(self):
    """REALM pre-training's config: starts from the reading / ICT warm start when the recipe has one."""
    return self.recipe.pretrain_config(init=self.start_init())

  def pretrain(self) -> dict:
    from realm_jax.train.trainer import Trainer

    cfg = self.pretrain_config()
    log_file = self.workdir / "refresher.log"
    bar = self.ui.steps("REALM pre-training", cfg.num_train_steps)
    trainer = Trainer(cfg, self.pretrain_root, resume=True, log_fn=self.ui.log, on_step=bar.update)
    if trainer.step:
      self.ui.log(f"resuming pre-training at step {trainer.step}")
    bar.update(trainer.step, cfg.num_train_steps)
    with RefresherProcess(self.pretrain_root, log_file) as refresher:
      self.ui.log(f"index refresher running as process {refresher.pid} (log: {log_file})")
      try:
        result = trainer.run()
      finally:
        bar.close()
      code = refresher.wait_done(120)
    if code not in (0, None):
      raise DemoError(f"the refresher exited with status {code}; see {log_file}")
    return {"steps": result.step, "swaps": self._swaps(self.metrics_rows("realm")),
            "start": fingerprint(cfg.init) if cfg.init else None}

  @property
  def control_root(self) -> str:
    return str(self.workdir / "control")

  def control(self) -> dict:
    """The control run: REALM's steps from the same start with the retriever's update zeroed
    (`Recipe.control_config`), on its own storage root; its recall@k is measured at the start
    (its bootstrap index) and at the end."""
    from realm_jax.train.trainer import Trainer

    cfg = self.recipe.control_config(init=self.start_init())
    self._copy_corpus(self.control_root)
    bar = self.ui.steps("control (retriever frozen)", cfg.num_train_steps)
    trainer = Trainer(cfg, self.control_root, resume=True, log_fn=self.ui.log, on_step=bar.update)
    reader, blocks = self._blocks()
    probe = RecallProbe(blocks, self.questions(), reader.tokenizer(), cfg.model.block_len, cfg.model.query_len,
                        ks=RECALL_KS)
    first = self.state_dir / "control-recall-start.json"
    if trainer.step == 0:
      first.write_text(json.dumps({f"recall@{k}": v for k, v in probe(trainer.model.retriever).items()}) + "\n")
    bar.update(trainer.step, cfg.num_train_steps)
    try:
      result = trainer.run()
    finally:
      bar.close()
    trainer.model.eval()
    end = {f"recall@{k}": v for k, v in probe(trainer.model.retriever).items()}
    return {"steps": result.step, "start": fingerprint(cfg.init) if cfg.init else None,
            "recall_start": json.loads(first.read_text()), "recall_end": end}

  def metrics_rows(self, name: str, root: str | None = None) -> list[dict]:
    return read_metrics(Storage.open(root or self.pretrain_root), name)

  def _copy_corpus(self, root: str, replace: bool = False) -> None:
    """The demo's corpus under another (local) storage root: every role reads `<root>/corpus`."""
    dest = Storage.open(root).local_path("corpus")
    if replace:
      shutil.rmtree(dest, ignore_errors=True)
    elif (dest / "manifest.json").exists():
      return
    shutil.copytree(Storage.open(self.pretrain_root).local_path("corpus"), dest, dirs_exist_ok=True)

  @staticmethod
  def _swaps(rows: list[dict]) -> list[int]:
    """Steps at which the trainer's index staleness dropped: a fresh index was swapped in."""
    out, prev = [], None
    for r in rows:
      s = r.get("index_staleness")
      if prev is not None and s is not None and s < prev:
        out.append(int(r["step"]))
      prev = s
    return out

  def openqa_index(self) -> dict:
    """The Open-QA storage root: the corpus, and the index of the final pre-trained document
    tower (frozen from here on, as in ORQA)."""
    from realm_jax.retrieval import index as index_lib
    from realm_jax.train.checkpoints import Checkpoints
    from realm_jax.train.trainer import init_model

    cfg = self.pretrain_config()
    qa_storage = Storage.open(self.openqa_root)
    self._copy_corpus(self.openqa_root, replace=True)
    ckpt = Checkpoints(Storage.open(self.pretrain_root).uri("checkpoints"), read_only=True)
    step = ckpt.latest_step()
    model = init_model(cfg)
    ckpt.restore_part(step, model, "retriever")
    ckpt.close()
    model.eval()
    info = index_lib.build_and_publish_index(qa_storage, model.retriever.doc_embedder,
                                             CorpusReader(qa_storage), cfg.model, step=step)
    return {"version": info.version, "step": step}

  def recall_curve(self) -> dict:
    """recall@k of every index the trainer used (its block embeddings with the query tower of
    the checkpoint it was built from; step 0: the initial model, rebuilt from its seed), and of
    the final pre-trained retriever (the Open-QA index)."""
    from realm_jax import publish
    from realm_jax.retrieval import index as index_lib
    from realm_jax.train.checkpoints import Checkpoints
    from realm_jax.train.trainer import init_model

    cfg = self.pretrain_config()
    reader, blocks = self._blocks()
    examples = self.questions()
    probe = RecallProbe(blocks, examples, reader.tokenizer(), cfg.model.block_len, cfg.model.query_len,
                        ks=RECALL_KS)
    ckpt = Checkpoints(Storage.open(self.pretrain_root).uri("checkpoints"), read_only=True)
    todo = [(self.pretrain_root, v) for v in publish.list_versions(Storage.open(self.pretrain_root), index_lib.PREFIX)]
    todo += [(self.openqa_root, v) for v in publish.list_versions(Storage.open(self.openqa_root), index_lib.PREFIX)]
    points = []
    initial = init_model(cfg)  # step 0; later steps are restored into `trained`
    trained = init_model(cfg)
    bar = self.ui.steps("recall@5 of each index", len(todo))
    for i, (root, version) in enumerate(todo):
      storage = Storage.open(root)
      loaded = index_lib.load_index(storage, version, corpus=CorpusReader(storage))
      model = initial
      if loaded.info.step:
        ckpt.restore_part(loaded.info.step, trained, "retriever")
        model = trained
      recall = probe.recall(probe.embed_queries(model.retriever), np.asarray(loaded.embeddings, np.float32))
      points.append({"version": version, "step": loaded.info.step, "final": root == self.openqa_root,
                     **{f"recall@{k}": v for k, v in recall.items()}})
      bar.update(i + 1, len(todo))
    bar.close()
    ckpt.close()
    return {"points": points, "questions": len(examples)}

  def finetune(self) -> dict:
    from realm_jax.openqa.evaluate import Evaluator
    from realm_jax.openqa.finetune import Finetuner
    from realm_jax.retrieval import index as index_lib

    cfg = self.recipe.finetune_config(init=self.pretrain_root)
    train, test = self.questions("train"), self.questions("test")
    bar = self.ui.steps("Open-QA fine-tuning", cfg.num_train_steps)
    tuner = Finetuner(cfg, self.openqa_root, resume=True, questions=train, log_fn=self.ui.log, on_step=bar.update)
    try:
      tuner.run()
    finally:
      bar.close()
    embeddings = np.asarray(index_lib.load_index(Storage.open(self.openqa_root), tuner.index_version).embeddings,
                            np.float32)
    evaluator = Evaluator(tuner.model, cfg.model, tuner.tables, embeddings, tuner.mesh, batch_size=32,
                          recall_ks=(1, RECALL_K))
    preds, summary = evaluator.evaluate(test, "held-out questions")
    with open(self.workdir / "predictions.jsonl", "w") as f:
      for p in preds:
        f.write(json.dumps(p) + "\n")
    return {"test": summary.to_dict(), "train_questions": len(train), "steps": cfg.num_train_steps,
            "index_version": tuner.index_version}
