"""MMLU (Hendrycks et al. 2021): 57 subjects of four-way multiple choice, 5-shot.

As lm-evaluation-harness's default `mmlu` task: per subject the description "The following are multiple
choice questions (with answers) about {subject}.\\n\\n", then the first five dev questions of that
subject with their answers, then the test question; each question reads
"{question}\\nA. ...\\nB. ...\\nC. ...\\nD. ...\\nAnswer:", shots end with " {letter}\\n\\n".

- variant "loglikelihood" (default, base models): the answer is the letter whose continuation
  (" A".." D"; "A".."D" after a chat template, as lm-eval drops the space there) the model finds likeliest.
- variant "generative" (chat models): the model writes the answer, cut at the first newline, and the
  letter is read off its first line as lm-eval's `mmlu_generative` filter does.

Accuracy per sample; the aggregate adds the macro average over subjects to the micro average over
questions (lm-eval's group score, weighted by size), and lm-eval's four category groups (`mmlu_stem`,
`mmlu_humanities`, `mmlu_social_sciences`, `mmlu_other`; its `_generate_configs.py` maps the 57 subjects): each
category's accuracy is the mean of its subjects' accuracies weighted by their sizes, with lm-eval's pooled
standard error, as a "category" breakdown and as metrics `accuracy_stem`, `accuracy_humanities`,
`accuracy_social_sciences`, `accuracy_other`. Subjects outside the 57 (custom data) belong to no category. Data: cais/mmlu ("all": test and dev), or a local
file of test rows (shots then come from the same subject's other test rows, drawn with the run seed),
or a folder with test.<ext> and optionally dev.<ext>.
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from typing import Any

from nsa_eval.tasks.base import DataError, Sample, Task, TaskContext, aggregate_scores, macro_average
from nsa_eval.tasks.data import find_data_file, load_rows
from nsa_eval.tasks.fewshot import fewshot_prompt

LETTERS = ("A", "B", "C", "D")
HUB_ID = "cais/mmlu"
SCHEMA = {"question": str, "subject": str, "choices": list[str], "answer": int}
ALIASES = {"subject": ("type",)}
VARIANTS = ("loglikelihood", "generative")

# lm-evaluation-harness's subject -> category map (lm_eval/tasks/mmlu/_generate_configs.py, SUBJECTS)
CATEGORIES = {
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem", "business_ethics": "other",
    "clinical_knowledge": "other", "college_biology": "stem", "college_chemistry": "stem",
    "college_computer_science": "stem", "college_mathematics": "stem", "college_medicine": "other",
    "college_physics": "stem", "computer_security": "stem", "conceptual_physics": "stem",
    "econometrics": "social_sciences", "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences", "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem", "high_school_microeconomics": "social_sciences", "high_school_physics": "stem",
    "high_school_psychology": "social_sciences", "high_school_statistics": "stem",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities", "human_aging": "other",
    "human_sexuality": "social_sciences", "international_law": "humanities", "jurisprudence": "humanities",
    "logical_fallacies": "humanities", "machine_learning": "stem", "management": "other", "marketing": "other",
    "medical_genetics": "other", "miscellaneous": "other", "moral_disputes": "humanities",
    "moral_scenarios": "humanities", "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences", "us_foreign_policy": "social_sciences",
    "virology": "other", "world_religions": "humanities",
}
CATEGORY_ORDER = ("stem", "humanities", "social_sciences", "other")

# lm-eval mmlu_generative (v3.0) filter: the letter alone, decorated ("(B)", "b)"), or after a lead-in.
_LETTER_PATTERN = re.compile(
    r"(?i)(?:^\W*|answer\s*(?:is)?\s*[:\-]?\s*|option\s*[:\-]?\s*)\(?([A-D])\)?\W*$"
)


def question_text(row: dict[str, Any]) -> str:
    """lm-eval's doc_to_text for MMLU."""
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, row["choices"]))
    return f"{row['question'].strip()}{options}\nAnswer:"


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def category_scores(subjects: dict[str, dict[str, Any]], metric: str = "accuracy") -> dict[str, dict[str, float]]:
    """lm-eval's category groups from per-subject cells ({subject: {metric: {"mean", "stderr", "n"}}}):
    {category: {"mean", "stderr", "n"}}, the mean weighted by subject size (lm-eval's aggregate_subtask_metrics
    with weight_by_size) and the pooled standard error (lm-eval's pooled_sample_stderr)."""
    grouped: dict[str, list[dict[str, float]]] = defaultdict(list)
    for subject, cell in subjects.items():
        if subject in CATEGORIES and metric in cell:
            grouped[CATEGORIES[subject]].append(cell[metric])
    out = {}
    for category in CATEGORY_ORDER:
        cells = grouped.get(category)
        if not cells:
            continue
        sizes = [c["n"] for c in cells]
        total = sum(sizes)
        mean = sum(c["mean"] * n for c, n in zip(cells, sizes)) / total
        if total > len(sizes):
            pooled_var = sum((n - 1) * c["stderr"] ** 2 * n for c, n in zip(cells, sizes)) / (total - len(sizes))
            stderr = math.sqrt(pooled_var / total)
        else:
            stderr = 0.0
        out[category] = {"mean": mean, "stderr": stderr, "n": total}
    return out


def extract_letter(response: str) -> str | None:
    """The answer letter from a generated response (first line only), or None when there is none."""
    first_line = response.split("\n", 1)[0].strip()
    found = _LETTER_PATTERN.findall(first_line)
    return found[0].upper() if found else None


class MMLU(Task):
    """options: data_path, num_fewshot (5), variant ("loglikelihood" | "generative"), subjects, seed,
    max_new_tokens (generative only)."""

    name = "mmlu"
    version = "1"
    headline = "accuracy"
    breakdown_keys = ("subject",)
    limit_unit = "subject"  # --limit N: the first N questions of each subject (lm-eval's --limit on the mmlu group)

    def __init__(
        self,
        data_path: str | None = None,
        num_fewshot: int = 5,
        variant: str = "loglikelihood",
        subjects: list[str] | str | None = None,
        seed: int = 0,
        max_new_tokens: int = 256,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"MMLU variant '{variant}' is unknown; use one of {', '.join(VARIANTS)}")
        if not 0 <= num_fewshot <= 5:
            raise ValueError(f"MMLU num_fewshot {num_fewshot}: MMLU has 5 dev questions per subject; use 0 to 5")
        if max_new_tokens < 1:
            raise ValueError(f"MMLU max_new_tokens {max_new_tokens}: use at least 1")
        self.data_path = data_path
        self.num_fewshot = num_fewshot
        self.variant = variant
        self.subjects = [s.strip() for s in subjects.split(",")] if isinstance(subjects, str) else subjects
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self._chat: bool | None = None
        self._shot_source: str | None = None
        self._fewest: int | None = None  # the fewest shots any sample was asked with (set by samples())
        self._data: tuple[list[dict[str, Any]], list[dict[str, Any]] | None] | None = None

    def config(self) -> dict[str, Any]:
        return {
            "data": self.data_path or f"hub:{HUB_ID}",
            "num_fewshot": self.num_fewshot,
            "variant": self.variant,
            "subjects": self.subjects or "all",
            "seed": self.seed,
            "max_new_tokens": self.max_new_tokens if self.variant == "generative" else None,
            "chat": self._chat,
            "shots_from": self._shot_source,
            # a subject with fewer other rows than num_fewshot (one test file, no dev split) asks with fewer shots
            **({"fewest_shots": self._fewest} if self._fewest is not None and self._fewest < self.num_fewshot else {}),
        }

    def _load(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """(test rows, dev rows or None when only test rows exist)."""
        load = dict(task=self.name, hub_id=HUB_ID, hub_config="all", schema=SCHEMA, aliases=ALIASES)
        test = load_rows(self.data_path, split="test", **load)
        if self.data_path is None:
            dev = load_rows(None, split="dev", **load)
        elif find_data_file(self.data_path, "dev") is not None:
            dev = load_rows(self.data_path, split="dev", **load)
        else:
            dev = None
        for split_rows, split in ((test, "test"), (dev or [], "dev")):
            for number, row in enumerate(split_rows, start=1):
                if len(row["choices"]) != 4 or not 0 <= row["answer"] < 4:
                    raise DataError(
                        f"{self.data_path or HUB_ID} [{split}]: row {number}: MMLU needs 4 choices and an answer "
                        f"index 0-3, got {len(row['choices'])} choices and answer {row['answer']}"
                    )
        return test, dev

    def prepare(self) -> None:
        """Load and check the rows, and that every asked subject is in them (before any model loads)."""
        if self._data is None:
            test, dev = self._load()
            present = {row["subject"] for row in test}
            unknown = [s for s in self.subjects or [] if s not in present]
            if unknown:
                raise ValueError(f"MMLU subjects not in the data: {', '.join(unknown)}; known: {', '.join(sorted(present))}")
            self._data = test, dev

    def samples(self, ctx: TaskContext) -> list[Sample]:
        self._chat = ctx.chat
        self.prepare()
        assert self._data is not None
        test, dev = self._data
        self._shot_source = "dev" if dev is not None else "test (same subject, seeded, item excluded)"
        self._fewest = None
        by_subject: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in test:
            by_subject[row["subject"]].append(row)
        dev_by_subject: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in dev or []:
            dev_by_subject[row["subject"]].append(row)
        subjects = self.subjects or sorted(by_subject)
        unknown = [s for s in subjects if s not in by_subject]
        if unknown:
            raise ValueError(f"MMLU subjects not in the data: {', '.join(unknown)}; known: {', '.join(sorted(by_subject))}")

        samples = []
        for subject in subjects:
            rows = by_subject[subject]
            for index, row in enumerate(rows[: ctx.limit] if ctx.limit is not None else rows):
                if dev is not None:
                    shots = dev_by_subject[subject][: self.num_fewshot]
                else:
                    others = [r for i, r in enumerate(rows) if i != index]
                    rng = random.Random(f"{self.seed}:{subject}:{index}")
                    shots = rng.sample(others, min(self.num_fewshot, len(others)))
                samples.append(self._sample(subject, index, row, shots, ctx.chat))
                self._fewest = len(shots) if self._fewest is None else min(self._fewest, len(shots))
        return samples

    def _sample(self, subject: str, index: int, row: dict[str, Any], shots: list[dict], chat: bool) -> Sample:
        prompt = fewshot_prompt(
            [(question_text(s), LETTERS[s["answer"]]) for s in shots],
            question_text(row),
            chat=chat,
            description=description(subject),
        )
        common = dict(id=f"{subject}/{index}", prompt=prompt, target=LETTERS[row["answer"]], breakdown={"subject": subject})
        if self.variant == "loglikelihood":
            space = "" if chat else " "  # lm-eval drops the target delimiter after a chat template
            return Sample(**common, continuations=[f"{space}{letter}" for letter in LETTERS])
        return Sample(**common, max_new_tokens=self.max_new_tokens, stop=["\n"])

    def _chosen(self, sample: Sample, output: list[Any]) -> str | None:
        if sample.continuations is not None:
            logprobs = [logprob for logprob, _ in output]
            return LETTERS[max(range(len(logprobs)), key=logprobs.__getitem__)]
        return extract_letter(output[0])

    def score(self, sample: Sample, output: list[Any]) -> dict[str, float]:
        return {"accuracy": float(self._chosen(sample, output) == sample.target)}

    def details(self, sample: Sample, output: list[Any]) -> dict[str, Any]:
        return {"chosen": self._chosen(sample, output)}

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        result = aggregate_scores(records, self.breakdown_keys)
        if result["breakdowns"]["subject"]:
            result["metrics"]["accuracy_macro"] = macro_average(result["breakdowns"]["subject"], "accuracy")
            categories = category_scores(result["breakdowns"]["subject"])
            if categories:
                result["breakdowns"]["category"] = {name: {"accuracy": cell} for name, cell in categories.items()}
                for name, cell in categories.items():
                    result["metrics"][f"accuracy_{name}"] = cell
        return result
