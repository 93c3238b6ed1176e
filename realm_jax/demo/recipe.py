"""The demo's two recipes: `full` (MiniLM towers, meant for < 15 minutes on 2 cores) and `quick` (tiny
random towers, a minute or two: checks the whole loop in CI, not the quality)."""

from __future__ import annotations

import dataclasses

from realm_jax.config import RealmConfig, get_preset
from realm_jax.openqa.config import FinetuneConfig
from realm_jax.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Sizes of every stage of the demo."""

  name: str
  model: RealmConfig
  init: str | None  # "minilm" or None (random)
  # Corpus: the lead of each article of the Wikipedia excerpt (the refresher re-embeds all of it).
  article_chars: int
  max_articles: int | None
  block_len: int
  # ICT warm start of the retriever (0: none).
  ict_steps: int
  ict_batch: int
  ict_lr: float
  # Reading warm start of the knowledge-augmented encoder (0: none; `reading.py`).
  reading_steps: int
  reading_queries_per_block: int
  reading_batch: int
  reading_lr: float
  # REALM pre-training.
  realm_steps: int
  realm_batch: int
  realm_lr: float
  realm_lr_mults: tuple[tuple[str, float], ...]
  checkpoint_every: int  # each checkpoint is a chance for the refresher to publish
  control: bool  # also run the control: the same REALM steps with the retriever's update zeroed
  # Open-QA.
  test_fraction: float
  finetune_steps: int
  finetune_batch: int
  finetune_lr: float
  min_questions: int  # fewer answerable questions than this is an error (the excerpt changed?)
  seed: int = 0  # model initialisation and data order of every stage (not the question split)

  def ict_config(self) -> TrainConfig:
    return TrainConfig(
        model=self.model, task="ict", init=self.init, batch_size=self.ict_batch, learning_rate=self.ict_lr,
        num_train_steps=self.ict_steps, warmup_steps=max(1, self.ict_steps // 10),
        checkpoint_every=self.ict_steps, log_every=1, index_refresh="none", async_checkpointing=False,
        seed=self.seed)

  def pretrain_config(self, init: str | None = None) -> TrainConfig:
    """REALM pre-training, from `init` (the ICT weights) or the recipe's own init."""
    return TrainConfig(
        model=self.model, task="realm", init=init or self.init, batch_size=self.realm_batch,
        learning_rate=self.realm_lr, lr_mults=self.realm_lr_mults, num_train_steps=self.realm_steps,
        warmup_steps=max(1, self.realm_steps // 10), checkpoint_every=self.checkpoint_every,
        keep_checkpoints=1000, keep_index_versions=1000, log_every=1, index_refresh="async",
        index_poll_seconds=0.5, async_checkpointing=False, seed=self.seed)

  def control_config(self, init: str | None = None) -> TrainConfig:
    """The control: REALM pre-training's config with the retriever's update multiplied by 0 (its
    learning signal removed; the encoder trains on the same steps from the same start). Its index
    never changes, so it keeps the bootstrap index (no refresher)."""
    cfg = self.pretrain_config(init)
    return cfg.replace(lr_mults=((r"^retriever/", 0.0),) + tuple(cfg.lr_mults), index_refresh="none",
                       keep_checkpoints=1, checkpoint_every=self.realm_steps)

  def finetune_config(self, init: str) -> FinetuneConfig:
    """The ORQA reader on the frozen index; with a few dozen training questions the query tower
    stays as pre-trained (fine-tuning it on them only overfits), so held-out recall is
    pre-training's own."""
    return FinetuneConfig(
        model=self.model, init=init, train_questions="",
        retriever_beam_size=max(64, self.model.reader_beam_size), train_query_tower=False,
        batch_size=self.finetune_batch,
        learning_rate=self.finetune_lr, num_train_steps=self.finetune_steps,
        warmup_steps=max(1, self.finetune_steps // 10), checkpoint_every=self.finetune_steps,
        log_every=1, async_checkpointing=False, seed=self.seed)


def full() -> Recipe:
  # MiniLM's first 2 layers: a pre-trained BERT whose [CLS] is not yet a retriever (recall@5 ~0
  # on the demo's questions). Dropout off: with 0.1 the ICT loss stayed at ln 32 for 100 steps
  # (the [CLS] embeddings of all blocks nearly equal, dropout noise larger than their
  # differences); with 0 it fell to 2.75 in 40 steps. The reading warm start (150 steps) does not
  # yet teach the fresh MLM head to copy (held-out accuracy 0.4% with an answer-bearing block,
  # the same as with the null document): see README.md, "Where the recipe stands".
  return Recipe(
      name="full",
      model=get_preset("minilm", query_len=48, block_len=128, reader_len=176, num_candidates=5,
                       reader_beam_size=5, retrieval_dropout=0.0,
                       **{"bert.num_layers": 2, "bert.dropout_rate": 0.0}),
      init="minilm", article_chars=4000, max_articles=None, block_len=128,
      ict_steps=60, ict_batch=32, ict_lr=5e-4,
      reading_steps=150, reading_queries_per_block=4, reading_batch=16, reading_lr=4e-4,
      realm_steps=40, realm_batch=8, realm_lr=3e-4, realm_lr_mults=((r"^encoder/", 0.1),), checkpoint_every=10,
      control=True,
      test_fraction=0.5, finetune_steps=40, finetune_batch=8, finetune_lr=1e-4,
      min_questions=20)


def quick() -> Recipe:
  return Recipe(
      name="quick",
      model=get_preset("tiny", query_len=32, block_len=64, reader_len=96, num_candidates=4,
                       reader_beam_size=3),
      init=None, article_chars=1500, max_articles=40, block_len=64,
      ict_steps=4, ict_batch=16, ict_lr=1e-3,
      reading_steps=4, reading_queries_per_block=2, reading_batch=8, reading_lr=1e-3,
      realm_steps=12, realm_batch=8, realm_lr=1e-3, realm_lr_mults=(), checkpoint_every=3, control=True,
      test_fraction=0.5, finetune_steps=4, finetune_batch=8, finetune_lr=1e-3,
      min_questions=4)


RECIPES = {"full": full, "quick": quick}
