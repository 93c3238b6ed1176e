"""The sharding vocabulary (`rules.py`, `parallel.py`): which parameter lands where on the (data,
model) mesh under `replicated` / `fsdp(axis, min_size_mb)` rules, and what the rules refuse."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from realm_jax import parallel, rules
from realm_jax.errors import ConfigError
from realm_jax.train.config import TrainConfig


def _specs(mesh, rule_list, state):
  return {k: v.spec for k, v in parallel.param_sharding(mesh, rule_list, state).items()}


def test_fsdp_over_either_axis_from_a_minimum_size():
  assert jax.device_count() == 8
  mesh = parallel.make_mesh(2)  # data 4 x model 2
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  state = {
      "encoder/big/kernel": np.zeros((256, 1024), np.float32),  # 1 MiB
      "encoder/small/kernel": np.zeros((6, 10), np.float32),  # no dimension divisible by 4
      "retriever/dense/kernel": np.zeros((384, 128), np.float32),  # 192 KiB
      "retriever/dense/bias": np.zeros((128,), np.float32),
      "step": np.zeros((), np.int32),
  }
  specs = _specs(mesh, (("^encoder/", "fsdp"), ("kernel", "fsdp(axis=model, min_size_mb=0.1)"),
                        (".*", "replicated")), state)
  assert specs["encoder/big/kernel"] == P(None, "data")  # the largest dimension the axis divides
  assert specs["encoder/small/kernel"] == P()  # nothing divisible: replicated
  assert specs["retriever/dense/kernel"] == P("model", None)  # 0.19 MiB >= 0.1, over `model`
  assert specs["retriever/dense/bias"] == P() and specs["step"] == P()
  # Below the minimum size a parameter stays replicated; the first matching rule wins.
  specs = _specs(mesh, (("kernel", "fsdp(axis=data, min_size_mb=0.5)"), ("kernel", "fsdp")), state)
  assert specs["encoder/big/kernel"] == P(None, "data") and specs["retriever/dense/kernel"] == P()
  placed = parallel.place_state(state, parallel.param_sharding(mesh, (("kernel", "fsdp"),), state))
  shard = placed["encoder/big/kernel"].sharding.shard_shape((256, 1024))
  assert shard == (256, 256)


@pytest.mark.parametrize("value,match", [
    ("fsdp(axis=tensor)", "axis must be one of"),
    ("fsdp(min_size=4)", "unknown argument"),
    ("fsdp(min_size_mb=-1)", "min_size_mb must be a number >= 0"),
    ("sharded", "expected 'replicated', 'fsdp'"),
])
def test_bad_sharding_values_are_refused_by_the_config(value, match):
  with pytest.raises(ConfigError, match=match):
    TrainConfig(param_sharding=((".*", value),))


def test_rules_parse():
  assert rules.parse_sharding("fsdp") == rules.Sharding(True, "data", 0.0)
  assert rules.parse_sharding("fsdp(axis='model', min_size_mb=4)") == rules.Sharding(True, "model", 4.0)
  assert rules.parse_sharding("replicated") == rules.Sharding()
  assert rules.first_match((("^encoder/", 1), ("kernel", 2)), "retriever/kernel", 0) == 2
  assert rules.first_match((("^encoder/", 1),), "x/encoder/y", 0) == 0  # searched, so `^` anchors
  with pytest.raises(ConfigError, match="does not divide"):
    parallel.make_mesh(3)
