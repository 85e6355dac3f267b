"""Worker output: a progress bar (trial, epoch, metric) on a terminal, plain log lines elsewhere.

The training code only logs; each epoch's record carries a ``progress`` field that the bar reads,
so a worker whose output goes to a file or a parent process logs the same facts as lines.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


class ProgressHandler(logging.Handler):
    """Epoch records move this worker's bar; every other record is printed above it."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress
        self.task: TaskID | None = None

    def emit(self, record: logging.LogRecord) -> None:
        update = getattr(record, "progress", None)
        if update is None:
            self.progress.console.print(self.format(record), markup=False, highlight=False)
            return
        trial, epoch, epochs, metric = update
        if self.task is None:
            self.task = self.progress.add_task("", total=epochs, metric="")
        self.progress.update(self.task, description=f"trial {trial}", completed=epoch, total=epochs, metric=metric)


@contextmanager
def log_output(console: Console | None = None) -> Iterator[None]:
    """Route the ``tuner`` loggers for the length of a long command."""
    console = console or Console(stderr=True)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    if not console.is_terminal:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        yield
        return
    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs · {task.fields[metric]}", markup=False),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        handler = ProgressHandler(progress)
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            yield
        finally:
            root.removeHandler(handler)
