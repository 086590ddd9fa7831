"""Times LongBench scoring: 10,000 synthetic predictions over the 21 subsets, in LongBench's proportions.

    .venv/bin/python scripts/bench_longbench_scoring.py [N]

Predictions and answers are random text of the lengths LongBench produces: summaries of a few hundred
words against references of similar size (gov_report, qmsum, multi_news, samsum; Chinese vcsum and
dureader through jieba), short QA answers, class names, paragraph numbers, code lines. Prints the
wall time in total and per subset; the target is under 10 s for 10,000 predictions on 2 cores.
"""

from __future__ import annotations

import random
import sys
import time
from collections import defaultdict

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


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    cases = make_cases(n)
    score_prediction("vcsum", "预热", ["预热"], None)  # jieba loads its dictionary once (~1 s), not timed
    per_subset: dict[str, float] = defaultdict(float)
    started = time.perf_counter()
    for subset, prediction, answers, classes in cases:
        t0 = time.perf_counter()
        score_prediction(subset, prediction, answers, classes)
        per_subset[subset] += time.perf_counter() - t0
    elapsed = time.perf_counter() - started
    print(f"scored {len(cases)} LongBench predictions in {elapsed:.2f} s ({len(cases) / elapsed:,.0f}/s)")
    for subset, seconds in sorted(per_subset.items(), key=lambda item: -item[1])[:8]:
        print(f"  {subset:22s} {seconds:6.2f} s")


if __name__ == "__main__":
    main()
