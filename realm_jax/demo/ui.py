"""Console output of the demo: a headline per stage, a rich progress bar per long stage, and the
library's log lines printed above the bars."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

TITLES = {
    "sources": "Real inputs from the package registry (cached)",
    "corpus": "Blocks with salient spans from the Wikipedia excerpt",
    "questions": "Open-QA questions answerable from the excerpt",
    "references": "Reference retrievers on the same blocks and questions (BM25, 6-layer MiniLM)",
    "ict": "ICT warm start of the retriever (the initial recall measured first)",
    "reading": "Reading warm start of the knowledge-augmented encoder (on the corpus itself)",
    "pretrain": "REALM pre-training, with the index refresher as a second process",
    "control": "Control: the same REALM steps from the same start, the retriever's update zeroed",
    "openqa_index": "Index of the pre-trained document tower (frozen for Open-QA)",
    "recall": "Retrieval recall of every index",
    "finetune": "Open-QA fine-tuning and evaluation",
}


class _Bar:
  def __init__(self, ui: "ConsoleUI", description: str, total: int):
    self.ui = ui
    self.progress = Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                             console=ui.console, transient=False, disable=not ui.console.is_terminal)
    self.task = self.progress.add_task(description, total=total)
    self.progress.start()
    ui._bar = self
    self.last_print = 0.0

  def update(self, done: int, total: int) -> None:
    self.progress.update(self.task, completed=done, total=total)
    if not self.ui.console.is_terminal and (time.monotonic() - self.last_print > 10 or done == total):
      self.ui.console.print(f"  {self.progress.tasks[0].description}: {done}/{total}")
      self.last_print = time.monotonic()

  def close(self) -> None:
    self.progress.stop()
    self.ui._bar = None


class ConsoleUI:
  """What the demo prints; `verbose` also shows every log line of the trainer and fine-tuner."""

  def __init__(self, verbose: bool = False, console: Console | None = None):
    self.console = console or Console(highlight=False)
    self.verbose = verbose
    self._bar: _Bar | None = None
    self.show_progress = self.console.is_terminal

  def begin(self, name: str) -> None:
    self.console.rule(f"[bold]{TITLES.get(name, name)}")

  def end(self, name: str, result: dict) -> None:
    self.console.print(f"  done in {result.get('seconds', 0):.0f} s")

  def cached(self, name: str, result: dict) -> None:
    self.console.print(f"[dim]{TITLES.get(name, name)}: cached from an earlier run[/dim]")

  def log(self, message: str) -> None:
    if message is None:
      return
    progress = message.startswith("step ")  # the trainer's per-step line: the bar shows it
    important = not progress and any(w in message for w in ("index", "resum", "refresher", "initialised",
                                                            "published", "swapp"))
    if self.verbose or important:
      (self._bar.progress.console if self._bar else self.console).print(f"  [dim]{message}[/dim]")

  def steps(self, description: str, total: int) -> _Bar:
    return _Bar(self, description, total)
