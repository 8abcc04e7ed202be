"""Progress of long stages: a rich spinner with the stage's elapsed time on a terminal, plain log lines when
the output goes to a log file (or a Ray worker's pipe)."""
from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

_ACTIVE: list = []  # the rich Progress shown now (stages nest: an inner stage adds a line to the outer display)


@contextmanager
def stage_progress(name: str, console=None) -> Iterator[None]:
    """Show stage ``name`` while the ``with`` body runs, then log ``stage NAME done in S s`` (seconds).

    On a terminal (``console.is_terminal``; default: a rich Console on stderr) a transient line with a spinner
    and the elapsed time, one per running stage; otherwise a ``stage NAME ...`` line when it starts. rich is
    imported only on a terminal."""
    t0 = time.perf_counter()
    terminal = console.is_terminal if console is not None else sys.stderr.isatty()
    if not terminal:
        log.info("stage %s ...", name)
        yield
    elif _ACTIVE:
        progress = _ACTIVE[-1]
        task = progress.add_task(f"stage {name}", total=None)
        try:
            yield
        finally:
            progress.remove_task(task)
    else:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=console or Console(stderr=True), transient=True) as progress:
            _ACTIVE.append(progress)
            progress.add_task(f"stage {name}", total=None)
            try:
                yield
            finally:
                _ACTIVE.pop()
    log.info("stage %s done in %.1f s", name, time.perf_counter() - t0)
