"""Does the packaged MiniLM read before any reading warm start? Held-out reading accuracy on the demo.

One command: `python benchmarks/reading_probe.py [--layers 2 6] [--workdir DIR]`.
Builds the demo's corpus (the Wikipedia excerpt's article leads, 128-token blocks) in `--workdir`,
or reads it there when that is a `realm-jax demo` work directory that has one, and its reading
queries (`realm_jax/demo/reading.py`: a sentence with one salient span masked; held-out blocks),
loads the first N layers of MiniLM into the knowledge-augmented encoder, and measures the
masked-span accuracy reading an answer-bearing block and the null document, with the MLM head as
`init` leaves it (random: MiniLM ships none) and with an identity head (its dense layer the
identity, its bias and the output bias 0 but for the special tokens, so the logits are the
GELU'd, normalised hidden state against the tied word embeddings). An encoder that reads scores
clearly higher with the answer-bearing block than with the null document.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile

import jax.numpy as jnp
from flax import nnx

from realm_jax.config import get_preset
from realm_jax.convert import hf as hfconv
from realm_jax.data.corpus import CorpusReader
from realm_jax.demo import reading
from realm_jax.demo.pipeline import Demo
from realm_jax.demo.recipe import full
from realm_jax.demo.ui import ConsoleUI
from realm_jax.models.realm import RealmModel
from realm_jax.storage import Storage


def identity_head(encoder, special_ids) -> None:
  """The head's dense layer the identity, its output bias 0 except -1e4 for the special tokens
  (a [MASK] position's hidden state is closest to [MASK]'s own embedding: it may not predict it)."""
  mlm = encoder.mlm
  h = mlm.transform.kernel.shape[0]
  mlm.transform.kernel[...] = jnp.eye(h, dtype=mlm.transform.kernel.dtype)
  mlm.transform.bias[...] = jnp.zeros_like(mlm.transform.bias[...])
  mlm.transform_norm.scale[...] = jnp.ones_like(mlm.transform_norm.scale[...])
  mlm.transform_norm.bias[...] = jnp.zeros_like(mlm.transform_norm.bias[...])
  mlm.output_bias[...] = jnp.zeros_like(mlm.output_bias[...]).at[jnp.asarray(special_ids)].set(-1e4)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, nargs="+", default=[2, 6])
  p.add_argument("--workdir", help="where the demo corpus is built (default: a new temporary directory)")
  args = p.parse_args()
  print(f"uptime: {os.getloadavg()[0]:.2f} load (1 min)", flush=True)
  work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="reading-probe-"))
  recipe = full()
  if not (work / "pretrain" / "corpus" / "manifest.json").exists():  # a demo work directory's is read
    Demo(work, recipe, ConsoleUI()).build_corpus()
  reader = CorpusReader(Storage.open(str(work / "pretrain")))
  blocks = list(reader.iter_blocks())
  tok = reader.tokenizer()
  special = [tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.unk_id]
  data = reading.ReadingData(blocks, reader.tokenizer(), recipe.model.block_len, recipe.model.query_len,
                             max_masks=recipe.pretrain_config().max_masks,
                             queries_per_block=recipe.reading_queries_per_block, held_out_every=10, seed=0)
  print(f"{len(blocks)} blocks, {len(data.owner)} queries, {data.gold_fraction:.1%} with an answer-bearing block")
  print(f"{'layers':>6} {'MLM head':>9} | {'answer-bearing block':>20} {'null document':>14}")
  for layers in args.layers:
    cfg = get_preset("minilm", query_len=recipe.model.query_len, block_len=recipe.model.block_len,
                     **{"bert.num_layers": layers, "bert.dropout_rate": 0.0})
    model = RealmModel(cfg, rngs=nnx.Rngs(0))
    hfconv.init_from_minilm(model, layers)
    for head in ("random", "identity"):
      if head == "identity":
        identity_head(model.encoder, special)
      acc = reading.reading_accuracy(model.encoder, data)
      print(f"{layers:>6} {head:>9} | {acc['gold']:>20.1%} {acc['null']:>14.1%}", flush=True)
  print(f"uptime: {os.getloadavg()[0]:.2f} load (1 min)")


if __name__ == "__main__":
  main()
