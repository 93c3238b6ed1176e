"""Configs validate themselves; weights round-trip through orbax per part; the CLI installs."""

import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from realm_jax import weights
from realm_jax.config import BertConfig, RealmConfig, get_preset
from realm_jax.errors import ConfigError
from realm_jax.models import OpenQAModel, RealmModel


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden_size=100, num_heads=12), "divisible by num_heads"),
    (dict(num_layers=0), "num_layers must be a positive int"),
    (dict(hidden_act="swish"), "hidden_act must be one of"),
    (dict(dtype="int8"), "dtype must be one of"),
    (dict(dropout_rate=1.5), "dropout_rate"),
])
def test_bert_config_rejects_bad_values(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    BertConfig(**kwargs)


def test_realm_config_validation_and_json_round_trip():
  with pytest.raises(ConfigError, match="marginal must be one of"):
    RealmConfig(marginal="document")
  with pytest.raises(ConfigError, match="exceeds bert.max_position_embeddings"):
    get_preset("tiny", query_len=300)
  with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
    get_preset("huge")
  with pytest.raises(ConfigError, match=r"unknown RealmConfig fields: \['colour'\]"):
    RealmConfig.from_dict({"colour": 1})
  cfg = get_preset("minilm", marginal="span", **{"bert.dtype": "bfloat16"})
  assert cfg.bert.dtype == "bfloat16" and cfg.marginal == "span"
  assert RealmConfig.from_dict(cfg.to_dict()) == cfg
  assert cfg.fingerprint() != get_preset("minilm").fingerprint()


def test_presets_have_the_documented_sizes():
  assert (get_preset("tiny").bert.num_layers, get_preset("tiny").bert.hidden_size) == (2, 128)
  assert (get_preset("minilm").bert.num_layers, get_preset("minilm").bert.hidden_size) == (6, 384)
  base = get_preset("base")
  assert (base.bert.num_layers, base.bert.hidden_size, base.retriever_dim) == (12, 768, 128)


def test_weights_round_trip_by_part(tmp_path):
  cfg = get_preset("tiny", **{"bert.vocab_size": 300})
  src = RealmModel(cfg, rngs=nnx.Rngs(0))
  weights.save_weights(str(tmp_path / "w"), src, cfg)
  assert weights.read_config(str(tmp_path / "w")) == cfg
  with pytest.raises(weights.WeightsError, match="already exist"):
    weights.save_weights(str(tmp_path / "w"), src, cfg)
  dst = OpenQAModel(cfg, rngs=nnx.Rngs(1))
  assert weights.load_weights(str(tmp_path / "w"), dst) == ["retriever"]  # the parts both have
  np.testing.assert_array_equal(np.asarray(dst.retriever.query_embedder.projection.kernel[...]),
                                np.asarray(src.retriever.query_embedder.projection.kernel[...]))
  with pytest.raises(weights.WeightsError, match=r"not \['reader'\]"):
    weights.load_weights(str(tmp_path / "w"), dst, parts=["reader"])
  bigger = RealmModel(cfg.replace(**{"bert.hidden_size": 64, "bert.num_heads": 2}), rngs=nnx.Rngs(2))
  with pytest.raises(weights.WeightsError):
    weights.load_weights(str(tmp_path / "w"), bigger)
  with pytest.raises(weights.WeightsError, match="no realm_config.json"):
    weights.load_weights(str(tmp_path / "nothing"), dst)


def test_cli_help_and_forward():
  out = subprocess.run([sys.executable, "-m", "realm_jax.cli.main", "--help"], capture_output=True, text=True)
  assert out.returncode == 0 and "pretrain" in out.stdout and "refresh" in out.stdout
  out = subprocess.run([sys.executable, "-m", "realm_jax.cli.main", "forward", "--preset", "tiny"],
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert "marginal MLM loss" in out.stdout
  out = subprocess.run([sys.executable, "-m", "realm_jax.cli.main", "forward", "--preset", "huge"],
                       capture_output=True, text=True)
  assert out.returncode == 2 and "unknown model preset 'huge'" in out.stderr and "Traceback" not in out.stderr
