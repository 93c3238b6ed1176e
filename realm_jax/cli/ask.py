"""`realm-jax ask "question"`: the answer of a fine-tuned model, its evidence block and scores."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("ask", help="Answer a question with a fine-tuned Open-QA model",
                     description="Retrieve, read and print the best answer with its evidence block.")
  p.add_argument("question", help="the question, in quotes")
  p.add_argument("--storage", required=True, help="fine-tuning storage root (corpus, index, checkpoints)")
  p.add_argument("--top", type=int, default=1, help="how many distinct answers to show (default 1)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--weights", default=None, help="converted weights (retriever + reader) instead of a checkpoint")
  p.add_argument("--index", default=None, help="index version (default: the one the model was fine-tuned with)")
  p.add_argument("--retrieval", choices=("device", "scann"), default="device",
                 help="device: exact MIPS over the index on the mesh (default); scann: the index version's "
                 "ScaNN searcher on the host (no accelerator needed for retrieval)")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from rich.console import Console
  from rich.panel import Panel

  from realm_jax.errors import ConfigError
  from realm_jax.openqa.answer import Answerer, highlighted
  from realm_jax.openqa.features import QuestionError
  from realm_jax.openqa.loading import load_for_answering

  if args.top < 1:
    raise ConfigError(f"--top must be >= 1, got {args.top}")
  if not args.question.strip():
    raise QuestionError("the question is empty")
  setup = load_for_answering(args.storage, args.step, args.weights, args.index, role="ask",
                             retrieval=args.retrieval)
  answerer = Answerer(setup.finetuned.model, setup.finetuned.config, setup.tables, setup.index,
                      setup.mesh, candidates=max(20, 4 * args.top), searcher=setup.searcher)
  answers = answerer.ask(args.question, args.top)
  console = Console()
  if not answers:
    console.print("no answer found")
    return 1
  for i, a in enumerate(answers, start=1):
    console.print(f"[bold]{i}. {a.text}[/bold]  score {a.score:.3f} = reader {a.reader_score:.3f} + "
                  f"retriever {a.retriever_score:.3f}")
    console.print(Panel(highlighted(a), title=f"{a.title} (block {a.block_id}, retrieval rank {a.block_rank})"))
  return 0
