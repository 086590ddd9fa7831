"""Progress of a run on stderr: rich's bar on a terminal; plain lines with rate and ETA otherwise (a log file, a
pipe, CI), so a long run shows where it is while it runs rather than only at the end. While samples are being
generated on the native engine, `tokens(bar, generated, decoding)` reports the tokens generated so far and the samples
decoding (the runner calls it at most once a second), so long generations (AIME, HumanEval) are never silent: a
terminal's bar shows them as they change, a log gets a line at most every 30 s. An ETA is printed only from a measured
rate over at least one interval: the first answer of a batch that decodes many samples at once says nothing of the
rest."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, Iterator, TextIO

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
                          "started": None, "printed": 0.0, "generated": 0, "decoding": 0})
        resumed = f" ({completed} already done)" if completed else ""
        self._write(f"{name}: {total - completed} of {total} samples to answer{resumed}{note}")
        return len(self.bars) - 1

    def start(self, bar: int) -> None:
        self.bars[bar]["started"] = self.bars[bar]["started"] or time.perf_counter()
        self.bars[bar]["printed"] = time.perf_counter()  # the start line was just written

    def advance(self, bar: int, count: int) -> None:
        state = self.bars[bar]
        state["completed"] += count
        now = time.perf_counter()
        first = state["completed"] - state["start_completed"] == count
        if first or state["completed"] >= state["total"] or now - state["printed"] >= self.interval:
            self._write(self._line(state, now))

    def tokens(self, bar: int, generated: int, decoding: int) -> None:
        """Tokens generated so far in this task and samples decoding now: a line at most every `interval` seconds."""
        state = self.bars[bar]
        state["generated"], state["decoding"] = generated, decoding
        now = time.perf_counter()
        if now - state["printed"] >= self.interval:
            self._write(self._line(state, now))

    def _line(self, state: dict[str, Any], now: float) -> str:
        """`niah: 4/9 samples, 0.41 samples/s, ETA 0:00:12, 310 tokens generated (25.3 tokens/s), 4 samples decoding`;
        after a single answer `first after 0:00:09` instead of a rate (one answer of a batch decoding many samples at
        once projects nothing); the tokens part while the engine reports them."""
        state["printed"] = now
        elapsed = max(now - (state["started"] or now), 1e-9)
        done_here = state["completed"] - state["start_completed"]
        rate, left = done_here / elapsed, state["total"] - state["completed"]
        line = f"{state['name']}: {state['completed']}/{state['total']} samples"
        if done_here and not left:
            line += f", {rate:.2f} samples/s, {_clock(elapsed)} elapsed"
        elif done_here == 1:
            line += f", first after {_clock(elapsed)}"
        elif done_here > 1:
            line += f", {rate:.2f} samples/s, ETA {_clock(left / rate)}"
        if state["generated"] and left:
            line += (f", {state['generated']} tokens generated ({state['generated'] / elapsed:.1f} tokens/s), "
                     f"{state['decoding']} samples decoding")
        return line

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


class RichProgress:
    """rich's bar (a terminal): task, bar, done/total, rate, time remaining."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[tokens]}"), transient=False)
        self.state: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> "RichProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def add_task(self, name: str, total: int, completed: int = 0, note: str = "") -> int:
        bar = self.progress.add_task(name + note, total=total, completed=completed, rate="", tokens="")
        self.state[bar] = {"started": None, "done": 0}
        return bar

    def start(self, bar: int) -> None:
        self.state[bar]["started"] = self.state[bar]["started"] or time.perf_counter()

    def advance(self, bar: int, count: int) -> None:
        state = self.state[bar]
        state["done"] += count
        rate = state["done"] / max(time.perf_counter() - (state["started"] or time.perf_counter()), 1e-9)
        self.progress.update(bar, advance=count, rate=f"{rate:.2f} samples/s")

    def tokens(self, bar: int, generated: int, decoding: int) -> None:
        started = self.state[bar]["started"] or time.perf_counter()
        speed = generated / max(time.perf_counter() - started, 1e-9)
        self.progress.update(bar, tokens=f"{generated} tokens ({speed:.1f}/s), {decoding} samples decoding")


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

    def tokens(self, bar: int, generated: int, decoding: int) -> None:
        return None


@contextlib.contextmanager
def heartbeat(what: str, show: bool = True, stream: TextIO | None = None,
              interval: float | None = None) -> Iterator[None]:
    """While the block runs (a task building its samples: lengths measured by a remote tokenizer, RULER's searches), a
    line `WHAT (12 s so far)` every `interval` seconds (10 on a terminal, else the plain lines' interval), so a slow
    step before the first sample is not silent."""
    stream = stream or sys.stderr
    every = interval if interval is not None else (10.0 if stream.isatty() else PLAIN_INTERVAL_S)
    done = threading.Event()
    started = time.perf_counter()

    def beat() -> None:
        while not done.wait(every):
            stream.write(f"{what} ({time.perf_counter() - started:.0f} s so far)\n")
            stream.flush()

    thread = threading.Thread(target=beat, name="nsa-eval-heartbeat", daemon=True) if show else None
    if thread is not None:
        thread.start()
    try:
        yield
    finally:
        done.set()
        if thread is not None:
            thread.join()


def progress(show: bool, stream: TextIO | None = None) -> PlainProgress | RichProgress | NoProgress:
    """The progress display for a run: none, rich's bar when stderr is a terminal, else plain lines."""
    if not show:
        return NoProgress()
    stream = stream or sys.stderr
    return RichProgress() if stream.isatty() else PlainProgress(stream)
