"""`nsa-eval bench`: speed benchmarks, one module per subcommand, registered here (the one place).

- kernels.py  `bench kernels`: attention kernels against PyTorch SDPA, checked for correctness in the same run (GPU)
- model.py    `bench model`: a whole NSA transformer against the same one with full attention on SDPA (GPU)
- tasks.py    `bench tasks`: task scoring speed, LongBench metrics and the HumanEval sandbox (CPU)
- eval.py     `bench eval`: evaluation end to end, the native engine against transformers (GPU)
- suite.py    `bench suite`: a whole evaluation task by task (NIAH to AIME), beside lm-eval's HF backend (GPU; CPU
              with --shapes tiny)
- batching.py `bench batching`: packed (varlen) forwards against one sequence per pass (CPU or GPU)
- common.py   what they share: card name, copy bandwidth, CUDA graphs, SDPA baselines, the table writer
"""

from __future__ import annotations

import click

from nsa_eval.bench.batching import batching_command
from nsa_eval.bench.eval import eval_command
from nsa_eval.bench.kernels import kernels_command
from nsa_eval.bench.model import model_command
from nsa_eval.bench.suite import suite_command
from nsa_eval.bench.tasks import tasks_command


@click.group()
def bench() -> None:
    """Speed benchmarks: kernels, model and eval need a CUDA GPU; tasks (scoring speed) runs on the CPU; suite on either."""


for _command in (kernels_command, model_command, tasks_command, eval_command, suite_command, batching_command):
    bench.add_command(_command)
