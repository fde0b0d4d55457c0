"""A transient progress bar on stderr that counts tokens, for engines that report (done, total)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn


class TokenBar:
    """"routing 1024/20000 tokens 0:00:03 eta 0:00:50"; it appears at the first count, goes at close."""

    def __init__(self, what: str):
        self.what = what
        self.bar = None
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = Progress(f"[bold]{self.what}", BarColumn(), MofNCompleteColumn(), "tokens", TimeElapsedColumn(),
                                "eta", TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.what, total=total)
        self.bar.update(self.task, completed=done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
