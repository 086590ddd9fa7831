"""`nsa-eval bench tasks`: how fast the harness scores, on the CPU (no model involved).

- LongBench scoring: 10,000 synthetic predictions over the 21 subsets, in LongBench's proportions (target: < 10 s
  on 2 cores).
- HumanEval: the 164 canonical solutions through the sandbox (target: < 60 s on 2 cores).

Predictions and answers are random text of the lengths LongBench produces: summaries of a few hundred
words against references of similar size (gov_report, qmsum, multi_news, samsum; Chinese vcsum and
dureader through jieba), short QA answers, class names, paragraph numbers, code lines. Prints the
wall time in total and per subset; the target is under 10 s for 10,000 predictions on 2 cores.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict

import click

from nsa_eval.tasks.longbench_metrics import score_prediction

# rows per subset in LongBench v1 (4,750 in all)
ROWS = {
    "narrativeqa": 200, "qasper": 200, "multifieldqa_en": 150, "multifieldqa_zh": 200, "hotpotqa": 200,
    "2wikimqa": 200, "musique": 200, "dureader": 200, "gov_report": 200, "qmsum": 200, "multi_news": 200,
    "vcsum": 200, "trec": 200, "triviaqa": 200, "samsum": 200, "lsht": 200, "passage_count": 200,
    "passage_retrieval_en": 200, "passage_retrieval_zh": 200, "lcc": 500, "repobench-p": 500,
}
# (prediction words, answer words) for English, characters for Chinese
SIZES = {
    "gov_report": (380, 600), "qmsum": (300, 70), "multi_news": (380, 260), "samsum": (60, 25),
    "vcsum": (600, 300), "dureader": (150, 120), "multifieldqa_zh": (60, 15),
}
ZH_PUNCTUATION = "，。"


def chinese_vocabulary(size: int = 5000) -> list[str]:
    """jieba's own dictionary words, most frequent first: text made of them segments like real Chinese."""
    import jieba

    with jieba.get_dict_file() as handle:
        entries = [line.decode("utf-8").split()[:2] for line in handle]
    entries.sort(key=lambda entry: -int(entry[1]))
    return [word for word, _ in entries[:size]]


def english(rng: random.Random, vocabulary: list[str], weights: list[float], words: int) -> str:
    """Sentences of 12-25 words drawn from a Zipf-like vocabulary, ended by periods."""
    out, left = [], words
    while left > 0:
        size = min(left, rng.randint(12, 25))
        out.append(" ".join(rng.choices(vocabulary, weights, k=size)) + ".")
        left -= size
    return " ".join(out)


def chinese(rng: random.Random, vocabulary: list[str], weights: list[float], characters: int) -> str:
    """Clauses of 4-8 dictionary words, separated by Chinese commas and periods, about `characters` long."""
    out: list[str] = []
    length = 0
    while length < characters:
        clause = "".join(rng.choices(vocabulary, weights, k=rng.randint(4, 8)))
        out.append(clause + rng.choice(ZH_PUNCTUATION))
        length += len(clause) + 1
    return "".join(out)


def make_cases(n: int, seed: int = 0) -> list[tuple[str, str, list[str], list[str] | None]]:
    """n (subset, prediction, answers, all_classes) tuples in LongBench's subset proportions."""
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(5000)]
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]
    zh_vocabulary = chinese_vocabulary()
    zh_weights = [1 / (rank + 1) for rank in range(len(zh_vocabulary))]
    trec_classes = [f"Class {i}" for i in range(50)]
    lsht_classes = zh_vocabulary[100:124]
    total = sum(ROWS.values())
    cases = []
    for subset, rows in ROWS.items():
        for _ in range(round(n * rows / total)):
            pred_size, answer_size = SIZES.get(subset, (rng.randint(3, 90), rng.randint(1, 8)))
            classes = None
            if subset in ("vcsum", "dureader", "multifieldqa_zh"):
                prediction = chinese(rng, zh_vocabulary, zh_weights, pred_size)
                answers = [chinese(rng, zh_vocabulary, zh_weights, answer_size)]
            elif subset in ("trec", "lsht"):
                classes = trec_classes if subset == "trec" else lsht_classes
                prediction, answers = rng.choice(classes) + "\nQuestion: ...", [rng.choice(classes)]
            elif subset == "passage_count":
                prediction, answers = f"There are {rng.randint(1, 30)} paragraphs", [str(rng.randint(1, 30))]
            elif subset == "passage_retrieval_en":
                prediction, answers = f"Paragraph {rng.randint(1, 30)}", [f"Paragraph {rng.randint(1, 30)}"]
            elif subset == "passage_retrieval_zh":
                prediction, answers = f"段落{rng.randint(1, 30)}", [f"段落{rng.randint(1, 30)}"]
            elif subset in ("lcc", "repobench-p"):
                line = lambda: "    " + " ".join(rng.choices(vocabulary[:200], k=rng.randint(3, 12)))  # noqa: E731
                prediction, answers = "\n".join(line() for _ in range(3)), [line()]
            else:
                prediction = english(rng, vocabulary, weights, pred_size)
                answers = [english(rng, vocabulary, weights, answer_size) for _ in range(rng.randint(1, 2))]
            cases.append((subset, prediction, answers, classes))
    return cases


def longbench_scoring(n: int) -> tuple[int, float, dict[str, float]]:
    """(predictions scored, seconds, seconds per subset) for n synthetic LongBench predictions."""
    cases = make_cases(n)
    score_prediction("vcsum", "预热", ["预热"], None)  # jieba loads its dictionary once (~1 s), not timed
    per_subset: dict[str, float] = defaultdict(float)
    started = time.perf_counter()
    for subset, prediction, answers, classes in cases:
        t0 = time.perf_counter()
        score_prediction(subset, prediction, answers, classes)
        per_subset[subset] += time.perf_counter() - t0
    return len(cases), time.perf_counter() - started, dict(per_subset)


@click.command("tasks")
@click.option("--predictions", default=10_000, show_default=True, type=click.IntRange(min=21),
              help="Synthetic LongBench predictions to score.")
@click.option("--workers", type=click.IntRange(min=1), help="HumanEval programs run at a time (default: one per core).")
@click.option("--skip-humaneval", is_flag=True, help="Only time LongBench scoring.")
def tasks_command(predictions: int, workers: int | None, skip_humaneval: bool) -> None:
    """Time task scoring on the CPU: LongBench metrics over synthetic predictions, HumanEval's canonical
    solutions through the sandbox."""
    count, seconds, per_subset = longbench_scoring(predictions)
    click.echo(f"LongBench: scored {count} predictions in {seconds:.2f} s ({count / seconds:,.0f}/s; target < 10 s "
               f"for 10,000 on 2 cores)")
    click.echo("  slowest subsets: " + ", ".join(
        f"{subset} {s:.2f} s" for subset, s in sorted(per_subset.items(), key=lambda item: -item[1])[:5]))
    if not skip_humaneval:
        from nsa_eval.tasks.humaneval import bench as humaneval_bench

        click.echo(humaneval_bench(workers) + " (target < 60 s on 2 cores)")
