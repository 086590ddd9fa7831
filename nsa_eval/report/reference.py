"""The NSA paper's reported numbers (arXiv:2502.11089), carried as package data, matched to our task names."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from typing import Any

PAPER_NAME = "nsa-paper"
PAPER_MODEL = "27B-total / 3B-active MoE"


@lru_cache(maxsize=1)
def paper() -> dict[str, Any]:
    """nsa_eval/reference_data/nsa_paper.json."""
    text = resources.files("nsa_eval.reference_data").joinpath("nsa_paper.json").read_text(encoding="utf-8")
    return json.loads(text)


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def general_rows(tasks: list[str]) -> dict[str, dict[str, float]]:
    """Table 1 rows ("NSA (paper)", "Full Attn (paper)") -> {our task: number}, for tasks whose name
    matches a Table 1 benchmark ignoring case and punctuation (mmlu ~ MMLU, mmlu_pro ~ MMLU-PRO)."""
    table = paper()["table1_general"]
    by_name = {_normalise(column): column for column in table["settings"]}
    matched = {task: by_name[_normalise(task)] for task in tasks if _normalise(task) in by_name}
    return {f"{row} (paper)": {task: table[row][column] for task, column in matched.items()}
            for row in ("Full Attn", "NSA")}


def general_settings(tasks: list[str]) -> dict[str, str]:
    """Our task -> the paper's Table 1 setting for it (e.g. "acc 5-shot")."""
    settings = paper()["table1_general"]["settings"]
    by_name = {_normalise(column): column for column in settings}
    return {task: settings[by_name[_normalise(task)]] for task in tasks if _normalise(task) in by_name}


def longbench_rows() -> dict[str, dict[str, float]]:
    """Table 2 rows -> {LongBench subset name as in the dataset (e.g. "hotpotqa"): number}."""
    table = paper()["table2_longbench"]
    subsets = table["subsets"]
    return {f"{row} (paper)": {subsets[label]: value for label, value in table[row].items() if label in subsets}
            for row in ("Full Attn", "NSA")}


def aime_rows() -> dict[str, dict[int, float]]:
    """Table 3 rows ("Full Attention-R (paper)", "NSA-R (paper)") -> {generation budget in tokens: accuracy}."""
    table = paper()["table3_aime24"]
    return {f"{row} (paper)": {int(budget): value for budget, value in values.items()}
            for row, values in table.items() if isinstance(values, dict)}


def aime_settings() -> str:
    return paper()["table3_aime24"]["settings"]


def kernel_speedups() -> dict[str, dict[int, float]]:
    """Figure 6: {"forward" | "backward": {sequence length: speedup over Triton FlashAttention-2 on A100}}."""
    figure = paper()["figure6_kernel_speedup_vs_triton_fa2_a100"]
    return {direction: {int(t): v for t, v in values.items()} for direction, values in figure.items()}


def decode_speedups() -> dict[int, float]:
    """Table 4: {context length: expected decode speedup from memory access}."""
    return {int(t): v for t, v in paper()["table4_decode_memory_access_tokens"]["expected_speedup"].items()}
