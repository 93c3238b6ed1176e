"""Open-QA fine-tuning initialised from a REALM pre-training root: the retriever is the pre-trained
one and the reader's BERT is the pre-trained knowledge-augmented encoder's (as REALM fine-tunes)."""

import jax
import numpy as np
import pytest
from flax import nnx

from realm_jax.data.qa import QAExample
from realm_jax.errors import RealmError
from realm_jax.openqa.config import load_finetune_config
from realm_jax.openqa.finetune import Finetuner
from realm_jax.train.config import load_config as load_train_config
from realm_jax.train.trainer import Trainer
from tests.test_trainer import OVERRIDES, _fresh_root

QUIET = lambda m: None  # noqa: E731


def _questions(corpus_root) -> list[QAExample]:
  import json
  docs = [json.loads(line) for line in (corpus_root / "docs.jsonl").read_text().splitlines()]
  return [QAExample(d["title"], f"Where was {d['title']} born?", [d["text"].split(" born in ")[1].split(".")[0]])
          for d in docs]


def _finetune_config(init: str):
  settings = ["batch_size=8", "async_checkpointing=false", "num_train_steps=4"]
  return load_finetune_config("openqa_smoke", settings).replace(init=init)


def _params(module) -> dict:
  return {"/".join(map(str, path)): np.asarray(v) for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _assert_same(got: dict, want: dict, what: str) -> None:
  assert sorted(got) == sorted(want), what
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=f"{what}: {name}")


@pytest.fixture(scope="module")
def pretrained(corpus_root, tmp_path_factory):
  """A 2-step REALM pre-training (smoke experiment) and its in-memory model after the last step."""
  root = _fresh_root(corpus_root, tmp_path_factory.mktemp("pretrain"), "root")
  trainer = Trainer(load_train_config("smoke", OVERRIDES), root, log_fn=QUIET, stop_after=2)
  result = trainer.run()
  assert result.step == 2
  return root, trainer.model


def test_finetuner_starts_from_the_pretrained_retriever_and_encoder(pretrained, corpus_root, tmp_path):
  root, pre = pretrained
  lines = []
  tuner = Finetuner(_finetune_config(root), _fresh_root(corpus_root, tmp_path, "ft"), log_fn=lines.append,
                    questions=_questions(corpus_root))
  assert any("checkpoint step 2" in line for line in lines), lines
  retriever = _params(tuner.model.retriever)
  _assert_same(retriever, _params(pre.retriever), "retriever")
  _assert_same(_params(tuner.model.reader.bert), _params(pre.encoder.bert), "reader BERT vs encoder BERT")
  # The pre-trained towers moved away from a fresh init (so the equalities above say something).
  fresh = Finetuner(_finetune_config(None), _fresh_root(corpus_root, tmp_path, "fresh"), log_fn=QUIET,
                    questions=_questions(corpus_root))
  name = next(n for n in retriever if n.endswith("layers/0/intermediate/kernel"))
  assert not np.allclose(retriever[name], _params(fresh.model.retriever)[name])
  # And it trains from there.
  result = tuner.run()
  assert result.step == 4 and all(np.isfinite(h["loss"]) for h in result.history)


def test_init_root_without_checkpoints_is_a_clear_error(corpus_root, tmp_path):
  questions = _questions(corpus_root)
  empty = _fresh_root(corpus_root, tmp_path, "no-ckpt")  # a corpus, never trained
  with pytest.raises(RealmError, match="no-ckpt: no checkpoints/"):
    Finetuner(_finetune_config(empty), _fresh_root(corpus_root, tmp_path, "ft1"), log_fn=QUIET, questions=questions)
  (tmp_path / "no-ckpt" / "checkpoints").mkdir()
  with pytest.raises(RealmError, match="no finished checkpoint"):
    Finetuner(_finetune_config(empty), _fresh_root(corpus_root, tmp_path, "ft2"), log_fn=QUIET, questions=questions)
  assert jax.device_count() == 8
