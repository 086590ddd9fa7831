"""The report of `nsa-eval bench suite` (bench/suite.py): the targets it checks (`summary`) and its Markdown
(`format_report`), from the results dict the command writes as JSON."""

from __future__ import annotations

from typing import Any

from nsa_eval.bench.eval import _table

def summary(results: dict) -> dict:
    """The issue's targets from the rows: per-sample speed-up of mmlu and gsm8k over their one-slot rows, and the shared
    tasks' total time on our engine against lm-eval's HF backend (same samples, llama-full)."""
    rows = results["rows"]
    out: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = {r["task"]: r for r in rows if r["model"] == model and r["engine"] == "nsa-eval"}
        for task in ("mmlu", "gsm8k"):
            if task in mine and f"{task}@1" in mine:
                out[f"{model}:{task}_vs_one_at_a_time"] = mine[f"{task}@1"]["s_per_sample"] / mine[task]["s_per_sample"]
    ours = {r["task"]: r for r in rows if r["model"] == "llama-full" and r["engine"] == "nsa-eval"}
    theirs = {r["task"]: r for r in rows if r["engine"] == "lm-eval hf"}
    shared = [t for t in theirs if t in ours]
    if shared:
        out["shared_tasks"] = shared
        out["shared_nsa_eval_s"] = sum(ours[t]["wall_s"] for t in shared)
        out["shared_lm_eval_s"] = sum(theirs[t]["wall_s"] for t in shared)
        out["suite_vs_lm_eval"] = out["shared_lm_eval_s"] / out["shared_nsa_eval_s"]
        out["agreement"] = {t: theirs[t]["agreement"] for t in shared}
    return out


def format_report(results: dict) -> str:
    shapes = "; ".join(f"{name}: {shape_text(shape)}" for name, shape in results["shapes"].items())
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    lines = [f"# A whole evaluation, task by task, on {results['device']}", "",
             f"`nsa-eval bench suite {results['argv']}`: random bfloat16 weights (float32 on the CPU), EOS off, "
             f"plain-text prompts, seed {results['seed']}; {shapes}. {versions}; commit {results['git_sha']}. "
             f"{results.get('lm_eval_note', '')}", ""]
    for model, info in results.get("models", {}).items():
        lines.append(f"- {model}: {info['params'] / 1e9:.3g}B parameters, loaded in {info['load_s']:.1f} s"
                     + (f", cache reserved and warmed up (compiles, graph captures) in {info['warmup_s']:.1f} s "
                        "before the first task" if "warmup_s" in info else ""))
    if results.get("skipped"):
        lines.append(f"- not run (past --deadline): {', '.join(results['skipped'])}")
    for failure in results.get("failed", []):
        lines.append(f"- failed: {failure}")
    if "wall_s" in results:
        lines.append(f"- the whole command: {results['wall_s']:.0f} s")
    lines.append("")
    rows = results["rows"]
    lines += _table("**tasks** (wall s includes building the samples, scoring and any warm-up, not loading; prompt "
                    "tokens: the generative samples' prompts, and for mmlu context + continuation once per choice; "
                    "tokens/s: prompt + generated tokens per wall second; vs lm-eval: its seconds per sample over "
                    "ours, same samples; full budget: share of completions that ran their whole budget)",
                    ["task", "model", "engine", "batch", "samples", "wall s", "of which samples built s",
                     "warm-up s", "samples/s",
                     "prompt tokens", "generated", "tokens/s", "full budget", "vs lm-eval", "agreement"],
                    [[r["task"], r["model"], r["engine"], r["batch"], r["samples"], f"{r['wall_s']:.2f}",
                      f"{r['build_s']:.2f}", f"{r['warmup_s']:.1f}", f"{r['samples_per_s']:.2f}", r["prompt_tokens"],
                      r["generated_tokens"],
                      f"{r['tokens_per_s']:.0f}", _percent(r.get("full_budget_share")),
                      f"{r['vs_lm_eval']:.1f}x" if r.get("vs_lm_eval") else "",
                      _percent(r.get("agreement"))] for r in rows])
    s = results.get("summary", {})
    facts = []
    for key, value in s.items():
        if key.endswith("_vs_one_at_a_time"):
            model, task = key.split(":")
            facts.append(f"- {model} {task.split('_')[0]}: per sample {value:.1f}x as fast as one prompt at a time "
                         f"(target >= 5x)")
    if "suite_vs_lm_eval" in s:
        agreed = ", ".join(f"{t} {_percent(a)}" for t, a in s["agreement"].items())
        facts.append(f"- llama-full, the tasks both run ({', '.join(s['shared_tasks'])}): "
                     f"{s['shared_nsa_eval_s']:.1f} s on nsa-eval, {s['shared_lm_eval_s']:.1f} s on lm-eval's HF "
                     f"backend: {s['suite_vs_lm_eval']:.1f}x (target >= 5x); greedy agreement {agreed}"
                     + " (" + "; ".join(agreement_detail(r) for r in rows if r["engine"] == "lm-eval hf") + ")")
    if facts:
        lines += ["**targets**", "", *facts, ""]
    return "\n".join(lines) + "\n"


def agreement_detail(row: dict) -> str:
    """An lm-eval row's closeness beyond the agreement rate."""
    if "max_abs_logprob_diff" in row:
        return f"{row['task']}: largest |log-probability difference| {row['max_abs_logprob_diff']:.3g}"
    return f"{row['task']}: responses share {_percent(row['mean_common_prefix_share'])} of their text as a prefix"


def shape_text(shape: dict) -> str:
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size")
    return ", ".join(f"{k.replace('num_', '').replace('_', ' ')} {shape[k]}" for k in keys if k in shape)


def _percent(share: float | None) -> str:
    return "" if share is None else f"{100 * share:.0f}%"
