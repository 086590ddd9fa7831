"""LongBench v1's metrics, giving the numbers of its reference scorer (THUDM/LongBench metrics.py + eval.py).

Every function scores one prediction against one reference answer, in [0, 1]; a sample's score is the
maximum over its answers (`score_prediction`). The reference's quirks are kept on purpose, since they
are part of the published numbers:

- classification: a matched class that is part of the ground truth but not all of it is removed from
  the match list while the reference iterates over that same list, so the match after it is skipped;
- ROUGE-L is the `rouge` package's (Rouge().get_scores(...)["rouge-l"]["f"]): sentences split on ".",
  words counted as sets, the union of the words of one longest-common-subsequence path per (reference
  sentence, predicted sentence) pair, and 0 when the package raises: an empty side, or a path longer
  than Python's recursion limit allows its recursive back-tracking in eval.py (CPython, limit 1000:
  991 frames for English, 990 for Chinese, where rouge_zh_score adds one). It is recomputed here with
  bit-parallel LCS rows instead of the package's O(n*m) dict table, to the same float;
- code similarity is fuzzywuzzy's fuzz.ratio in its pure-Python form (difflib's SequenceMatcher, which
  fuzzywuzzy uses when python-Levenshtein is absent, as in LongBench's requirements).
"""

from __future__ import annotations

import difflib
import logging
import re
import string
from collections import Counter
from typing import Callable

_EN_PUNCTUATION = set(string.punctuation)
_ZH_PUNCTUATION = set(
    string.punctuation
    + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
# frames the rouge package's recursive _recon may use under LongBench's eval.py (see the module doc)
ROUGE_MAX_RECON_FRAMES_EN = 991
ROUGE_MAX_RECON_FRAMES_ZH = 990


def _jieba_cut(text: str) -> list[str]:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict..." lines on stderr
    return list(jieba.cut(text, cut_all=False))


def normalize_answer(text: str) -> str:
    """SQuAD-style: lower case, no punctuation, no articles (a/an/the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Lower case, no English or Chinese punctuation, no whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCTUATION).split())


def token_f1(prediction: list[str], reference: list[str]) -> float:
    """F1 of the multiset overlap of two token lists."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(reference)
    return (2 * precision * recall) / (precision + recall)


def qa_f1(prediction: str, reference: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def qa_f1_zh(prediction: str, reference: str, **_) -> float:
    """F1 over jieba words, each normalised, empty ones dropped."""

    def words(text: str) -> list[str]:
        return [w for w in (normalize_zh_answer(t) for t in _jieba_cut(text)) if w]

    return token_f1(words(prediction), words(reference))


def _sentences(text: str) -> list[list[str]]:
    """The rouge package's split: pieces between '.', whitespace collapsed, then words on ' '."""
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if len(piece) > 0]


def _lcs_path(x: list[str], y: list[str], positions: dict[str, int]) -> tuple[set[str], int]:
    """(words on the rouge package's LCS back-tracking path of x and y, number of steps of that path).

    positions: word -> bitmask of its positions in y. Row i of the LCS table is kept as a bit vector V_i
    (Hyyro's bit-parallel LCS): table[i][j] = number of zero bits of V_i below bit j. The path starts at
    (len(x), len(y)) and, like the package, steps diagonally on equal words, else up when
    table[i-1][j] > table[i][j-1], else left, until i or j reaches 0.
    """
    full = (1 << len(y)) - 1
    rows = [full]
    v = full
    for word in x:
        u = v & positions.get(word, 0)
        v = ((v + u) | (v - u)) & full
        rows.append(v)
    i, j = len(x), len(y)
    words: set[str] = set()
    steps = 0
    while i > 0 and j > 0:
        steps += 1
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i -= 1
            j -= 1
            continue
        below_j = (1 << j) - 1
        up = j - (rows[i - 1] & below_j).bit_count()
        left = (j - 1) - (rows[i] & (below_j >> 1)).bit_count()
        if up > left:
            i -= 1
        else:
            j -= 1
    return words, steps


def rouge_l(prediction: str, reference: str, max_recon_frames: int = ROUGE_MAX_RECON_FRAMES_EN, **_) -> float:
    """The rouge package's summary-level ROUGE-L F (exclusive mode), 0 where the package raises."""
    hypothesis, references = _sentences(prediction), _sentences(reference)
    if not hypothesis or not references:
        return 0.0
    ref_words = len({w for sentence in references for w in sentence})
    hyp_words = len({w for sentence in hypothesis for w in sentence})
    hyp_sets = [set(sentence) for sentence in hypothesis]
    hyp_positions: list[dict[str, int] | None] = [None] * len(hypothesis)
    union: set[str] = set()
    for sentence in references:
        sentence_set = set(sentence)
        for k, hyp in enumerate(hypothesis):
            common = sentence_set & hyp_sets[k]
            # a path has at most len(x) + len(y) - 1 steps: only long pairs can overflow the stack
            may_overflow = len(sentence) + len(hyp) > max_recon_frames
            if not may_overflow and common <= union:  # nothing this pair could add
                continue
            if hyp_positions[k] is None:
                masks: dict[str, int] = {}
                for position, word in enumerate(hyp):
                    masks[word] = masks.get(word, 0) | (1 << position)
                hyp_positions[k] = masks
            words, steps = _lcs_path(sentence, hyp, hyp_positions[k])
            if steps + 1 > max_recon_frames:  # the package's recursion fails: it scores 0
                return 0.0
            union |= words
    recall = len(union) / ref_words
    precision = len(union) / hyp_words
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def rouge_l_zh(prediction: str, reference: str, **_) -> float:
    """ROUGE-L over jieba words."""
    return rouge_l(
        " ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(reference)), max_recon_frames=ROUGE_MAX_RECON_FRAMES_ZH
    )


def classification(prediction: str, reference: str, all_classes: list[str] | None = None, **_) -> float:
    """1/len(matches) when the reference class is among the classes named in the prediction, else 0."""
    matches = [name for name in all_classes or [] if name in prediction]
    index = 0
    while index < len(matches):  # the reference's remove-while-iterating, step for step
        term = matches[index]
        if term in reference and term != reference:
            matches.remove(term)
        index += 1
    return 1.0 / len(matches) if reference in matches else 0.0


def _share_equal(numbers: list[str], wanted: str) -> float:
    return 0.0 if not numbers else sum(number == wanted for number in numbers) / len(numbers)


def retrieval(prediction: str, reference: str, **_) -> float:
    """Share of the numbers in the prediction equal to the reference's paragraph number."""
    return _share_equal(re.findall(r"\d+", prediction), _paragraph_id(reference, r"Paragraph (\d+)"))


def retrieval_zh(prediction: str, reference: str, **_) -> float:
    return _share_equal(re.findall(r"\d+", prediction), _paragraph_id(reference, r"段落(\d+)"))


def _paragraph_id(reference: str, pattern: str) -> str:
    found = re.findall(pattern, reference)
    if not found:
        raise ValueError(f"retrieval answer {reference!r} names no paragraph (expected {pattern!r})")
    return found[0]


def count(prediction: str, reference: str, **_) -> float:
    """Share of the numbers in the prediction equal to the reference count."""
    return _share_equal(re.findall(r"\d+", prediction), str(reference))


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's fuzz.ratio without python-Levenshtein: round(100 * difflib ratio), 100 if equal."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_similarity(prediction: str, reference: str, **_) -> float:
    """fuzz.ratio / 100 between the reference line and the first predicted line that is not a comment
    or a code fence (no '`', '#' or '//')."""
    first = ""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            first = line
            break
    return fuzz_ratio(first, reference) / 100


METRIC_OF_SUBSET: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1,
    "qasper": qa_f1,
    "multifieldqa_en": qa_f1,
    "multifieldqa_zh": qa_f1_zh,
    "hotpotqa": qa_f1,
    "2wikimqa": qa_f1,
    "musique": qa_f1,
    "dureader": rouge_l_zh,
    "gov_report": rouge_l,
    "qmsum": rouge_l,
    "multi_news": rouge_l,
    "vcsum": rouge_l_zh,
    "trec": classification,
    "triviaqa": qa_f1,
    "samsum": rouge_l,
    "lsht": classification,
    "passage_retrieval_en": retrieval,
    "passage_count": count,
    "passage_retrieval_zh": retrieval_zh,
    "lcc": code_similarity,
    "repobench-p": code_similarity,
}
FIRST_LINE_ONLY = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def score_prediction(subset: str, prediction: str, answers: list[str], all_classes: list[str] | None) -> float:
    """A sample's score as eval.py computes it: first line only for the few-shot subsets, max over answers."""
    if subset in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRIC_OF_SUBSET[subset]
    best = 0.0
    for answer in answers:
        best = max(best, metric(prediction, answer, all_classes=all_classes))
    return best
