"""One run's configuration: what `nsa-eval run` was asked, read from the command line once (`RunConfig.from_cli`)
and used by the CLI (validation before the model loads, the run directory), distributed (device, run store),
the runner (seed, limit, chat, the config hash), run.json (`settings`, `argv`) and the model's load
(`load_options`).

Bad input raises ValueError with one line naming the option and the fix; the CLI prints it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from nsa_eval.model_adapters.runtime.config import SparseSettings
from nsa_eval.models import LoadOptions
from nsa_eval.registry import LM_EVAL_PREFIX, task_factory
from nsa_eval.task_options import typed_options
from nsa_eval.util import parse_int_list

# options that have flags of their own: --task-option TASK.KEY=... for them points at the flag
FLAG_OPTIONS = {"data_path": "--data TASK=PATH", "seed": "--seed N", "allow_code_execution": "--allow-code-execution",
                "include_path": "--include-path DIR"}

# the NIAH grid's flags, kept as aliases of --task-option niah.KEY: flag parameter -> (flag, task option)
NIAH_ALIASES = {"niah_lengths": ("--niah-lengths", "lengths"), "niah_depths": ("--niah-depths", "depths"),
                "niah_samples": ("--niah-samples", "samples_per_cell"), "haystack": ("--haystack", "haystack_dir")}

SPARSE_FLAGS = {"budget": "--sparse-budget", "leading": "--sparse-leading", "local": "--sparse-local",
                "block": "--sparse-block", "selection": "--sparse-selection"}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one run is asked to do. task_options: each task's --task-option values as text (the NIAH
    flags folded in as niah.lengths, ...), read as their option's types by `build_tasks`; data_paths: --data per
    task; sparse: the sparse attention settings (None with full attention); batch_size, prefill_chunk, max_length:
    None for the backend's default; output: None for results/runs/<model>-<tasks>-<time>."""

    model_spec: str = "smollm2"
    tasks: tuple[str, ...] = ()
    attention: str = "full"
    sparse: SparseSettings | None = None
    limit: int | None = None
    max_new_tokens: int | None = None
    seed: int = 0
    engine: str = "auto"
    batch_size: int | None = None
    max_length: int | None = None
    prefill_chunk: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    chat: bool | None = None
    data_paths: dict[str, str] = dataclasses.field(default_factory=dict)
    task_options: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    allow_code_execution: bool = False
    include_path: str | None = None
    output: Path | None = None
    overwrite: bool = False
    quiet: bool = False
    argv: tuple[str, ...] = ()

    @classmethod
    def points_from_cli(cls, *, sparse_budget: int | str | None, **options: Any) -> list[RunConfig]:
        """`nsa-eval run`'s configs: one, or one per budget when --sparse-budget lists several (a budget sweep,
        nsa_eval/sweep.py, which gives each its own output folder). Every point is checked here, before any model
        loads (a budget too small for the leading and local tokens names itself)."""
        budgets = parse_budgets(sparse_budget)
        if budgets is None or len(budgets) == 1:
            return [cls.from_cli(sparse_budget=budgets[0] if budgets else None, **options)]
        if options.get("attention") != "sparse":
            raise ValueError(f"--sparse-budget {sparse_budget} (a budget sweep) applies only with --attention sparse; "
                             "add --attention sparse or give one budget")
        return [cls.from_cli(sparse_budget=budget, **options) for budget in budgets]

    @classmethod
    def from_cli(cls, *, model_spec: str, attention: str, sparse_budget: int | None, sparse_leading: int | None,
                 sparse_local: int | None, sparse_block: int | None, sparse_selection: str | None, task_list: str, data_pairs: tuple[str, ...],
                 task_options: tuple[str, ...], niah_lengths: str | None, niah_depths: str | None,
                 niah_samples: int | None, haystack: Path | None, include_path: Path | None,
                 allow_code_execution: bool, **plain: Any) -> RunConfig:
        """The config of `nsa-eval run`'s parameters (the flags' values, None where a flag was not given), checked
        in the order a user reads them: task names, task options, settings that would do nothing, data paths."""
        tasks = list(dict.fromkeys(t.strip() for t in task_list.split(",") if t.strip()))
        if not tasks:
            raise ValueError("--tasks is empty; name at least one task (`nsa-eval list tasks`)")
        for name in tasks:
            task_factory(name)  # an unknown name: one line with the nearest known one, before anything else
        listed = ",".join(tasks)
        texts = parse_task_options(task_options, tasks)
        aliases = {"niah_lengths": niah_lengths, "niah_depths": niah_depths,
                   "niah_samples": None if niah_samples is None else str(niah_samples),
                   "haystack": None if haystack is None else str(haystack)}
        for parameter, value in aliases.items():
            flag, option = NIAH_ALIASES[parameter]
            if value is None:
                continue
            if "niah" not in tasks:
                raise ValueError(f"{flag} applies to the niah task, which is not among --tasks {listed}; add niah or "
                                 "leave it out")
            if option in texts.get("niah", {}):
                raise ValueError(f"{flag} and --task-option niah.{option} both set the NIAH {option}; give one of them")
            texts.setdefault("niah", {})[option] = value
        sparse_given = {"budget": sparse_budget, "leading": sparse_leading, "local": sparse_local, "block": sparse_block,
                        "selection": sparse_selection}
        if attention != "sparse":
            for key, value in sparse_given.items():
                if value is not None:
                    raise ValueError(f"{SPARSE_FLAGS[key]} applies only with --attention sparse; add --attention "
                                     "sparse or leave it out")
        if include_path is not None and not any(t.startswith(LM_EVAL_PREFIX) for t in tasks):
            raise ValueError(f"--include-path applies to lm-eval:TASK tasks, none of which is among --tasks {listed}; "
                             "leave it out")
        if allow_code_execution and "humaneval" not in tasks:
            raise ValueError(f"--allow-code-execution applies to humaneval, which is not among --tasks {listed}; "
                             "leave it out")
        sparse = SparseSettings(**{k: v for k, v in sparse_given.items() if v is not None}) \
            if attention == "sparse" else None
        return cls(model_spec=model_spec, tasks=tuple(tasks), attention=attention, sparse=sparse,
                   data_paths=parse_data_paths(data_pairs, tasks), task_options=texts,
                   include_path=str(include_path) if include_path is not None else None,
                   allow_code_execution=allow_code_execution, argv=tuple(sys.argv), **plain)

    def load_options(self, device: str | None = None) -> LoadOptions:
        """How the model loads (device: this process's own, e.g. a torchrun worker's GPU; None: --device)."""
        return LoadOptions(device=device or self.device, dtype=self.dtype, max_length=self.max_length,
                           batch_size=self.batch_size, engine=self.engine, attention=self.attention, sparse=self.sparse,
                           prefill_chunk=self.prefill_chunk)

    def settings(self) -> dict[str, Any]:
        """The command-line settings run.json keeps (outside the config hash), so a rerun into the same folder is
        checked before any model loads and a mismatch names the flags that differ. The NIAH grid is recorded under
        its flags' names with the values used (given either way, or the defaults), as runs have always recorded it,
        so older runs resume."""
        settings: dict[str, Any] = {"--model": self.model_spec, "--tasks": list(self.tasks), "--attention": self.attention}
        if self.sparse is not None:
            settings.update({SPARSE_FLAGS[key]: value for key, value in self.sparse.record().items()})
        settings.update({"--limit": self.limit, "--max-new-tokens": self.max_new_tokens, "--seed": self.seed,
                         "--max-length": self.max_length, "--device": self.device, "--dtype": self.dtype,
                         "--chat-template": self.chat})
        settings.update({f"--data {task}": path for task, path in sorted(self.data_paths.items())})
        grid_options = {option for _, option in NIAH_ALIASES.values()}
        if "niah" in self.tasks:
            factory = task_factory("niah")
            defaults = {name: p.default for name, p in inspect.signature(factory).parameters.items()}
            grid = {**defaults, **typed_options("niah", factory, self.task_options.get("niah", {}))}
            settings.update({flag: list(grid[option]) if isinstance(grid[option], (list, tuple)) else grid[option]
                             for flag, option in NIAH_ALIASES.values()})
        settings.update({f"--task-option {task}.{key}": value for task, values in sorted(self.task_options.items())
                         for key, value in sorted(values.items()) if not (task == "niah" and key in grid_options)})
        if any(t.startswith(LM_EVAL_PREFIX) for t in self.tasks):
            settings["--include-path"] = self.include_path
        if "humaneval" in self.tasks:
            settings["--allow-code-execution"] = self.allow_code_execution
        return json.loads(json.dumps(settings))

    def build_tasks(self) -> dict[str, Any]:
        """Each task built with the options its constructor accepts: the run-wide ones (seed, code execution,
        include path), its --data path and its --task-option values read as the types its options take (one line
        naming the option when one does not fit, or listing the task's options for an unknown one)."""
        common = {"seed": self.seed, "allow_code_execution": self.allow_code_execution,
                  "include_path": self.include_path}
        tasks = {}
        for name in self.tasks:
            factory = task_factory(name)
            accepted = inspect.signature(factory).parameters
            given = self.task_options.get(name, {})
            data = {"data_path": self.data_paths[name]} if name in self.data_paths else {}
            unknown = sorted((set(given) | set(data)) - set(accepted))
            if unknown and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
                known = ", ".join(k for k, p in accepted.items()
                                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and k not in FLAG_OPTIONS)
                raise ValueError(f"task '{name}' has no option '{unknown[0]}'; its options: {known}")
            wanted = {**common, **data, **typed_options(name, factory, given)}
            tasks[name] = factory(**{k: v for k, v in wanted.items() if k in accepted})
        return tasks

    def default_run_dir(self, model_name: str) -> Path:
        """results/runs/<model>-<tasks>-<time>."""
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{model_name}-{'-'.join(self.tasks)}").strip("-")
        return Path("results") / "runs" / f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


def parse_budgets(value: int | str | None) -> list[int] | None:
    """--sparse-budget's value: one budget, or several separated by commas (a sweep; k = 1024), e.g. '512,1k,2048' ->
    [512, 1024, 2048]; None when the flag was not given. A budget that is not a positive whole number, or one given
    twice, is one line naming it."""
    if value is None:
        return None
    if isinstance(value, int):
        return [value]
    budgets = parse_int_list(str(value), "--sparse-budget")
    for budget in budgets:
        if budget < 1:
            raise ValueError(f"--sparse-budget {value}: {budget} is not a budget; give positive token counts, e.g. "
                             "512,1024,2048")
    repeated = next((b for b in budgets if budgets.count(b) > 1), None)
    if repeated is not None:
        raise ValueError(f"--sparse-budget {value} names {repeated} twice; give each budget once")
    return budgets


def parse_data_paths(pairs: tuple[str, ...], task_names: list[str]) -> dict[str, str]:
    """('mmlu=/data/mmlu.jsonl', ...) -> {'mmlu': '/data/mmlu.jsonl'}; a bare PATH applies to a single task. Each path
    must exist, and each task gets one."""
    paths: dict[str, str] = {}
    for pair in pairs:
        task, sep, path = pair.partition("=")
        if not sep:
            if len(task_names) != 1:
                raise ValueError(f"--data {pair}: with several tasks, name the task: --data TASK=PATH")
            task, path = task_names[0], pair
        if task not in task_names:
            raise ValueError(f"--data {pair}: task '{task}' is not among --tasks {','.join(task_names)}")
        if task == "niah":
            raise ValueError("--data niah=...: niah generates its samples and reads no data file; "
                             "--task-option niah.haystack_dir=DIR gives it your own filler text")
        if not path.strip():
            raise ValueError(f"--data {pair}: the path after '=' is empty; give a file or folder, e.g. "
                             f"--data {task}=data/{task.split(':')[-1]}.jsonl")
        if task in paths:
            raise ValueError(f"--data names {task} twice ({paths[task]} and {path}); give one path per task")
        if not Path(path).expanduser().exists():
            wanted = getattr(task_factory(task), "data_help", "a jsonl/json/parquet/csv file or a folder of them")
            raise ValueError(f"--data {pair}: {path} does not exist; give {wanted}")
        paths[task] = path
    return paths


def parse_task_options(pairs: tuple[str, ...], task_names: list[str]) -> dict[str, dict[str, str]]:
    """('mmlu.variant=generative', ...) -> {'mmlu': {'variant': 'generative'}}: the values as text, read as their
    option's type by RunConfig.build_tasks (nsa_eval/task_options.py)."""
    options: dict[str, dict[str, str]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        task, dot, option = key.partition(".")
        if task not in task_names and key.count(".") > 1:  # lm-eval task names may hold dots: split at the last one
            task, _, option = key.rpartition(".")
            dot = "."
        if not sep or not dot or not option:
            raise ValueError(f"--task-option {pair}: write TASK.KEY=VALUE, e.g. mmlu.num_fewshot=0")
        if task not in task_names:
            raise ValueError(f"--task-option {pair}: task '{task}' is not among --tasks {','.join(task_names)}")
        option = option.replace("-", "_")
        if option in FLAG_OPTIONS:
            raise ValueError(f"--task-option {pair}: {option} has its own flag; use {FLAG_OPTIONS[option]}")
        if option in options.get(task, {}):
            raise ValueError(f"--task-option {task}.{option} is given twice ({options[task][option]} and {value}); "
                             "give it once")
        options.setdefault(task, {})[option] = value
    return options
