"""Every named experiment (realm_jax/experiments/*.py) loads into a valid config, by name and by
path; the GPU ones fit an 8 x 80 GB node by the estimate."""

import pathlib

import pytest

import realm_jax
from realm_jax.errors import ConfigError
from realm_jax.openqa.config import FinetuneConfig
from realm_jax.train import memory
from realm_jax.train.config import TrainConfig, experiment_names, load_config, load_experiment

EXPERIMENTS = sorted(p for p in (pathlib.Path(realm_jax.__file__).parent / "experiments").glob("*.py")
                     if p.name != "__init__.py")


def test_there_are_experiments():
  assert {"realm_wiki_base", "ict_base", "realm_wiki_gpu", "ict_gpu"} <= {p.stem for p in EXPERIMENTS}
  assert experiment_names() == [p.stem for p in EXPERIMENTS]
  with pytest.raises(ConfigError, match="no experiment named 'smok'; the named ones are .*smoke"):
    load_config("smok")


@pytest.mark.parametrize("name", [p.stem for p in EXPERIMENTS])
def test_experiment_loads_by_name(name):
  kind = FinetuneConfig if name.startswith("openqa") else TrainConfig
  assert load_experiment(name, kind) == load_experiment(str(pathlib.Path(realm_jax.__file__).parent / "experiments"
                                                            / f"{name}.py"), kind)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_loads(path):
  kind = FinetuneConfig if path.stem.startswith("openqa") else TrainConfig
  cfg = load_experiment(str(path), kind)
  assert isinstance(cfg, kind) and cfg.batch_size > 0


@pytest.mark.parametrize("name,base", [("realm_wiki_gpu", "realm_wiki_base"), ("ict_gpu", "ict_base")])
def test_gpu_experiments_keep_the_paper_batch_and_fit_8_gpus(name, base):
  cfg, paper = load_config(name), load_config(base)
  assert cfg.batch_size == paper.batch_size and cfg.model == paper.model
  assert cfg.model.bert.dtype == "bfloat16" and not cfg.approx_top_k
  est = memory.estimate(cfg, 8, 13_353_718)
  assert est.total < 0.9 * 80e9, est
  # ...while the paper batch in one step would not.
  assert memory.estimate(cfg.replace(grad_accum_steps=1), 8, 13_353_718).total > 80e9
