"""bfloat16 compute (`bert.dtype="bfloat16"`): float32 parameters, bfloat16 matmul operands with
float32 accumulation, forward and backward; the float32 tower is the oracle for the numbers."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from realm_jax.config import get_preset
from realm_jax.models.bert import BertEncoder


def _tower(dtype: str) -> BertEncoder:
  cfg = get_preset("tiny", **{"bert.dtype": dtype, "bert.dropout_rate": 0.0}).bert
  return BertEncoder(cfg, pooler=False, rngs=nnx.Rngs(0))


def _inputs():
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(5, 1000, (2, 24)), jnp.int32)
  mask = jnp.asarray(np.arange(24)[None, :] < np.array([[24], [17]]), jnp.int32)
  return ids, mask, jnp.zeros_like(ids)


def _loss(model, ids, mask, types):
  hidden, _ = model(ids, mask, types)
  return (hidden.astype(jnp.float32) * mask[..., None]).std()


def test_bfloat16_dense_layers_accumulate_in_float32_forward_and_backward():
  """Every dense layer's matmul, and both of its gradient matmuls, take bfloat16 operands and
  accumulate in float32 (on AMX CPUs the only fast bfloat16 matmul; on TPU/GPU the native one);
  none rounds its accumulator to bfloat16."""
  model = _tower("bfloat16")
  text = jax.jit(lambda m, *x: nnx.grad(_loss)(m, *x)).lower(model, *_inputs()).as_text()
  dots = re.findall(r"stablehlo\.dot_general.*?: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\) -> tensor<[^>]*x(\w+)>",
                    text)
  kinds = collections.Counter(dots)
  assert kinds[("bf16", "bf16", "f32")] >= 3 * 6 * len(model.layers), kinds  # 6 dense layers a layer, x (fwd, dx, dw)
  assert kinds[("bf16", "bf16", "bf16")] == 0, kinds


def test_bfloat16_tower_tracks_the_float32_tower():
  f32, bf16 = _tower("float32"), _tower("bfloat16")
  x = _inputs()
  h32, _ = f32(*x)
  h16, _ = bf16(*x)
  m = np.asarray(x[1], bool)
  err = np.abs(np.asarray(h16, np.float32) - np.asarray(h32))[m].max() / np.abs(np.asarray(h32))[m].max()
  assert err < 3e-2, err
  g32 = jax.tree.leaves(nnx.state(nnx.grad(_loss)(f32, *x), nnx.Param))
  g16 = jax.tree.leaves(nnx.state(nnx.grad(_loss)(bf16, *x), nnx.Param))
  assert all(a.dtype == jnp.float32 for a in g16)  # float32 parameters get float32 gradients
  total = np.sqrt(sum(float((np.asarray(a) ** 2).sum()) for a in g32))
  diff = np.sqrt(sum(float(((np.asarray(a) - np.asarray(b)) ** 2).sum()) for a, b in zip(g16, g32)))
  assert diff / total < 5e-2, diff / total
