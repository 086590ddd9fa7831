"""What a benchmark is to the harness: samples in, per-sample scores out, metrics aggregated.

No torch here. A task describes what to ask in plain data (`Sample`); the runner turns that into the
model interface's requests and gives the task back plain Python values to score:

- a generative sample (`sample.generative`: no continuations, not rolling) is answered with `list[str]`, its `n` texts;
- a log-likelihood sample is answered with `list[tuple[float, bool]]`, one (summed logprob in nats,
  is_greedy) per continuation, in order;
- a rolling sample (`sample.rolling`: the prompt is a whole document, scored token by token as lm-eval's
  loglikelihood_rolling) is answered with `list[tuple[float, int]]`, one (logprob in nats, position in the window
  that predicted it) per token of the document, in order.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

ChatMessages = list[dict[str, str]]
Prompt = Union[str, ChatMessages]


@dataclass
class Sample:
    """One item of a benchmark.

    id: stable across runs (resume and paired comparisons match samples by it).
    prompt: text, or chat messages for chat models.
    breakdown: the keys results break down by, e.g. {"length": 2048, "depth": 50}.
    target: the reference answer(s), JSON-serialisable, stored with the sample.
    continuations: for log-likelihood tasks, the candidate continuations (e.g. " A", " B", ...).
    rolling: the prompt (text) is a document whose every token is scored (perplexity); stride: its windows after the
    first predict this many new tokens each (None: disjoint windows of the model's max length, lm-eval's rolling).
    max_new_tokens / stop / temperature / top_p / n: generation settings for generative samples.
    """

    id: str
    prompt: Prompt
    target: Any
    breakdown: dict[str, Any] = field(default_factory=dict)
    continuations: list[str] | None = None
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    rolling: bool = False
    stride: int | None = None

    @property
    def generative(self) -> bool:
        """Answered with generated texts (neither continuations to score nor a document to score)."""
        return self.continuations is None and not self.rolling

    @property
    def prompt_hash(self) -> str:
        return prompt_hash(self.prompt, self.continuations)


def prompt_hash(prompt: Prompt, continuations: list[str] | None = None) -> str:
    """sha256 (first 16 hex digits) of the prompt and continuations, as stored with each sample."""
    payload = json.dumps([prompt, continuations], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class TaskContext:
    """What a task may know about the run when it builds its samples.

    count_tokens: the model's own tokenizer, on text or chat messages (chat template applied).
    chat: whether the model gets chat messages (chat template) rather than plain text.
    max_length: the model's prompt + generation budget in tokens.
    limit: the first N samples (each task's `limit_unit` says of what: the task, or each subject / subset).
    max_new_tokens: a cap on every sample's generation (`--max-new-tokens`), None for the tasks' own budgets;
    the runner applies it to the samples, and a task that checks a prompt + generation budget uses `new_tokens()`.
    """

    count_tokens: Callable[[Prompt], int]
    chat: bool
    max_length: int
    seed: int = 0
    limit: int | None = None
    max_new_tokens: int | None = None

    def new_tokens(self, wanted: int) -> int:
        """A task's generation budget under the run's cap."""
        return wanted if self.max_new_tokens is None else min(wanted, self.max_new_tokens)


class Task(ABC):
    """A benchmark: a task sets `name`, `version` (bumped whenever prompts or scoring change), `headline` (the
    metric reports lead with, a key of score()'s dict) and `breakdown_keys`, and implements config, samples and
    score; the rest has defaults."""

    name: str
    version: str
    headline: str
    breakdown_keys: tuple[str, ...] = ()
    limit_unit: str | None = None  # what `--limit N` counts per ("subject", "subset"); None: the task's first N samples
    notices: Sequence[str] = ()  # lines the CLI prints before the model loads (RULER: tasks left out for want of data)

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The task's options, JSON-serialisable; part of the run's config hash."""

    @abstractmethod
    def samples(self, ctx: TaskContext) -> list[Sample]: ...

    @abstractmethod
    def score(self, sample: Sample, output: list[Any]) -> dict[str, float]: ...

    def prepare(self) -> None:
        """Load and check the data; the CLI calls it before the model loads, so bad or empty data fails fast (a task's
        samples() calls it too)."""

    def check_length(self, max_length: int, cap: int | None = None) -> None:
        """A ValueError when the task's lengths cannot fit max_length (the CLI calls it before the model loads, when
        --max-length is given; cap: --max-new-tokens)."""

    def details(self, sample: Sample, output: list[Any]) -> dict[str, Any] | None:
        """Per-sample extras stored with the record (None: the record has no "details")."""
        return None

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Metrics from the stored sample records."""
        return aggregate_scores(records, self.breakdown_keys)


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n)); stderr is 0 for n < 2."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) from n samples of which `correct` passed: 1 - C(n-c, k) / C(n, k)."""
    if not 0 < k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples (n = {n})")
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def macro_average(cells: dict[str, dict[str, Any]], metric: str) -> dict[str, float]:
    """Unweighted mean of `metric` over the cells of one breakdown (e.g. MMLU subjects), with the stderr
    of that mean from the cells' own stderrs (independent cells): sqrt(sum se^2) / number of cells."""
    means = [cell[metric]["mean"] for cell in cells.values()]
    stderrs = [cell[metric]["stderr"] for cell in cells.values()]
    return {"mean": sum(means) / len(means), "stderr": math.sqrt(sum(s * s for s in stderrs)) / len(stderrs), "n": len(means)}


def aggregate_scores(records: list[dict[str, Any]], breakdown_keys: tuple[str, ...]) -> dict[str, Any]:
    """Default aggregation of sample records (each with "scores" and "breakdown" dicts).

    Returns {"n", "metrics": {name: {"mean", "stderr"}}, "breakdowns": {key: {value: {name: {"mean",
    "stderr", "n"}}}}}, plus, when two breakdown keys exist, the cross breakdown under "k1 x k2".
    """
    by_metric: dict[str, list[float]] = defaultdict(list)
    for record in records:
        for name, value in record["scores"].items():
            by_metric[name].append(float(value))
    metrics = {}
    for name, values in by_metric.items():
        mean, stderr = mean_stderr(values)
        metrics[name] = {"mean": mean, "stderr": stderr}

    def group(key_fn: Callable[[dict], Any]) -> dict[str, Any]:
        cells: dict[Any, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for record in records:
            for name, value in record["scores"].items():
                cells[key_fn(record)][name].append(float(value))
        out = {}
        for cell in sorted(cells, key=_sort_key):
            out[str(cell)] = {}
            for name, values in cells[cell].items():
                mean, stderr = mean_stderr(values)
                out[str(cell)][name] = {"mean": mean, "stderr": stderr, "n": len(values)}
        return out

    breakdowns = {key: group(lambda r, k=key: r["breakdown"].get(k)) for key in breakdown_keys}
    if len(breakdown_keys) == 2:
        k1, k2 = breakdown_keys
        breakdowns[f"{k1} x {k2}"] = group(lambda r: f"{r['breakdown'].get(k1)}|{r['breakdown'].get(k2)}")
    return {"n": len(records), "metrics": metrics, "breakdowns": breakdowns}


def _sort_key(value: Any) -> tuple:
    """Numbers before strings, numbers numerically ("2048|50" sorts by its parts)."""
    parts = str(value).split("|")
    return tuple((0, float(p), "") if is_number(p) else (1, 0.0, p) for p in parts)


def is_number(text: str) -> bool:
    """Whether a breakdown value reads as a number ("2048", "0.5")."""
    try:
        float(text)
        return True
    except ValueError:
        return False


class Tokens(int):
    """The type of a task option that is a length in tokens: written 4096 or 4k (k = 1024) on the command line
    (`--task-option niah.lengths=1k,2k`); tasks receive plain ints (`token_count`)."""


def token_count(value: Any, what: str) -> int:
    """4096, "4096" or "4k" -> 4096 (k = 1024); a ValueError naming `what` otherwise."""
    text = str(value).strip().lower()
    try:
        count = int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    except ValueError:
        raise ValueError(f"{what} '{value}' is not a whole number of tokens (e.g. 4096 or 4k)") from None
    return count


class DataError(ValueError):
    """Malformed benchmark data; the message names the file, the row and what is wrong."""
