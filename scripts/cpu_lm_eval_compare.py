"""The engine on the CPU against lm-evaluation-harness's own HF backend, back to back, on one lm-eval task.

    python scripts/cpu_lm_eval_compare.py --task gsm8k --data ../shared/data/gsm8k/test.jsonl --limit 20 --batch 4

Both runs use the embedded SmolLM2-135M-Instruct in float32 on the CPU, the task's own prompts and gen_kwargs and the
same local rows and plain-text prompts (lm-eval's default: no chat template): (1) `nsa-eval run --tasks lm-eval:TASK` (our runner, the native engine), (2) `lm_eval`'s
`simple_evaluate(model="hf", ...)` with the same task object. Prints and writes (--out) the wall times and how many
responses are identical.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def ours(task: str, data: str, limit: int, batch: int, out: Path) -> tuple[float, list[str]]:
    command = [sys.executable, "-m", "nsa_eval", "run", "--model", "smollm2", "--tasks", f"lm-eval:{task}", "--data",
               f"lm-eval:{task}={data}", "--limit", str(limit), "--batch-size", str(batch), "--dtype", "float32",
               "--device", "cpu", "--no-chat-template", "--output", str(out), "--quiet"]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in next((out / "samples").glob("*.jsonl")).read_text().splitlines()]
    return wall, [r["responses"][0] for r in sorted(records, key=lambda r: int(r["id"]))]


def theirs(task: str, data: str, limit: int, batch: int) -> tuple[float, list[str]]:
    import lm_eval
    import lm_eval.models  # noqa: F401  (registers lm-eval's own backends, "hf" among them)

    from nsa_eval.lm_eval_bridge import load_task
    from nsa_eval.model_adapters.smollm2 import plain_checkpoint

    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={plain_checkpoint()},dtype=float32",
                                      tasks=[load_task(task, data_path=data)], limit=limit, batch_size=batch,
                                      device="cpu", log_samples=True)
    wall = time.perf_counter() - start
    samples = {s["doc_id"]: s for s in results["samples"][task]}  # one entry per filter: the response is the same
    return wall, [samples[i]["resps"][0][0] for i in sorted(samples)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--data", required=True)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("results/bench/lm-eval-cpu.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        our_wall, our_texts = ours(args.task, args.data, args.limit, args.batch, Path(folder) / "run")
    print(f"nsa-eval run: {our_wall:.1f} s", flush=True)
    their_wall, their_texts = theirs(args.task, args.data, args.limit, args.batch)
    same = sum(a == b for a, b in zip(our_texts, their_texts))
    from nsa_eval.store import git_sha

    report = (f"# The engine on the CPU vs lm-evaluation-harness's HF backend\n\n"
              f"`python scripts/cpu_lm_eval_compare.py --task {args.task} --limit {args.limit} --batch {args.batch}`: "
              f"SmolLM2-135M-Instruct, float32, CPU, {args.limit} local rows, back to back; commit {git_sha()}.\n\n"
              f"| backend | wall s |\n|---|---|\n| nsa-eval run (native engine) | {our_wall:.1f} |\n"
              f"| lm_eval simple_evaluate(model=hf) | {their_wall:.1f} |\n\n"
              f"ratio {our_wall / their_wall:.2f}; identical responses {same}/{len(their_texts)}\n")
    print(report)
    args.out.write_text(report)


if __name__ == "__main__":
    main()
