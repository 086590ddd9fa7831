"""AIME 2024: 30 competition problems with integer answers (0-999), chain of thought, as in the NSA paper.

The paper (Table 3) samples 16 responses per problem at temperature 0.7, top-p 0.95, under a generation
limit of 8k or 16k tokens, and reports mean accuracy. Each response is asked to reason step by step
and box its final answer; the answer is the last non-empty \\boxed{...} of the response, or its last
integer when it boxed none, and is checked against the reference with math-verify (so "025", "25" and
"\\frac{50}{2}" all match 25). Scores per problem: accuracy (the share of correct responses) and pass@k
(the chance that at least one of k responses drawn from the n is correct; unbiased estimator of Chen
et al. 2021). The generation budget used (max_new_tokens under the run's --max-new-tokens cap) is recorded as
`generation_budget` in the task's config (run.json) and metrics, so a report puts a run beside the paper's Table 3
row of the same budget only (a capped run is never beside the 8k rows).
"""

from __future__ import annotations

import re
import threading
from typing import Any

from nsa_eval.tasks.base import Sample, Task, TaskContext, aggregate_scores, pass_at_k
from nsa_eval.tasks.data import load_rows

HUB_ID = "Maxwell-Jia/AIME_2024"
SCHEMA = {"id": (str, int), "problem": str, "answer": (str, int)}
ALIASES = {"id": ("ID",), "problem": ("Problem",), "answer": ("Answer",)}
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def last_boxed(text: str) -> str | None:
    """Content of the last non-empty \\boxed{...} (or \\fbox{...}), braces balanced; None if there is none."""
    found = None
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, match.end()
        for position in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[position], 0)
            if depth == 0:
                content = text[start:position].strip()
                found = content or found
                break
    return found


def final_answer(response: str) -> str | None:
    """The response's final answer: the last \\boxed{} content, else its last integer, else None."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    integers = re.findall(r"-?\d+", re.sub(r"(?<=\d),(?=\d{3}\b)", "", response))
    return integers[-1] if integers else None


def is_correct(answer: str | None, reference: str) -> bool:
    """math-verify's equivalence of the extracted answer and the reference (both read as LaTeX math)."""
    if answer is None:
        return False
    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which only the main thread may set
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"${reference}$", parsing_timeout=timeout)
    guess = parse(f"${answer}$", parsing_timeout=timeout)
    return bool(gold and guess and verify(gold, guess, timeout_seconds=timeout))


class AIME(Task):
    """options: data_path, n_samples (16), temperature (0.7), top_p (0.95), max_new_tokens (8192; the
    paper also uses 16384)."""

    name = "aime"
    version = "1"
    headline = "accuracy"

    def __init__(
        self,
        data_path: str | None = None,
        n_samples: int = 16,
        temperature: float = 0.7,
        top_p: float = 0.95,
        max_new_tokens: int = 8192,
    ):
        if n_samples < 1:
            raise ValueError(f"AIME n_samples {n_samples}: use at least 1")
        if max_new_tokens < 1:
            raise ValueError(f"AIME max_new_tokens {max_new_tokens}: use at least 1 (the paper: 8192 and 16384)")
        if temperature < 0:
            raise ValueError(f"AIME temperature {temperature}: use 0 (greedy) or more (the paper: 0.7)")
        if not 0 < top_p <= 1:
            raise ValueError(f"AIME top_p {top_p}: use a number above 0 and at most 1 (the paper: 0.95)")
        self.data_path = data_path
        self.n_samples = n_samples
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self._chat: bool | None = None
        self._rows: list[dict[str, Any]] | None = None
        self._budget = max_new_tokens  # the budget used: max_new_tokens under the run's cap (set by samples())

    @property
    def ks(self) -> list[int]:
        """The k of the pass@k scores: powers of two up to n, and n."""
        ks = [2**i for i in range(self.n_samples.bit_length()) if 2**i <= self.n_samples]
        return sorted(set(ks + [self.n_samples]))

    def config(self) -> dict[str, Any]:
        return {
            "data": self.data_path or f"hub:{HUB_ID}",
            "n_samples": self.n_samples,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "generation_budget": self._budget,  # used, after the run's cap: the key of the paper's Table 3 (8k, 16k)
            "chat": self._chat,
        }

    def prepare(self) -> None:
        """Load and check the rows (before any model loads)."""
        if self._rows is None:
            self._rows = load_rows(self.data_path, task=self.name, hub_id=HUB_ID, hub_config=None, split="train",
                                   name="test", schema=SCHEMA, aliases=ALIASES)

    def samples(self, ctx: TaskContext) -> list[Sample]:
        self._chat = ctx.chat
        self._budget = ctx.new_tokens(self.max_new_tokens)
        self.prepare()
        assert self._rows is not None
        rows = self._rows
        if ctx.limit is not None:
            rows = rows[: ctx.limit]
        samples = []
        for row in rows:
            text = f"{row['problem'].strip()}\n{INSTRUCTION}"
            prompt = [{"role": "user", "content": text}] if ctx.chat else f"Problem: {text}\n\nSolution:"
            samples.append(
                Sample(
                    id=str(row["id"]),
                    prompt=prompt,
                    target=str(row["answer"]).strip(),
                    max_new_tokens=self.max_new_tokens,
                    temperature=self.temperature,
                    top_p=self.top_p,
                    n=self.n_samples,
                )
            )
        longest = max((ctx.count_tokens(s.prompt) for s in samples), default=0)
        generated = self._budget
        if longest + generated > ctx.max_length:
            raise ValueError(
                f"AIME needs {longest} prompt + {generated} generated tokens, more than the model's "
                f"max length {ctx.max_length}; lower the budget (--max-new-tokens N or --task-option "
                "aime.max_new_tokens=N) or raise --max-length"
            )
        return samples

    def score(self, sample: Sample, output: list[str]) -> dict[str, float]:
        correct = sum(is_correct(final_answer(text), sample.target) for text in output)
        n = len(output)
        scores = {"accuracy": correct / n}
        for k in self.ks:
            if k <= n:
                scores[f"pass@{k}"] = pass_at_k(n, correct, k)
        return scores

    def details(self, sample: Sample, output: list[str]) -> dict[str, Any]:
        return {"answers": [final_answer(text) for text in output]}

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return {**aggregate_scores(records, self.breakdown_keys), "generation_budget": self._budget}
