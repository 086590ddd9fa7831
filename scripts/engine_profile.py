"""Where the engine's time goes in a generation workload on a GPU: CUDA kernels and host ops of a few decode steps.

    python scripts/engine_profile.py --variant llama-sparse --workload 1x1k:16x256 [--tokenizer DIR]

Random weights in the shapes of `nsa-eval bench eval` (nsa_eval/bench/eval.py); the first generate warms up (compiles,
graphs), the second runs under torch.profiler; prints the engine's stats and the top CUDA kernels and CPU ops.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
from pathlib import Path

import torch

from nsa_eval.bench.eval import build_checkpoints, load_variant, longgen_part, parse_workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="llama-sparse")
    parser.add_argument("--workload", default="1x1k:16x256", help="PxL:nxN as bench eval --longgen")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--rows", type=int, default=25, help="rows of each table")
    args = parser.parse_args()
    if args.tokenizer is None:
        from nsa_eval.model_adapters.smollm2 import plain_checkpoint

        args.tokenizer = plain_checkpoint()
    root = Path(tempfile.mkdtemp(prefix="nsa-eval-profile-"))
    try:
        lm = load_variant(args.variant, build_checkpoints(root, args.tokenizer, [args.variant]), args.batch)
        workload = parse_workload(args.workload)
        print("warm-up:", longgen_part(lm, *workload, random.Random(0)))
        before = dict(vars(lm.stats))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as profile:
            print("profiled:", longgen_part(lm, *workload, random.Random(1)))
        after = vars(lm.stats)
        steps = after["decode_steps"] - before["decode_steps"]
        print(f"decode: {steps} steps, {1e3 * (after['decode_s'] - before['decode_s']) / max(steps, 1):.3f} ms/step; "
              f"buckets {after['buckets']}")
        table = profile.key_averages()
        print(table.table(sort_by="cuda_time_total", row_limit=args.rows))
        print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
