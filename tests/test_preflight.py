"""What a run refuses before it spends time, through the real CLI (one line, exit 2): starting
weights an experiment names but the user did not give, a base-size model from random weights, a
config on the wrong slice, a memory estimate that does not fit the slice's HBM. And the shipped
pod configs: each fits its declared slice by train/memory.py, with the accumulation it needs.

The CLI runs in this process (8 emulated CPU devices, conftest.py); the corpus is the facts corpus
named by its own URI (`--corpus`), so the run roots start empty and must stay without an index.
"""

from __future__ import annotations

import pytest

from realm_jax import slices
from realm_jax.cli.main import main
from realm_jax.config import get_preset
from realm_jax.train import memory, preflight
from realm_jax.train.config import TrainConfig, load_config

WIKIPEDIA_BLOCKS = 13_353_718
POD_CONFIGS = {"realm_v4_32": ("v4-32", 8), "ict_v4_32": ("v4-32", 4), "realm_v5e_64": ("v5litepod-64", 4),
               "ict_v5e_64": ("v5litepod-64", 2)}


@pytest.mark.parametrize("name", sorted(POD_CONFIGS))
def test_pod_configs_fit_their_slice(name):
  cfg = load_config(name)
  target, accum = POD_CONFIGS[name]
  paper = load_config("realm_wiki_base" if name.startswith("realm") else "ict_base")
  assert cfg.target_slice == target and cfg.grad_accum_steps == accum
  assert cfg.replace(grad_accum_steps=1, target_slice=None) == paper  # only the layout differs
  s = slices.get_slice(target)
  est = preflight.check_fits(cfg, s.devices, WIKIPEDIA_BLOCKS)  # the trainer's own start check
  assert est.total <= preflight.HEADROOM * s.hbm_bytes
  # Half the accumulation (twice the examples per device) would not fit: the choice is the smallest.
  assert memory.estimate(cfg.replace(grad_accum_steps=accum // 2), s.devices, WIKIPEDIA_BLOCKS).total > \
      preflight.HEADROOM * s.hbm_bytes
  # The starting weights are named, and a run without them refuses.
  with pytest.raises(Exception, match="init is required: BERT-base weights"):
    preflight.check_init(cfg)


def test_the_paper_configs_name_their_starting_weights():
  assert load_config("ict_base").init.startswith("required:BERT-base weights")
  realm = load_config("realm_wiki_base")
  assert realm.init.startswith("required:BERT-base weights for the encoder")
  assert realm.init_retriever.startswith("required:the ICT run's storage root")
  for name in ("realm_wiki_gpu", "ict_gpu", "realm_ccnews_base"):
    assert load_config(name).init.startswith("required:")


def test_slice_table():
  assert slices.get_slice("v4-32") == slices.Slice("v4-32", 16, 4, 32 * 2**30)
  assert slices.get_slice("v5e-64") == slices.get_slice("v5litepod-64") == slices.Slice("v5litepod-64", 64, 16,
                                                                                         16 * 2**30)
  assert slices.get_slice("v5litepod-8").hosts == 1 and slices.get_slice("v4-16").hosts == 2
  with pytest.raises(Exception, match="unknown target_slice 'v4-30'"):
    TrainConfig(target_slice="v4-30")


def _refused(capsys, *argv: str) -> str:
  assert main(list(argv)) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  return err


@pytest.fixture
def corpus_uri(corpus_root) -> str:
  return str(corpus_root / "seed" / "corpus")


def test_named_weights_must_be_given(capsys, tmp_path):
  err = _refused(capsys, "pretrain", "--config", "realm_v4_32", "--storage", str(tmp_path / "run"))
  assert err == ("realm-jax pretrain: error: init is required: BERT-base weights for the encoder (realm-jax convert "
                 "hf --kind bert ... --out URI); pass --set init=URI (or --init URI)")
  err = _refused(capsys, "pretrain", "--config", "realm_v4_32", "--storage", str(tmp_path / "run"),
                 "--init", str(tmp_path / "bert"))
  assert err.startswith("realm-jax pretrain: error: init_retriever is required: the ICT run's storage root")
  err = _refused(capsys, "finetune", "--config", "openqa_nq", "--storage", str(tmp_path / "qa"))
  assert "init is required: the pre-trained REALM run's storage root" in err
  assert not (tmp_path / "run").exists() and not (tmp_path / "qa").exists()


def test_a_base_model_never_starts_from_random_weights_by_accident(capsys, tmp_path, corpus_uri):
  err = _refused(capsys, "ict", "--config", "ict_base", "--storage", str(tmp_path / "run"), "--set", "init=null")
  assert err == ("realm-jax ict: error: init is not set: this 12-layer, 768-wide model would start from random "
                 "weights; pass --init URI (e.g. BERT-base weights from `realm-jax convert hf --kind bert`), or "
                 "--set init=random to mean it")
  # init=random gets past that check, to the next one: ict_v4_32 needs a v4-32's 16 devices, not 8.
  err = _refused(capsys, "ict", "--config", "ict_v4_32", "--storage", str(tmp_path / "run"), "--corpus", corpus_uri,
                 "--init", "random")
  assert err == ("realm-jax ict: error: target_slice=v4-32 has 16 devices but this run has 8: run it on a v4-32, "
                 "or set target_slice to the slice it runs on")
  assert not (tmp_path / "run" / "index").exists()


def test_a_config_that_does_not_fit_its_slice_is_refused_before_any_embedding(capsys, tmp_path, corpus_uri):
  """A v5e-8 has 8 devices, like this test process: the REALM paper batch in one step (64 examples
  per device, ~540 GiB by the estimate) against its 16 GiB; the same with accumulation fits."""
  config = tmp_path / "realm_v5e_8.py"
  config.write_text("from realm_jax.train.config import load_config\n\n\ndef get_config():\n"
                    "  return load_config('realm_wiki_base').replace(target_slice='v5e-8', init='random',\n"
                    "                                                init_retriever=None)\n")
  err = _refused(capsys, "pretrain", "--config", str(config), "--storage", str(tmp_path / "run"),
                 "--corpus", corpus_uri)
  assert err.startswith("realm-jax pretrain: error: the memory estimate does not fit: ")
  assert "GiB per device (params 0.8, optimizer 1.6, gradients 0.8, activations " in err
  assert "64 example(s) per device) > 90% of v5litepod-8's 16 GiB of HBM per device (batch_size=512, " \
         "grad_accum_steps=1, 8 devices, 16 blocks); raise grad_accum_steps, or --set memory_check=false" in err
  assert not (tmp_path / "run" / "index").exists() and not (tmp_path / "run" / "checkpoints").exists()
  fits = load_config(str(config), ["grad_accum_steps=64"])
  assert preflight.check_fits(fits, 8, 16).total < 0.9 * 16 * 2**30


def test_on_cpu_without_a_declared_slice_there_is_nothing_to_compare():
  cfg = TrainConfig(model=get_preset("base"), init="random")
  assert preflight.device_memory() is None
  assert preflight.check_fits(cfg, 8, 16) is None
  assert preflight.check_fits(cfg, 8, 16, device_bytes=16 * 2**30 * 100) is not None
  with pytest.raises(Exception, match="does not fit: .* > 90% of 1.0 GiB per device"):
    preflight.check_fits(cfg.replace(memory_check=True), 8, 16, device_bytes=2**30)
