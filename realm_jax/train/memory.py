"""Per-device memory of a training run, by arithmetic on the configs (no JAX needed).

What one device holds during a REALM / ICT train step (`realm_step.train_step`):

* parameters (float32), AdamW moments mu and nu (float32, 2x params; BERT's AdamW keeps no
  bias-correction state) and, with `grad_accum_steps > 1`, optax.MultiSteps' accumulated
  gradients (1x params); replicated by default, divided over a mesh axis under `fsdp` rules;
* gradients (float32, 1x params), alive in the step's temporaries;
* the index embeddings `[num_blocks, retriever_dim]`, row-sharded over every device
  (`retrieval/mips.py`), and the block-token table `[num_blocks, block_len]` (uint16 for
  vocabularies up to 65,536 ids, else int32; `train/device_corpus.py`) that candidates are
  gathered from;
* activations kept for the backward pass, per example of the per-device micro-batch:
  the query tower over `query_len`, the document tower over `num_candidates x block_len`, the
  knowledge-augmented encoder over `num_candidates x (query_len + block_len)`, and the MLM logits
  at the `max_masks` masked positions only (`[C, M, vocab]` float32, never over all positions);
* search temporaries: one tile of scores `[global micro-batch, chunk_rows]` and the per-group
  maxima of the exact filter.

The transformer activation count follows what autodiff keeps per layer and token (as in
Korthikanti et al. 2022, "Reducing Activation Recomputation", adapted to our layers: see
`bert_activation_bytes`). `remat=True` gives what per-layer rematerialisation (`nnx.remat` around
each BertLayer) would keep instead: each layer's input, plus one layer's full activations for the
largest tower pass while it is recomputed. `model.bert.remat` ("full", "dots") does this in the
model; `estimate` still defaults to `remat=False`, because XLA:CPU's compiled step keeps about
the same temporaries with it (benchmarks/README.md) and no accelerator has confirmed the savings.
"""

from __future__ import annotations

import dataclasses
import math

from realm_jax import rules
from realm_jax.config import BertConfig, RealmConfig
from realm_jax.errors import ConfigError

GIB = 1024 ** 3
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def token_bytes(cfg: RealmConfig) -> int:
  """Bytes per stored token id: uint16 when the vocabulary fits (BERT's does), else int32."""
  return 2 if cfg.bert.vocab_size <= 1 << 16 else 4


def bert_params(b: BertConfig, pooler: bool) -> int:
  """Parameter count of `models/bert.BertEncoder`."""
  h, i = b.hidden_size, b.intermediate_size
  emb = (b.vocab_size + b.max_position_embeddings + b.type_vocab_size) * h + 2 * h
  layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
  return emb + b.num_layers * layer + ((h * h + h) if pooler else 0)


def realm_params(cfg: RealmConfig) -> int:
  """Parameter count of `models/realm.RealmModel` (retriever tower(s) + encoder with MLM head)."""
  h, d = cfg.bert.hidden_size, cfg.retriever_dim
  tower = bert_params(cfg.bert, pooler=True) + h * d + d + 2 * d
  towers = tower if cfg.share_embedders else 2 * tower
  encoder = bert_params(cfg.bert, pooler=False) + (h * h + h) + 2 * h + cfg.bert.vocab_size
  return towers + encoder


def _per_sequence(b: BertConfig, seq_len: int, dropout: bool) -> tuple[int, int]:
  """(one layer's, the embeddings') bytes kept for backward for one `seq_len`-token sequence."""
  s = _DTYPE_BYTES[b.dtype]
  h, i, a, n = b.hidden_size, b.intermediate_size, b.num_heads, seq_len
  drop = 1 if dropout and b.dropout_rate > 0 else 0
  gelu = 6 if b.hidden_act == "gelu_new" else 4 if b.hidden_act == "gelu" else 2
  per_token = (5 * h + gelu * i) * s + 6 * h * 4 + 2 * drop * h
  attention = a * n * (s + drop)
  embeddings = n * (3 * h * 4 + h * (s + drop))  # LayerNorm (float32), dropout output and mask
  return n * (per_token + attention), embeddings


def bert_activation_bytes(b: BertConfig, seq_len: int, remat: bool = False, dropout: bool = True) -> int:
  """Bytes autodiff keeps for the backward pass of one `seq_len`-token sequence through BertEncoder.

  Per layer and token (`jax._src.ad_checkpoint.saved_residuals` of `models/bert.py`): q, k, v,
  context and the LayerNorm-1 output (5 x hidden) plus the GELU input and its intermediates
  (6 x intermediate for tanh-GELU, 4 for erf-GELU) in the compute dtype; two LayerNorms x 3
  hidden-sized float32 tensors; two 1-byte dropout masks. Per head and key: what the attention's
  hand-written backward saves (`models/attention.py`), the probabilities in the compute dtype and
  a 1-byte dropout mask (XLA:CPU measured by tests/test_memory_estimate.py: within 25%).
  With `remat`, only each layer's input is kept (add `bert_layer_bytes` for the layer recomputed).
  """
  layer, embeddings = _per_sequence(b, seq_len, dropout)
  if remat:
    return embeddings + b.num_layers * seq_len * b.hidden_size * _DTYPE_BYTES[b.dtype]
  return embeddings + b.num_layers * layer


def bert_layer_bytes(b: BertConfig, seq_len: int, dropout: bool = True) -> int:
  """One BertLayer's activations for one sequence (what remat recomputes and holds at a time)."""
  return _per_sequence(b, seq_len, dropout)[0]


def mlm_logits_bytes(cfg: RealmConfig, positions: int, copies: int = 3) -> int:
  """Float32 MLM logits at the masked positions of one example across its candidates: the logits,
  their softmax for the cross entropy's gradient and the metrics' log-softmax (`copies`)."""
  return copies * cfg.num_candidates * positions * cfg.bert.vocab_size * 4


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device, by part; `total` is what must fit into one device's memory."""

  params: int
  optimizer: int
  gradients: int
  index: int
  block_tokens: int
  activations: int
  search: int
  batch: int
  per_example_activations: int
  per_device_batch: int
  remat: bool

  PARTS = ("params", "optimizer", "gradients", "index", "block_tokens", "activations", "search", "batch")

  @property
  def total(self) -> int:
    return sum(getattr(self, p) for p in self.PARTS)

  @property
  def arguments(self) -> int:
    """What the compiled step takes as inputs (XLA's argument size): state, corpus, index, batch."""
    return self.params + self.optimizer + self.index + self.block_tokens + self.batch

  @property
  def temporaries(self) -> int:
    """What the step allocates while it runs (XLA's temp size): activations, grads, search tiles."""
    return self.gradients + self.activations + self.search

  def rows(self) -> list[tuple[str, int]]:
    return [(p, getattr(self, p)) for p in self.PARTS] + [("total", self.total)]


def _fsdp_ways(cfg, num_devices: int) -> int:
  """Over how many devices every parameter is split: 1 (replicated), or the size of the one mesh
  axis all rules shard over. `min_size_mb` is not modelled (the small parameters it keeps
  replicated are a rounding error next to the large ones)."""
  parsed = {rules.parse_sharding(value) for _, value in cfg.param_sharding}
  if all(not r.fsdp for r in parsed):
    return 1
  axes = {r.axis for r in parsed if r.fsdp}
  if len(axes) == 1 and all(r.fsdp for r in parsed):
    return cfg.mesh_model if axes == {"model"} else num_devices // cfg.mesh_model
  raise ConfigError(f"the memory estimate handles all-replicated param_sharding or FSDP of every parameter over "
                    f"one axis, got {cfg.param_sharding!r}")


def estimate(cfg, num_devices: int, num_blocks: int, *, index_dtype: str = "float32", remat: bool = False,
             chunk_rows: int | None = None, group_size: int = 32, accelerator: bool = True) -> MemoryEstimate:
  """Per-device bytes of a `TrainConfig` on `num_devices` devices with a `num_blocks` corpus.

  `chunk_rows` is the search tile (default: mips.search's, 65536 on accelerators, 4096 on CPU).
  """
  if num_devices < 1 or num_devices % cfg.mesh_model:
    raise ConfigError(f"num_devices ({num_devices}) must be a positive multiple of mesh_model ({cfg.mesh_model})")
  if num_blocks < 1:
    raise ConfigError(f"num_blocks must be >= 1, got {num_blocks}")
  if index_dtype not in _DTYPE_BYTES:
    raise ConfigError(f"index_dtype must be one of {sorted(_DTYPE_BYTES)}, got {index_dtype!r}")
  m = cfg.model
  data = num_devices // cfg.mesh_model
  micro = cfg.batch_size // cfg.grad_accum_steps
  if micro % data:
    raise ConfigError(f"the micro-batch ({micro}) must be divisible by the data-parallel size ({data})")
  b = micro // data

  p = realm_params(m) * 4
  ways = _fsdp_ways(cfg, num_devices)
  p_dev = -(-p // ways)
  opt = (2 + (1 if cfg.grad_accum_steps > 1 else 0)) * p_dev
  grads = p  # gradients of replicated compute are full size

  rows = -(-num_blocks // num_devices)  # rows per device, padded to a multiple of the shard count
  realm = cfg.task == "realm"
  index = rows * m.retriever_dim * _DTYPE_BYTES[index_dtype] if realm else 0
  tokens = rows * m.block_len * token_bytes(m) if realm else 0

  c = m.num_candidates
  if realm:
    per_example = (bert_activation_bytes(m.bert, m.query_len, remat)
                   + c * bert_activation_bytes(m.bert, m.block_len, remat)
                   + c * bert_activation_bytes(m.bert, m.query_len + m.block_len, remat)
                   + mlm_logits_bytes(m, cfg.max_masks))
    if remat:  # the largest single pass recomputed at a time: one layer of the encoder's candidates
      per_example += c * max(bert_layer_bytes(m.bert, m.query_len + m.block_len), bert_layer_bytes(m.bert, m.block_len))
    batch_bytes = b * (4 * m.query_len * 3 + 4 * cfg.max_masks * 3 + 4 * 2)
    chunk = chunk_rows or (65536 if accelerator else 4096)
    search = micro * (min(chunk, rows) + math.ceil(rows / group_size)) * 4 + 2 * micro * (c - 1) * m.block_len * 4
  else:  # ICT: query and block towers, in-batch [B_global] scores
    per_example = bert_activation_bytes(m.bert, m.query_len, remat) + bert_activation_bytes(m.bert, m.block_len, remat)
    if remat:
      per_example += bert_layer_bytes(m.bert, m.block_len)
    per_example += 3 * micro * 4
    batch_bytes = b * 4 * 3 * (m.query_len + m.block_len)
    search = 0
  return MemoryEstimate(params=p_dev, optimizer=opt, gradients=grads, index=index, block_tokens=tokens,
                        activations=b * per_example, search=search, batch=batch_bytes,
                        per_example_activations=per_example, per_device_batch=b, remat=remat)


def max_per_device_batch(cfg, num_devices: int, num_blocks: int, hbm_bytes: int, *, index_dtype: str = "float32",
                         remat: bool = False, headroom: float = 0.9) -> int:
  """The largest per-device micro-batch whose estimate fits in `headroom x hbm_bytes` (0: none)."""
  data = num_devices // cfg.mesh_model
  best = 0
  for b in range(1, 4097):
    micro = b * data
    try:
      est = estimate(cfg.replace(batch_size=micro * cfg.grad_accum_steps), num_devices, num_blocks,
                     index_dtype=index_dtype, remat=remat)
    except ConfigError:
      continue
    if est.total > headroom * hbm_bytes:
      break
    best = b
  return best


def encoder_flops(b: BertConfig, seq_len: int) -> int:
  """Forward FLOPs of one `seq_len`-token sequence through BertEncoder (matmuls; 2 per MAC)."""
  h, i, n = b.hidden_size, b.intermediate_size, seq_len
  layer = 2 * n * (4 * h * h + 2 * h * i) + 2 * 2 * n * n * h  # projections + FFN, QK^T and PV
  return b.num_layers * layer


def refresh_seconds(num_blocks: int, blocks_per_second_per_device: float, devices: int) -> float:
  """Index refresh time: num_blocks / (per-device blocks/s x devices)."""
  if blocks_per_second_per_device <= 0 or devices < 1:
    raise ConfigError("refresh_seconds needs a positive throughput and device count")
  return num_blocks / (blocks_per_second_per_device * devices)
