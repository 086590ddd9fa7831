"""GSM8K (Cobbe et al. 2021): grade-school math word problems, chain of thought.

As lm-evaluation-harness's `gsm8k_cot` (8-shot, the exemplars of Wei et al. 2022, kept in
gsm8k_cot_exemplars.json) and `gsm8k_cot_zeroshot` (0-shot, for chat models):

- prompt: shots "Q: {question}\\nA: {reasoning ... The answer is N.}" joined by blank lines, then
  "Q: {question}\\nA:" (0-shot: "Q: {question}\\nA: Let's think step by step."); chat models get the
  shots as user/assistant turns. Greedy, cut at "Q:" (and the end-of-turn strings lm-eval lists).
- strict match: the number in the first "The answer is N" of the response;
  flexible extract: the last number-like string of the response;
- each compared with the reference (the text after "####") as lm-eval's exact_match does: case
  folded, after deleting ",", "$", anything up to "#### ", and a final "." (0-shot also a final ".0...").
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from nsa_eval.tasks.base import DataError, Sample, TaskContext, aggregate_scores
from nsa_eval.tasks.data import load_rows
from nsa_eval.tasks.fewshot import fewshot_prompt

HUB_ID = "openai/gsm8k"
SCHEMA = {"question": str, "answer": str}
EXEMPLARS_FILE = Path(__file__).with_name("gsm8k_cot_exemplars.json")
STOP = ["Q:", "</s>", "<|im_end|>"]

STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE_FEWSHOT = [",", r"\$", r"(?s).*#### ", r"\.$"]
IGNORE_ZEROSHOT = IGNORE_FEWSHOT + [r"\.0+$"]


def exemplars() -> list[dict[str, str]]:
    """The 8 chain-of-thought exemplars: [{"question", "target"}]."""
    return json.loads(EXEMPLARS_FILE.read_text(encoding="utf-8"))


def reference_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after its last '####'."""
    return solution.split("####")[-1].strip()


def strict_answer(response: str) -> str | None:
    """N of the first "The answer is N" (lm-eval's strict-match), or None."""
    found = STRICT.findall(response)
    return found[0].strip() if found else None


def flexible_answer(response: str) -> str | None:
    """The last number-like string of the response (lm-eval's flexible-extract), or None."""
    found = FLEXIBLE.findall(response)
    if not found:
        return None
    groups = [g for g in found[-1] if g]
    return groups[0].strip() if groups else None


def normalise(text: str, ignore: list[str]) -> str:
    """lm-eval exact_match preprocessing: delete each regex in `ignore`, then lower-case."""
    for pattern in ignore:
        text = re.sub(pattern, "", text)
    return text.lower()


class GSM8K:
    """options: data_path, num_fewshot (None: 8 for base models, 0 for chat models), max_new_tokens."""

    name = "gsm8k"
    version = "1"
    headline = "flexible_extract"
    breakdown_keys: tuple[str, ...] = ()

    def __init__(self, data_path: str | None = None, num_fewshot: int | None = None, max_new_tokens: int = 512):
        if num_fewshot is not None and not 0 <= num_fewshot <= 8:
            raise ValueError(f"GSM8K num_fewshot {num_fewshot}: there are 8 chain-of-thought exemplars; use 0 to 8")
        if max_new_tokens < 1:
            raise ValueError(f"GSM8K max_new_tokens {max_new_tokens}: use at least 1")
        self.data_path = data_path
        self.num_fewshot = num_fewshot
        self.max_new_tokens = max_new_tokens
        self._chat: bool | None = None
        self._shots_used: int | None = None
        self._rows: list[dict[str, Any]] | None = None

    def config(self) -> dict[str, Any]:
        return {
            "data": self.data_path or f"hub:{HUB_ID}",
            "num_fewshot": self._shots_used if self._shots_used is not None else self.num_fewshot,
            "max_new_tokens": self.max_new_tokens,
            "chat": self._chat,
        }

    def prepare(self) -> None:
        """Load and check the rows (before any model loads)."""
        if self._rows is None:
            rows = load_rows(self.data_path, task=self.name, hub_id=HUB_ID, hub_config="main", split="test", schema=SCHEMA)
            for number, row in enumerate(rows, start=1):
                if "####" not in row["answer"]:
                    raise DataError(f"{self.data_path or HUB_ID}: row {number}: field 'answer' has no '#### N' final answer")
            self._rows = rows

    def samples(self, ctx: TaskContext) -> list[Sample]:
        self._chat = ctx.chat
        shots = self.num_fewshot if self.num_fewshot is not None else (0 if ctx.chat else 8)
        self._shots_used = shots
        self.prepare()
        assert self._rows is not None
        rows = self._rows
        if ctx.limit is not None:
            rows = rows[: ctx.limit]
        pairs = [(f"Q: {e['question']}\nA:", e["target"]) for e in exemplars()[:shots]]
        samples = []
        for index, row in enumerate(rows):
            question = f"Q: {row['question']}\nA:" if shots else f"Q: {row['question']}\nA: Let's think step by step."
            samples.append(
                Sample(
                    id=str(index),
                    prompt=fewshot_prompt(pairs, question, chat=ctx.chat),
                    target=reference_answer(row["answer"]),
                    max_new_tokens=self.max_new_tokens,
                    stop=list(STOP),
                )
            )
        return samples

    def _ignore(self) -> list[str]:
        return IGNORE_ZEROSHOT if self._shots_used == 0 else IGNORE_FEWSHOT

    def score(self, sample: Sample, output: list[str]) -> dict[str, float]:
        gold = normalise(sample.target, self._ignore())
        scores = {}
        for metric, extract in (("strict_match", strict_answer), ("flexible_extract", flexible_answer)):
            answer = extract(output[0])  # the one greedy response
            scores[metric] = float(answer is not None and normalise(answer, self._ignore()) == gold)
        return scores

    def details(self, sample: Sample, output: list[str]) -> dict[str, Any]:
        return {"strict": strict_answer(output[0]), "flexible": flexible_answer(output[0])}

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return aggregate_scores(records, self.breakdown_keys)
