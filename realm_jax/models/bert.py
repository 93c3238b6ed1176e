"""BERT in Flax NNX: the encoder every REALM tower is built on, and its tied MLM head.

Post-LayerNorm transformer layers, tanh-approximate GELU and LayerNorm epsilon 1e-12 as in the
original BERT, so that TF and HuggingFace checkpoints load without numerical drift. Parameters are
float32; `BertConfig.dtype` sets the compute dtype (bfloat16 on TPU). In bfloat16 every matmul
takes bfloat16 operands and accumulates in float32 (`preferred_element_type`), then rounds its
result to bfloat16, as TPU and GPU matmul units do natively. On a CPU with AMX, XLA:CPU runs the
float32-accumulating bfloat16 matmul at about 5x its float32 one, and a bfloat16-out one slower
than float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from realm_jax.config import BertConfig
from realm_jax.models.attention import accumulator as _accumulator, attend
from realm_jax.models.dropout import Dropout

_ACT = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def accumulating_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
  """`lax.dot_general` that accumulates low-precision operands in float32 and returns their dtype.
  A dense layer's contraction (`x[..., K] @ w[K, N]`) also computes its gradients that way."""
  if _accumulator(lhs.dtype) == lhs.dtype or preferred_element_type is not None or kw.get("out_sharding"):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kw)
  if dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and rhs.ndim == 2 and lhs.dtype == rhs.dtype:
    return _dense_matmul(lhs, rhs)
  return _accumulated(lhs, rhs, dimension_numbers, precision)


def _accumulated(a: jax.Array, b: jax.Array, dims, precision=None) -> jax.Array:
  """`dot_general` of low-precision operands with a float32 accumulator, rounded to their dtype."""
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32).astype(a.dtype)


@jax.custom_vjp
def _dense_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """`x[..., K] @ w[K, N]` in x's dtype with a float32 accumulator, forward and backward: autodiff
  of a float32-accumulating matmul would give float32 cotangents and mixed-dtype gradient matmuls,
  which XLA:CPU runs in float32."""
  return _accumulated(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_matmul_fwd(x, w):
  return _dense_matmul(x, w), (x, w)


def _dense_matmul_bwd(res, g):
  x, w = res
  g = g.astype(x.dtype)
  dx = _accumulated(g, w, (((g.ndim - 1,), (1,)), ((), ())))  # g @ w.T
  lead = tuple(range(x.ndim - 1))
  dw = _accumulated(x, g, ((lead, lead), ((), ())))  # x.T @ g over every leading axis
  return dx, dw


_dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


def _dense(cfg: BertConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, dtype=jnp.dtype(cfg.dtype), dot_general=accumulating_dot_general,
                    kernel_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)


def _norm(cfg: BertConfig, dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype), rngs=rngs)


def flatten_leading(*xs: jax.Array) -> tuple[tuple[int, ...], list[jax.Array]]:
  """Flattens `[..., L]` inputs to `[N, L]`; returns the leading shape to restore outputs."""
  lead = xs[0].shape[:-1]
  return lead, [x.reshape(-1, x.shape[-1]) for x in xs]


class BertEmbeddings(nnx.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(cfg.initializer_range)
    dtype = jnp.dtype(cfg.dtype)
    self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, embedding_init=init, rngs=rngs)
    self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype,
                                         embedding_init=init, rngs=rngs)
    self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, dtype=dtype,
                                           embedding_init=init, rngs=rngs)
    self.layer_norm = _norm(cfg, cfg.hidden_size, rngs)
    self.dropout = Dropout(cfg.dropout_rate, rngs=rngs)

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    positions = jnp.arange(input_ids.shape[-1])[None, :]
    x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
         + self.token_type_embeddings(token_type_ids))
    return self.dropout(self.layer_norm(x))


class SelfAttention(nnx.Module):
  """Multi-head self-attention with the output projection (residual and norm live in the layer).

  Without attention dropout (eval, or rate 0) on an accelerator it goes through
  `jax.nn.dot_product_attention` (cuDNN / TPU kernels). On XLA:CPU that function ran slower than
  the written-out einsum + softmax in same-run comparisons, so CPU keeps the latter; `fused`
  (True / False, None = by backend) forces either, e.g. to check both against HF on CPU."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.num_heads = cfg.num_heads
    self.query = _dense(cfg, h, h, rngs)
    self.key = _dense(cfg, h, h, rngs)
    self.value = _dense(cfg, h, h, rngs)
    self.output = _dense(cfg, h, h, rngs)
    self.dropout_rate = cfg.dropout_rate
    self.dropout = Dropout(cfg.dropout_rate, rngs=rngs)
    self.fused: bool | None = None

  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    b, n, h = x.shape
    def split(t):
      return t.reshape(b, n, self.num_heads, h // self.num_heads)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    fused = jax.default_backend() != "cpu" if self.fused is None else self.fused
    if fused and (self.dropout.deterministic or self.dropout_rate == 0.0):
      # Masked keys get a large negative logit: probabilities exactly 0, as BERT's additive mask.
      ctx = jax.nn.dot_product_attention(q, k, v, mask=attention_mask[:, None, None, :] > 0)
      return self.output(ctx.reshape(b, n, h))
    # Written out (CPU, or attention dropout in training, which dot_product_attention lacks), in
    # [batch, heads, L, d] with a hand-written backward (`attention.py`).
    def heads_first(t):
      return t.transpose(0, 2, 1, 3)
    q = q * jnp.asarray(1.0 / (h // self.num_heads) ** 0.5, q.dtype)
    # Additive mask in float32, as BERT: padded keys get the most negative finite value.
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    dropout = self.dropout.mask((b, self.num_heads, n, n))
    mask, inv_keep = (None, 1.0) if dropout is None else (dropout[0], 1.0 / dropout[1])
    ctx = attend(heads_first(q), heads_first(k), heads_first(v), bias, mask, jnp.float32(inv_keep))
    return self.output(heads_first(ctx).reshape(b, n, h))


class BertLayer(nnx.Module):
  """Post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.attention = SelfAttention(cfg, rngs=rngs)
    self.attention_norm = _norm(cfg, cfg.hidden_size, rngs)
    self.intermediate = _dense(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
    self.output = _dense(cfg, cfg.intermediate_size, cfg.hidden_size, rngs)
    self.output_norm = _norm(cfg, cfg.hidden_size, rngs)
    self.dropout = Dropout(cfg.dropout_rate, rngs=rngs)
    self.act = cfg.hidden_act

  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    x = self.attention_norm(x + self.dropout(self.attention(x, attention_mask)))
    y = self.output(_ACT[self.act](self.intermediate(x)))
    return self.output_norm(x + self.dropout(y))


def set_fused_attention(model: nnx.Module, fused: bool | None) -> None:
  """Sets `SelfAttention.fused` on every attention layer of `model` (None: by backend)."""
  for _, m in model.iter_modules():
    if isinstance(m, SelfAttention):
      m.fused = fused


_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _call_layer(layer: "BertLayer", x: jax.Array, mask: jax.Array) -> jax.Array:
  return layer(x, mask)


class BertEncoder(nnx.Module):
  """BERT: embeddings, `num_layers` post-LN layers and (optionally) the tanh pooler over [CLS].

  `config.remat` wraps each layer in `nnx.remat` (full, or saving batch-free matmul outputs) in
  training mode; in eval mode (embedding, answering) layers are called plainly."""

  def __init__(self, cfg: BertConfig, *, pooler: bool = True, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = BertEmbeddings(cfg, rngs=rngs)
    self.layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.pooler = _dense(cfg, cfg.hidden_size, cfg.hidden_size, rngs) if pooler else None

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array
               ) -> tuple[jax.Array, jax.Array | None]:
    """Inputs `[..., L]` int32. Returns (sequence output `[..., L, H]`, pooled `[..., H]` or None)."""
    lead, (ids, mask, types) = flatten_leading(input_ids, attention_mask, token_type_ids)
    x = self.embeddings(ids, types)
    remat = self.config.remat
    for layer in self.layers:
      if remat == "none" or self.embeddings.dropout.deterministic:  # eval: no backward to save for
        x = layer(x, mask)
      else:
        x = nnx.remat(_call_layer, policy=_REMAT_POLICIES[remat])(layer, x, mask)
    pooled = jnp.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
    x = x.reshape(*lead, *x.shape[-2:])
    if pooled is not None:
      pooled = pooled.reshape(*lead, pooled.shape[-1])
    return x, pooled


class MlmHead(nnx.Module):
  """BERT's masked-LM head: dense + GELU + LayerNorm, then logits tied to the word embeddings."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.transform = _dense(cfg, cfg.hidden_size, cfg.hidden_size, rngs)
    self.transform_norm = _norm(cfg, cfg.hidden_size, rngs)
    self.output_bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.float32))
    self.act = cfg.hidden_act

  def __call__(self, hidden: jax.Array, word_embeddings: nnx.Embed) -> jax.Array:
    x = self.transform_norm(_ACT[self.act](self.transform(hidden)))
    logits = word_embeddings.attend(x)
    return logits.astype(jnp.float32) + self.output_bias[...]
