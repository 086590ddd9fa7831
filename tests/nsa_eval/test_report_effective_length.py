"""Effective length (report/effective.py) on hand-made runs: the value in the report's tables equals the one computed by
hand from the samples, under RULER's threshold (85.6) and NoLiMa's (0.85 x the shortest length's score), with the
bootstrap interval deciding borderline lengths whose point estimate passes.

By hand: a length's bootstrap draws of a mean of n 0/1 scores with k right are Binomial(n, k/n) / n, so the lower end
of the 95% percentile interval is the binomial's 2.5% quantile (the cases below sit well inside one step of the
binomial's distribution function, so 2000 resamples find it); NoLiMa's margin is the difference of two such draws,
whose quantile comes from the exact distribution of that difference."""

import json
import math
import random
import re

import pytest

from nsa_eval.report.build import build_report
from nsa_eval.report.effective import effective_lengths
from nsa_eval.report.runs import load_run
from nsa_eval.tasks.ruler_data import SUBTASKS
from report_runs import TaskData, record, write_run
from test_report_tables import markdown_table, section

K = 1024
TITLE = "niah: effective length (NIAH; scores in percent)"


def niah_run(right_of: dict[int, tuple[int, int]]) -> TaskData:
    """NIAH records with k of n right at each length: {length: (k, n)}."""
    rng = random.Random(0)
    records = []
    for length, (right, n) in right_of.items():
        for i in range(n):
            ok = i < right
            records.append(record(f"len{length}-{i}", f"haystack {length} {i}", "7", "7" if ok else "no",
                                  {"accuracy": float(ok)}, {"length": length, "depth": 50}, rng))
    return TaskData(records, "accuracy", ("length", "depth"), config={"lengths": sorted(right_of)})


def binomial_cdf(n: int, p: float, k: int) -> float:
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


def low_end(right: int, n: int) -> float:
    """The 2.5% quantile of 100 * Binomial(n, right/n) / n: the lower end of the score's 95% interval."""
    p = right / n
    q = next(q for q in range(n + 1) if binomial_cdf(n, p, q) >= 0.025)
    assert binomial_cdf(n, p, q - 1) < 0.02 and binomial_cdf(n, p, q) > 0.03  # far from the step's edges
    return 100 * q / n


def nolima_low_end(score: tuple[int, int], base: tuple[int, int]) -> float:
    """The 2.5% quantile of 100 X/n - 0.85 * 100 Y/m, X ~ Binomial(n, k/n), Y ~ Binomial(m, j/m) independent."""
    (k, n), (j, m) = score, base
    mass: dict[float, float] = {}
    for x in range(n + 1):
        for y in range(m + 1):
            value = round(100 * x / n - 0.85 * 100 * y / m, 9)
            chance = math.comb(n, x) * (k / n) ** x * (1 - k / n) ** (n - x) * math.comb(m, y) * (j / m) ** y * (1 - j / m) ** (m - y)
            mass[value] = mass.get(value, 0.0) + chance
    total = 0.0
    for value, chance in sorted(mass.items()):
        total += chance
        if total >= 0.025:
            return value
    raise AssertionError


def effective_by_hand(passes: dict[int, bool]) -> str:
    """The longest length with every length up to it passing: "<shortest" when the shortest fails, "\u2265longest"
    when all pass."""
    lengths = sorted(passes)
    longest = None
    for length in lengths:
        if not passes[length]:
            break
        longest = length
    label = lambda n: f"{n // K}K"  # noqa: E731
    if longest is None:
        return f"<{label(lengths[0])}"
    return f"\u2265{label(longest)}" if longest == lengths[-1] else label(longest)


# Borderline: 4K scores 95 (19 of 20), above RULER's 85.6, but its interval reaches down to 85.0: it does not pass.
BORDERLINE = {1 * K: (40, 40), 2 * K: (38, 40), 4 * K: (19, 20), 8 * K: (40, 40)}
# Relative: the shortest length scores 95 (19/20); 4K scores 90 (18/20), above NoLiMa's 0.85 x 95 = 80.75, but the
# interval of 90 - 0.85 x 95 (both resampled) holds values below 0.
RELATIVE = {1 * K: (19, 20), 2 * K: (20, 20), 4 * K: (18, 20), 8 * K: (20, 20)}
STRONG = {1 * K: (20, 20), 2 * K: (20, 20), 4 * K: (20, 20), 8 * K: (20, 20)}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("effective")
    runs = [write_run(root, "borderline", "Borderline", {"niah": niah_run(BORDERLINE)}),
            write_run(root, "relative", "Relative", {"niah": niah_run(RELATIVE)}),
            write_run(root, "strong", "Strong", {"niah": niah_run(STRONG)})]
    build_report(runs, root / "out", formats=("md", "latex", "html"))
    return root


def rows(report):
    table = markdown_table((report / "out" / "report.md").read_text(), TITLE)
    assert list(table.columns) == ["Model", "Threshold", "Effective length", "1K", "2K", "4K", "8K"]
    return {(strip_marks(row[0]), row[1].split(" ")[0]): row for row in table.itertuples(index=False)}


def strip_marks(text: str) -> str:
    return re.sub(r"\[\d+\]", "", text)


def test_rulers_threshold_by_hand_with_the_interval_deciding_a_borderline_length(report):
    by_hand = {length: low_end(*kn) >= 85.6 for length, kn in BORDERLINE.items()}
    assert low_end(19, 20) == 85.0 and 100 * 19 / 20 > 85.6  # the point estimate alone would pass 4K
    assert by_hand == {1 * K: True, 2 * K: True, 4 * K: False, 8 * K: True}
    table = rows(report)
    row = table["Borderline", "RULER"]
    assert strip_marks(row[2]) == effective_by_hand(by_hand) == "2K"
    assert row[5].startswith("+9.4 [-0.6, ") and row[5].endswith("?")  # 95 - 85.6, interval from 85.0 - 85.6
    assert row[4].startswith(f"+9.4 [{low_end(38, 40) - 85.6:+.1f}, ") and row[4].endswith("\u2713")
    assert row[3] == "+14.4 [+14.4, +14.4] \u2713" and row[6].endswith("\u2713")  # 8K passes, after a failing 4K
    notes = section((report / "out" / "report.md").read_text(), TITLE)
    assert ("Borderline (RULER threshold): by the point estimates alone (score above the threshold, as RULER and "
            "NoLiMa decide) the effective length would be \u22658K") in notes
    # RULER's threshold on the other runs: Relative's shortest length (95, 19/20) fails, later ones pass; Strong passes all
    relative = {length: low_end(*kn) >= 85.6 if kn[0] < kn[1] else True for length, kn in RELATIVE.items()}
    assert effective_by_hand(relative) == "<1K"
    assert strip_marks(table["Relative", "RULER"][2]) == "<1K"
    assert "<1K: the shortest evaluated length does not pass (2K, 8K pass after it)" in notes
    assert strip_marks(table["Strong", "RULER"][2]) == "\u22658K"
    assert ("\u22658K: at least the threshold at every evaluated length; 8K is the longest evaluated, so the effective "
            "length may be longer") in notes


def test_nolimas_threshold_by_hand_with_both_scores_resampled(report):
    base = RELATIVE[1 * K]
    threshold = 0.85 * 100 * base[0] / base[1]
    assert threshold == pytest.approx(80.75)
    by_hand = {length: nolima_low_end(kn, base) >= 0 for length, kn in RELATIVE.items()}
    assert 100 * 18 / 20 - threshold > 0 and nolima_low_end((18, 20), base) < -4  # 4K: the point passes, the interval not
    assert by_hand == {1 * K: True, 2 * K: True, 4 * K: False, 8 * K: True}
    table = rows(report)
    row = table["Relative", "NoLiMa"]
    assert row[1] == "NoLiMa 0.85 x 95.0 (1K) = 80.8"
    assert strip_marks(row[2]) == effective_by_hand(by_hand) == "2K"
    low = float(re.match(r"\+9\.2 \[([-+]\d+\.\d)", row[5]).group(1))
    assert low == pytest.approx(nolima_low_end((18, 20), base), abs=2.5) and row[5].endswith("?")
    assert row[4].startswith("+19.2 [+15.0, ") and row[4].endswith("\u2713")  # 100 - 0.85 x Y/20 >= 15 always
    assert strip_marks(table["Strong", "NoLiMa"][2]) == "\u22658K"
    run = load_run(report / "relative")
    ruler, nolima = effective_lengths(run, "niah")
    assert (ruler.length, nolima.length, nolima.point_length) == (None, 2 * K, 8 * K)


def test_the_effective_length_table_is_in_latex_and_html(report):
    latex = re.sub(r"\\textsuperscript\{\[\d+\]\}", "", (report / "out" / "tables.tex").read_text())
    assert r"\caption{niah: effective length (NIAH; scores in percent)}" in latex
    assert r"Borderline & RULER 85.6 & 2K" in latex and r"Strong & RULER 85.6 & $\geq$8K" in latex
    html = (report / "out" / "report.html").read_text()
    assert 'id="niah-effective-length"' in html and "whole 95% percentile bootstrap interval" in html


def ruler_run(score_of) -> TaskData:
    """RULER records of all 13 tasks at 4K, 8K and 16K, 4 samples each, scored score_of(task, length)."""
    rng = random.Random(1)
    records = [record(f"{task}/{length}/{k}", f"{task} {length} {k}", ["a"], "a", {"score": score_of(task, length)},
                      {"task": task, "length": length}, rng)
               for task in SUBTASKS for length in (4 * K, 8 * K, 16 * K) for k in range(4)]
    return TaskData(records, "score", ("task", "length"), config={"lengths": [4 * K, 8 * K, 16 * K]})


def test_ruler_scores_are_task_means_resampled_within_each_task(tmp_path):
    """At 8K one of RULER's 13 tasks scores 0 and the others 1 on every sample: 12/13 = 92.3 with no spread inside any
    task, so the interval is [92.3, 92.3] (resampling within tasks keeps the design); at 16K every sample scores 0.5."""
    first = next(iter(SUBTASKS))
    score = lambda task, length: {4 * K: 1.0, 8 * K: 0.0 if task == first else 1.0, 16 * K: 0.5}[length]  # noqa: E731
    run = write_run(tmp_path, "r", "R", {"ruler": ruler_run(score)})
    build_report([run], tmp_path / "out", formats=("md",))
    text = (tmp_path / "out" / "report.md").read_text()
    table = markdown_table(text, "ruler: effective length (RULER; scores in percent)")
    ruler_row, nolima_row = list(table.itertuples(index=False))
    assert strip_marks(ruler_row[2]) == "8K" and ruler_row[4] == f"{100 * 12 / 13 - 85.6:+.1f} [+6.7, +6.7] \u2713"
    assert ruler_row[5] == "-35.6 [-35.6, -35.6] \u2717"
    assert strip_marks(nolima_row[2]) == "8K"  # 92.3 >= 85 at 8K, 50 < 85 at 16K
    readme = markdown_table(text, "ruler: RULER's table (score in percent, mean over tasks per length)")
    assert strip_marks(readme.iloc[0, 2]) == "8K"  # RULER's table says the same


def test_too_few_samples_give_no_interval_and_no_pass(tmp_path):
    run = write_run(tmp_path, "one", "One", {"niah": niah_run({1 * K: (1, 1), 2 * K: (1, 1)})})
    ruler, nolima = effective_lengths(load_run(run), "niah")
    assert all(math.isnan(check.margin.low) for check in ruler.checks) and ruler.text() == "<1K"
    assert any("fewer than 2 samples" in note for note in ruler.notes)
    assert json.loads((run / "metrics.json").read_text())["tasks"]["niah"]["n"] == 2
