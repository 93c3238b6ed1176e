"""Kills across both roles (tests/helpers/chaos.py): a trainer and a refresher on one local storage
root, each SIGKILLed at random moments (during checkpoint writes and publish windows too) and
restarted, the trainer with --resume. At the end: TRAINING_DONE at the last step, every index
version verifies, LATEST loads, no torn version was ever loaded, every resume came from the newest
finalised checkpoint, no step was lost, and the final parameters are bit for bit those of a run
nobody killed. `benchmarks/chaos.py --kills N` runs the same with more kills.
"""

from __future__ import annotations

import time

from tests.helpers.chaos import chaos


def test_kills_across_trainer_and_refresher(corpus_seed, tmp_path):
  seed = int(time.time())
  report = chaos(corpus_seed, tmp_path, kills=5, steps=8, seed=seed)
  print(f"seed {seed}: {report.summary()}")
  assert set(report.kills) >= {"trainer", "checkpoint", "refresher", "publish", "both"}, report.summary()
  assert report.resumes and all(newest == resumed for newest, resumed in report.resumes), report.resumes
  assert report.max_param_diff == 0.0 and report.torn_loads == 0 and not report.lost_steps
