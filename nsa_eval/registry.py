"""Names -> tasks. The one place a new task is registered (one line in TASKS); model specs are in nsa_eval/models.py."""

from __future__ import annotations

import functools
from typing import Callable

from nsa_eval.tasks.base import Task
from nsa_eval.tasks.aime import AIME
from nsa_eval.tasks.gsm8k import GSM8K
from nsa_eval.tasks.humaneval import HumanEval
from nsa_eval.tasks.longbench import LongBench
from nsa_eval.tasks.mmlu import MMLU
from nsa_eval.tasks.niah import NeedleInAHaystack
from nsa_eval.tasks.perplexity import Perplexity
from nsa_eval.tasks.ruler import Ruler
from nsa_eval.util import did_you_mean

# name -> factory(**options) -> Task. Options come from the CLI (see `nsa-eval run --help`).
TASKS: dict[str, type[Task]] = {
    "niah": NeedleInAHaystack,
    "mmlu": MMLU,
    "gsm8k": GSM8K,
    "longbench": LongBench,
    "aime": AIME,
    "humaneval": HumanEval,
    "ruler": Ruler,
    "perplexity": Perplexity,
}

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

