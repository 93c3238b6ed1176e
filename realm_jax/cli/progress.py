"""The command line's progress bar for block counts (corpus building, embedding), with a rate
column; library functions only report through a `progress(done, ...)` callback."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


@contextlib.contextmanager
def blocks_bar(description: str, total: int | None = None, *, enabled: bool = True
               ) -> Iterator[Callable[..., None] | None]:
  """A rich bar on stderr; yields `update(blocks_done, documents=None)` (None when not `enabled`)."""
  if not enabled:
    yield None
    return
  from rich.console import Console
  from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
  )
  from rich.text import Text

  class Rate(ProgressColumn):
    def render(self, task):
      speed = task.finished_speed or task.speed
      return Text(f"{speed:,.0f} blocks/s" if speed else "- blocks/s")

  counts = [BarColumn(), MofNCompleteColumn()] if total else [TextColumn("{task.completed:,.0f} blocks"),
                                                              TextColumn("{task.fields[documents]}")]
  with Progress(SpinnerColumn(), TextColumn("{task.description}"), *counts, Rate(), TimeElapsedColumn(),
                console=Console(stderr=True)) as bar:
    task = bar.add_task(description, total=total, documents="")

    def update(blocks: int, documents: int | None = None) -> None:
      bar.update(task, completed=blocks, documents="" if documents is None else f"{documents:,} documents")

    yield update
