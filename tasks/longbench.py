"""LongBench v1 (Bai et al. 2024): 21 long-context subsets in English and Chinese, as its reference pred.py/eval.py.

- prompt: the subset's template (longbench_dataset2prompt.json) filled with the row's context and input;
  when it is longer than the model's max length minus the subset's generation budget
  (longbench_dataset2maxlen.json), its middle is cut out so that half the budget comes from each end,
  measured with the model's own tokenizer (LongBench's rule: instructions sit at both ends);
- chat models get the chat template, except on trec, triviaqa, samsum, lsht, lcc and repobench-p, which
  the reference leaves as plain text; greedy generation of at most the subset's budget;
- score: the subset's metric (longbench_metrics), first line only for trec, triviaqa, samsum and lsht,
  max over the answers;
- breakdown by subset and by LongBench-E length bucket (0-4k, 4-8k, 8k+ of the row's `length`);
- aggregate: also the average over subsets (LongBench's "Avg") and over the NSA paper's Table 2 subsets.

Data: THUDM/LongBench (`data.zip` on the hub), or `--data longbench=PATH`: a folder of `{subset}.jsonl`
files (as in that zip; `{subset}_e.jsonl` for LongBench-E), or one file holding rows of several subsets
(told apart by their `dataset` field).
"""

from __future__ import annotations

import difflib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from nsa_eval.tasks.base import DataError, Prompt, Sample, Task, TaskContext, aggregate_scores, macro_average
from nsa_eval.tasks.data import check_rows, find_data_file, hub_rows, local_rows
from nsa_eval.tasks.longbench_metrics import score_prediction

HERE = Path(__file__).parent
PROMPTS: dict[str, str] = json.loads((HERE / "longbench_dataset2prompt.json").read_text(encoding="utf-8"))
MAX_NEW_TOKENS: dict[str, int] = json.loads((HERE / "longbench_dataset2maxlen.json").read_text(encoding="utf-8"))

SUBSETS = (
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique",
    "dureader", "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht",
    "passage_count", "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p",
)
LONGBENCH_E_SUBSETS = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
    "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)
# the NSA paper's Table 2 (arXiv:2502.11089), column name -> subset
TABLE2_SUBSETS = {
    "MFQA-en": "multifieldqa_en", "MFQA-zh": "multifieldqa_zh", "Qasper": "qasper", "HPQ": "hotpotqa",
    "2Wiki": "2wikimqa", "GovRpt": "gov_report", "Dur": "dureader", "PassR-en": "passage_retrieval_en",
    "PassR-zh": "passage_retrieval_zh", "LCC": "lcc",
}
GROUPS = {"all": SUBSETS, "table2": tuple(TABLE2_SUBSETS.values()), "e": LONGBENCH_E_SUBSETS}
PLAIN_TEXT_SUBSETS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
HUB_ID = "THUDM/LongBench"
HUB_FILE = "zip://data/{name}.jsonl::hf://datasets/THUDM/LongBench/data.zip"
SCHEMA = {
    "input": str,
    "context": str,
    "answers": list[str],
    "length": int,
    "dataset": str,
    "language": str,
    "all_classes": (list[str], None),
    "_id": str,
}


def length_bucket(length: int) -> str:
    """LongBench-E's bucket of a row's `length` (words, or characters for Chinese)."""
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


def truncate_text_middle(text: str, budget: int, count_tokens: Callable[[str], int]) -> tuple[str, bool]:
    """(text, False) when it fits `budget` tokens, else (its first and last budget//2 tokens' worth, True).

    Only the tokenizer's counts are at hand, so each end is the longest prefix / suffix (in characters)
    whose token count is at most budget//2, found by interpolation search.
    """
    total = count_tokens(text)
    if total <= budget:
        return text, False
    half = budget // 2
    head = _longest_within(lambda n: count_tokens(text[:n]), len(text), total, half)
    tail = _longest_within(lambda n: count_tokens(text[len(text) - n :]) if n else 0, len(text), total, half)
    return text[:head] + text[len(text) - tail :], True


def _longest_within(tokens_of: Callable[[int], int], size: int, total: int, budget: int) -> int:
    """Largest n in [0, size) with tokens_of(n) <= budget, given tokens_of(size) = total > budget.

    Interpolates on the token count (nearly proportional to n), bisecting every third step so the
    bracket always shrinks fast.
    """
    lo, lo_tokens, hi, hi_tokens = 0, 0, size, total
    step = 0
    while hi - lo > 1:
        if step % 3 == 2 or hi_tokens <= lo_tokens:
            probe = (lo + hi) // 2
        else:
            probe = lo + int((budget - lo_tokens) * (hi - lo) / (hi_tokens - lo_tokens))
            probe = min(max(probe, lo + 1), hi - 1)
        tokens = tokens_of(probe)
        if tokens <= budget:
            lo, lo_tokens = probe, tokens
        else:
            hi, hi_tokens = probe, tokens
        step += 1
    return lo


def parse_subsets(subsets: list[str] | str | None, longbench_e: bool) -> list[str]:
    """Subset names from a list, a comma-separated string or a group name ("all", "table2", "e")."""
    known = LONGBENCH_E_SUBSETS if longbench_e else SUBSETS
    if subsets is None:
        return list(known)
    names = [s.strip() for s in subsets.split(",")] if isinstance(subsets, str) else list(subsets)
    chosen: list[str] = []
    for name in names:
        for subset in GROUPS.get(name, (name,)):
            if subset not in known:
                kind = "LongBench-E" if longbench_e else "LongBench"
                close = difflib.get_close_matches(subset, known, n=1, cutoff=0.5)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ValueError(
                    f"'{subset}' is not a {kind} subset.{hint} "
                    f"Use one of {', '.join(known)} or a group: {', '.join(GROUPS)}"
                )
            if subset not in chosen:
                chosen.append(subset)
    return chosen


class LongBench(Task):
    """options: data_path, subsets (names, comma-separated, or a group: all, table2, e), longbench_e."""

    name = "longbench"
    version = "1"
    headline = "score"
    breakdown_keys = ("subset", "length")
    limit_unit = "subset"  # --limit N: the first N rows of each subset

    def __init__(self, data_path: str | None = None, subsets: list[str] | str | None = None, longbench_e: bool = False):
        self.data_path = data_path
        self.longbench_e = longbench_e
        self.subsets = parse_subsets(subsets, longbench_e)
        self._chat: bool | None = None
        self._truncated: dict[str, bool] = {}
        self._rows: dict[str, list[dict[str, Any]]] | None = None

    def config(self) -> dict[str, Any]:
        return {
            "data": self.data_path or f"hub:{HUB_ID}",
            "subsets": self.subsets,
            "longbench_e": self.longbench_e,
            "chat": self._chat,
        }

    def _subset_rows(self, subset: str, rows_by_dataset: dict[str, list[dict[str, Any]]] | None) -> list[dict[str, Any]]:
        name = f"{subset}_e" if self.longbench_e else subset
        if rows_by_dataset is not None:
            return rows_by_dataset.get(name, []) + (rows_by_dataset.get(subset, []) if name != subset else [])
        if self.data_path is None:
            return check_rows(*hub_rows(HUB_ID, name, "test", self.name, data_files=HUB_FILE.format(name=name)), SCHEMA)
        if find_data_file(self.data_path, name) is None:
            return []
        return check_rows(*local_rows(self.data_path, name), SCHEMA)

    def prepare(self) -> None:
        """Load and check every asked subset's rows (before any model loads). A subset the data lacks is an error
        naming the subsets present, so an average is never taken over fewer subsets than asked for."""
        if self._rows is not None:
            return
        rows_by_dataset = None  # one local file holding several subsets
        if self.data_path is not None and Path(self.data_path).is_file():
            rows_by_dataset = defaultdict(list)
            for row in check_rows(*local_rows(self.data_path), SCHEMA):
                rows_by_dataset[row["dataset"]].append(row)
        rows = {subset: self._subset_rows(subset, rows_by_dataset) for subset in self.subsets}
        present = [subset for subset in self.subsets if rows[subset]]
        if len(present) < len(self.subsets):
            missing = [subset for subset in self.subsets if not rows[subset]]
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            where = self.data_path or HUB_ID
            if not present:
                raise DataError(f"LongBench data {where} holds none of the {len(self.subsets)} subsets asked for "
                                f"({shown}); give a folder of SUBSET.jsonl files or a file of rows with a 'dataset' field")
            raise DataError(f"LongBench data {where} holds {len(present)} of the {len(self.subsets)} subsets asked for "
                            f"(missing: {shown}); run the ones present with --task-option "
                            f"longbench.subsets={','.join(present)}")
        self._rows = rows

    def samples(self, ctx: TaskContext) -> list[Sample]:
        self._chat = ctx.chat
        self.prepare()
        assert self._rows is not None
        template_tokens = ctx.count_tokens([{"role": "user", "content": ""}]) if ctx.chat else 0
        samples = []
        for subset in self.subsets:
            rows = self._rows[subset]
            if ctx.limit is not None:
                rows = rows[: ctx.limit]
            chat = ctx.chat and subset not in PLAIN_TEXT_SUBSETS
            generated = ctx.new_tokens(MAX_NEW_TOKENS[subset])
            budget = ctx.max_length - generated - (template_tokens if chat else 0)
            if budget < 2:
                raise ValueError(
                    f"LongBench {subset} generates up to {generated} tokens, which leaves no room for a "
                    f"prompt in the model's max length {ctx.max_length}; raise --max-length"
                )
            for row in rows:
                text = PROMPTS[subset].format(**row)
                text, truncated = truncate_text_middle(text, budget, ctx.count_tokens)
                sample_id = f"{subset}/{row['_id']}"
                self._truncated[sample_id] = truncated
                prompt: Prompt = [{"role": "user", "content": text}] if chat else text
                samples.append(
                    Sample(
                        id=sample_id,
                        prompt=prompt,
                        target={"answers": row["answers"], "all_classes": row["all_classes"]},
                        breakdown={"subset": subset, "length": length_bucket(row["length"])},
                        max_new_tokens=generated,
                    )
                )
        return samples

    def score(self, sample: Sample, output: list[str]) -> dict[str, float]:
        subset = sample.breakdown["subset"]
        return {"score": score_prediction(subset, output[0], sample.target["answers"], sample.target["all_classes"])}

    def details(self, sample: Sample, output: list[str]) -> dict[str, Any]:
        return {"prompt_cut_in_middle": self._truncated.get(sample.id)}

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        result = aggregate_scores(records, self.breakdown_keys)
        per_subset = result["breakdowns"]["subset"]
        if per_subset:
            result["metrics"]["subset_average"] = macro_average(per_subset, "score")
        table2 = {name: cell for name, cell in per_subset.items() if name in TABLE2_SUBSETS.values()}
        if table2:
            result["metrics"]["table2_average"] = macro_average(table2, "score")
        return result
