"""Progress of a run on stderr: rich's bar on a terminal; plain lines with rate and ETA otherwise (a log file, a
pipe, CI), so a long run shows where it is while it runs rather than only at the end."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

PLAIN_INTERVAL_S = float(os.environ.get("NSA_EVAL_PROGRESS_INTERVAL", "30"))  # at most one plain line per task this often


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """Lines such as `niah: 4/9 samples, 0.41 samples/s, ETA 0:00:12`: at the start of each task, after its first
    answer, then at most every `interval` seconds, and at its end."""

    def __init__(self, stream: TextIO | None = None, interval: float = PLAIN_INTERVAL_S):
        self.stream = stream or sys.stderr
        self.interval = interval
        self.bars: list[dict[str, Any]] = []

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, name: str, total: int, completed: int = 0, note: str = "") -> int:
        self.bars.append({"name": name, "total": total, "completed": completed, "start_completed": completed,
                          "started": None, "printed": 0.0})
        resumed = f" ({completed} already done)" if completed else ""
        self._write(f"{name}: {total - completed} of {total} samples to answer{resumed}{note}")
        return len(self.bars) - 1

    def start(self, bar: int) -> None:
        self.bars[bar]["started"] = self.bars[bar]["started"] or time.perf_counter()

    def advance(self, bar: int, count: int) -> None:
        state = self.bars[bar]
        state["completed"] += count
        now = time.perf_counter()
        done_here = state["completed"] - state["start_completed"]
        first = done_here == count
        if not (first or state["completed"] >= state["total"] or now - state["printed"] >= self.interval):
            return
        state["printed"] = now
        elapsed = max(now - (state["started"] or now), 1e-9)
        rate = done_here / elapsed
        left = state["total"] - state["completed"]
        eta = f", ETA {_clock(left / rate)}" if left and rate > 0 else f", {_clock(elapsed)} elapsed" if not left else ""
        self._write(f"{state['name']}: {state['completed']}/{state['total']} samples, {rate:.2f} samples/s{eta}")

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


class RichProgress:
    """rich's bar (a terminal): task, bar, done/total, rate, time remaining."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=False)
        self.state: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> "RichProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def add_task(self, name: str, total: int, completed: int = 0, note: str = "") -> int:
        bar = self.progress.add_task(name + note, total=total, completed=completed, rate="")
        self.state[bar] = {"started": None, "done": 0}
        return bar

    def start(self, bar: int) -> None:
        self.state[bar]["started"] = self.state[bar]["started"] or time.perf_counter()

    def advance(self, bar: int, count: int) -> None:
        state = self.state[bar]
        state["done"] += count
        rate = state["done"] / max(time.perf_counter() - (state["started"] or time.perf_counter()), 1e-9)
        self.progress.update(bar, advance=count, rate=f"{rate:.2f} samples/s")


class NoProgress:
    def __enter__(self) -> "NoProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, name: str, total: int, completed: int = 0, note: str = "") -> int:
        return 0

    def start(self, bar: int) -> None:
        return None

    def advance(self, bar: int, count: int) -> None:
        return None


def progress(show: bool, stream: TextIO | None = None) -> PlainProgress | RichProgress | NoProgress:
    """The progress display for a run: none, rich's bar when stderr is a terminal, else plain lines."""
    if not show:
        return NoProgress()
    stream = stream or sys.stderr
    return RichProgress() if stream.isatty() else PlainProgress(stream)
