"""The Open-QA paper configs follow ORQA's schedule, and one question per step trains.

ORQA (`language/orqa`, README and `orqa_model.py`) fine-tunes one question per step at lr 1e-5 for
20 epochs of its resplit training sets (79,168 NQ-Open, 3,417 WebQuestions, 1,353 CuratedTrec
questions; the README's WebQuestions command: `--num_train_steps=$(( 3417 * 20 ))`), with BERT's
warmup min(10000, max(100, steps / 10)). The pod variants cover the same epochs at 64 per step.
"""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from realm_jax.config import get_preset
from realm_jax.data.corpus import build_corpus
from realm_jax.data.qa import QAExample
from realm_jax.errors import ConfigError
from realm_jax.openqa.config import FinetuneConfig, load_finetune_config, orqa_schedule
from realm_jax.openqa.finetune import Finetuner
from realm_jax.storage import Storage
from tests.helpers.facts_corpus import write_documents

README_TRAIN_QUESTIONS = {"nq": 79168, "wq": 3417, "ct": 1353}


@pytest.mark.parametrize("name", ["nq", "wq", "ct"])
def test_paper_configs_follow_orqas_schedule(name):
  cfg = load_finetune_config(f"openqa_{name}")
  steps = README_TRAIN_QUESTIONS[name] * 20
  assert (cfg.batch_size, cfg.learning_rate, cfg.num_train_steps) == (1, 1e-5, steps)
  assert cfg.warmup_steps == min(10000, max(100, steps // 10))
  assert (cfg.model.reader_beam_size, cfg.retriever_beam_size, cfg.eval_questions) == (5, 5000, f"{name}-test")
  assert (cfg.model.query_len, cfg.model.block_len, cfg.model.reader_len) == (64, 288, 320)


@pytest.mark.parametrize("name", ["nq", "wq", "ct"])
def test_pod_variants_cover_the_same_epochs(name):
  paper, pod = load_finetune_config(f"openqa_{name}"), load_finetune_config(f"openqa_{name}_pod")
  assert pod.batch_size == 64 and pod.model == paper.model and pod.eval_questions == paper.eval_questions
  # The same 20 epochs (rounded up to a whole step) and warmup in 1/64 of the steps, at ORQA's rate.
  assert pod.num_train_steps == math.ceil(paper.num_train_steps / 64)
  assert pod.warmup_steps == math.ceil(paper.warmup_steps / 64)
  assert pod.learning_rate == paper.learning_rate == 1e-5


def test_orqa_schedule_refuses_bad_input():
  with pytest.raises(ConfigError, match="lr_scaling must be one of"):
    orqa_schedule(10, lr_scaling="cubic")
  with pytest.raises(ConfigError, match="positive num_train_questions"):
    orqa_schedule(0)


def test_one_question_per_step_trains_through_the_finetuner(tmp_path):
  """Batch 1 on the 8-device test mesh: the data axis is 1 (`mesh_model=8` splits the index rows)."""
  docs = write_documents(tmp_path / "docs.jsonl")
  build_corpus([str(tmp_path / "docs.jsonl")], Storage.open(str(tmp_path / "root")), block_len=64)
  questions = [QAExample(d["title"], f"Where was {d['title']} born?", [d["city"]]) for d in docs]
  cfg = FinetuneConfig(
      model=get_preset("tiny", query_len=16, block_len=64, reader_len=80, reader_beam_size=2),
      retriever_beam_size=4, max_answers=1, max_answer_tokens=4, mesh_model=8, log_every=1,
      checkpoint_every=100, async_checkpointing=False,
      **orqa_schedule(len(questions), epochs=1, learning_rate=1e-3))
  assert (cfg.batch_size, cfg.num_train_steps) == (1, len(questions))
  tuner = Finetuner(cfg, str(tmp_path / "root"), questions=questions, log_fn=lambda m: None, stop_after=6)
  assert tuner.mesh.shape["data"] == 1
  before = [np.array(x) for x in jax.tree.leaves(nnx.state(tuner.model, nnx.Param))]
  result = tuner.run()
  assert result.step == 6 and [r["step"] for r in result.history] == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(r["loss"]) for r in result.history)
  assert tuner.stream.get_state() == {"epoch": 0, "position": 6, "num_questions": len(questions)}  # 1 per step
  after = [np.array(x) for x in jax.tree.leaves(nnx.state(tuner.model, nnx.Param))]
  assert any(not np.array_equal(a, b) for a, b in zip(before, after))
