"""GSM8K (Cobbe et al. 2021): grade-school math word problems, chain of thought or lm-eval's standard 5-shot.

Two variants (option `variant`), each as lm-evaluation-harness has it; the variant is part of the task
version ("2-cot", "2-standard") and of the prompts (so of the prompt digest):

variant "cot" (default; the NSA paper's setting): lm-eval's `gsm8k_cot` (8-shot, the exemplars of Wei et
al. 2022, kept in gsm8k_cot_exemplars.json) and `gsm8k_cot_zeroshot` (0-shot, for chat models):

- prompt: shots "Q: {question}\nA: {reasoning ... The answer is N.}" joined by blank lines, then
  "Q: {question}\nA:" (0-shot: "Q: {question}\nA: Let's think step by step."); chat models get the
  shots as user/assistant turns. Greedy, cut at "Q:" (and the end-of-turn strings lm-eval lists).
- strict match: the number in the first "The answer is N" of the response;
  flexible extract: the last number-like string of the response;
- each compared with the reference (the text after "####") as lm-eval's exact_match does: case
  folded, after deleting ",", "$", anything up to "#### ", and a final "." (0-shot also a final ".0...").

variant "standard": lm-eval's `gsm8k` (what leaderboards report): 5 shots from the train split, drawn as
lm-eval's default sampler draws them (one `random.Random(1234)`, lm-eval's fewshot seed, sampling 5 rows
for each test row in turn); each shot "Question: {question}\nAnswer: {full solution ending "#### N"}",
joined by blank lines, then "Question: {question}\nAnswer:" (chat models: the shots as user/assistant
turns). Greedy, at most 256 new tokens (lm-eval's default), cut at "Question:" (and "</s>", "<|im_end|>").
strict match: the number after the first "#### "; flexible extract as above; the same exact_match
comparison (no ".0" rule). Shots come from `train` (the hub's train split, or train.<ext> in a --data
folder); with a single local file they come from the other test rows, drawn as lm-eval draws them when the
shot split is the test split (n + 1 rows, the item removed).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from nsa_eval.tasks.base import DataError, Sample, Task, TaskContext
from nsa_eval.tasks.data import find_data_file, load_rows
from nsa_eval.tasks.fewshot import fewshot_prompt

HUB_ID = "openai/gsm8k"
SCHEMA = {"question": str, "answer": str}
EXEMPLARS_FILE = Path(__file__).with_name("gsm8k_cot_exemplars.json")
STOP = ["Q:", "</s>", "<|im_end|>"]
STOP_STANDARD = ["Question:", "</s>", "<|im_end|>"]
VARIANTS = ("cot", "standard")
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed

STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
STRICT_STANDARD = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE_FEWSHOT = [",", r"\$", r"(?s).*#### ", r"\.$"]
IGNORE_ZEROSHOT = IGNORE_FEWSHOT + [r"\.0+$"]


def exemplars() -> list[dict[str, str]]:
    """The 8 chain-of-thought exemplars: [{"question", "target"}]."""
    return json.loads(EXEMPLARS_FILE.read_text(encoding="utf-8"))


def reference_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after its last '####'."""
    return solution.split("####")[-1].strip()


def strict_answer(response: str, variant: str = "cot") -> str | None:
    """lm-eval's strict-match: N of the first "The answer is N" (cot) or "#### N" (standard), or None."""
    found = (STRICT if variant == "cot" else STRICT_STANDARD).findall(response)
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


class GSM8K(Task):
    """options: variant ("cot" | "standard"), data_path, num_fewshot (None: cot 8 for base models and 0 for
    chat models, standard 5), max_new_tokens (None: cot 512, standard 256)."""

    name = "gsm8k"
    version = "2"  # an instance's version names its variant: "2-cot", "2-standard"
    headline = "flexible_extract"

    def __init__(self, data_path: str | None = None, num_fewshot: int | None = None, max_new_tokens: int | None = None,
                 variant: str = "cot"):
        if variant not in VARIANTS:
            raise ValueError(f"GSM8K variant '{variant}' is unknown; use one of {', '.join(VARIANTS)}")
        if variant == "cot" and num_fewshot is not None and not 0 <= num_fewshot <= 8:
            raise ValueError(f"GSM8K num_fewshot {num_fewshot}: there are 8 chain-of-thought exemplars; use 0 to 8")
        if num_fewshot is not None and num_fewshot < 0:
            raise ValueError(f"GSM8K num_fewshot {num_fewshot}: use 0 or more")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"GSM8K max_new_tokens {max_new_tokens}: use at least 1")
        self.variant = variant
        self.version = f"{GSM8K.version}-{variant}"
        self.data_path = data_path
        self.num_fewshot = num_fewshot
        self.max_new_tokens = max_new_tokens or (512 if variant == "cot" else 256)
        self._chat: bool | None = None
        self._shots_used: int | None = None
        self._shot_source: str | None = None
        self._test_rows: list[dict[str, Any]] | None = None
        self._pool: list[dict[str, Any]] | None = None  # standard: the rows shots are drawn from
        self._pool_is_test = False

    def config(self) -> dict[str, Any]:
        config = {
            "variant": self.variant,
            "data": self.data_path or f"hub:{HUB_ID}",
            "num_fewshot": self._shots_used if self._shots_used is not None else self.num_fewshot,
            "max_new_tokens": self.max_new_tokens,
            "chat": self._chat,
        }
        if self.variant == "standard":
            config.update(fewshot_seed=FEWSHOT_SEED, shots_from=self._shot_source)
        return config

    def _rows(self, split: str) -> list[dict[str, Any]]:
        rows = load_rows(self.data_path, task=self.name, hub_id=HUB_ID, hub_config="main", split=split, schema=SCHEMA)
        where = f"{self.data_path or HUB_ID}" + ("" if split == "test" else f" [{split}]")
        for number, row in enumerate(rows, start=1):
            if "####" not in row["answer"]:
                raise DataError(f"{where}: row {number}: field 'answer' has no '#### N' final answer")
        return rows

    def prepare(self) -> None:
        """Load and check the test rows, and for `standard` the shot rows and their number (before any model loads)."""
        if self._test_rows is None:
            self._test_rows = self._rows("test")
        if self.variant == "standard" and self._pool is None:
            shots = 5 if self.num_fewshot is None else self.num_fewshot
            if self.data_path is None or find_data_file(self.data_path, "train") is not None:
                self._pool, self._pool_is_test = self._rows("train"), False
                self._shot_source = "train"
            else:
                self._pool, self._pool_is_test = self._test_rows, True
                self._shot_source = "test (the item removed, as lm-eval samples a shot split equal to the test split)"
            if len(self._pool) < shots + self._pool_is_test:
                other = " other than the item asked" if self._pool_is_test else ""
                raise ValueError(f"gsm8k.variant=standard needs {shots} shots{other}; "
                                 f"{self.data_path or HUB_ID} holds {len(self._pool)} {self._shot_source.split()[0]} "
                                 f"rows (give at least {shots + self._pool_is_test}, or set gsm8k.num_fewshot)")

    def samples(self, ctx: TaskContext) -> list[Sample]:
        self._chat = ctx.chat
        self.prepare()
        rows = self._test_rows
        if self.variant == "standard":
            return self._standard_samples(rows, ctx)
        shots = self.num_fewshot if self.num_fewshot is not None else (0 if ctx.chat else 8)
        self._shots_used = shots
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

    def _standard_samples(self, rows: list[dict[str, Any]], ctx: TaskContext) -> list[Sample]:
        shots = 5 if self.num_fewshot is None else self.num_fewshot
        self._shots_used = shots
        pool, from_test = self._pool, self._pool_is_test
        assert pool is not None  # prepare() loaded it
        rnd = random.Random(FEWSHOT_SEED)  # one generator over the rows in order, as lm-eval's ContextSampler
        count = len(rows) if ctx.limit is None else min(ctx.limit, len(rows))
        samples = []
        for index, row in enumerate(rows[:count]):
            if not shots:
                chosen = []
            elif from_test:
                chosen = [r for r in rnd.sample(pool, shots + 1) if r != row][:shots]
            else:
                chosen = rnd.sample(pool, shots)
            pairs = [(f"Question: {r['question']}\nAnswer:", r["answer"]) for r in chosen]
            samples.append(
                Sample(
                    id=str(index),
                    prompt=fewshot_prompt(pairs, f"Question: {row['question']}\nAnswer:", chat=ctx.chat),
                    target=reference_answer(row["answer"]),
                    max_new_tokens=self.max_new_tokens,
                    stop=list(STOP_STANDARD),
                )
            )
        return samples

    def _ignore(self) -> list[str]:
        return IGNORE_ZEROSHOT if self.variant == "cot" and self._shots_used == 0 else IGNORE_FEWSHOT

    def score(self, sample: Sample, output: list[str]) -> dict[str, float]:
        gold = normalise(sample.target, self._ignore())
        scores = {}
        for metric, answer in (("strict_match", strict_answer(output[0], self.variant)),
                               ("flexible_extract", flexible_answer(output[0]))):  # the one greedy response
            scores[metric] = float(answer is not None and normalise(answer, self._ignore()) == gold)
        return scores

    def details(self, sample: Sample, output: list[str]) -> dict[str, Any]:
        return {"strict": strict_answer(output[0], self.variant), "flexible": flexible_answer(output[0])}
