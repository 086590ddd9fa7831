"""RULER's constants and data readers (NVIDIA/RULER, scripts/data/synthetic/constants.py, scripts/synthetic.yaml,
scripts/data/synthetic/*.py), kept apart from the generators in ruler.py.

The templates, answer prefixes, generation budgets, needle sentence and noise haystack are RULER's own text,
character for character (they must be, for scores to compare with RULER's); the task table is RULER's
synthetic.yaml. The word lists are the `wonderwords` package's, as RULER's generators load them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from nsa_eval.tasks.base import DataError

# scripts/data/synthetic/constants.py: the task template, the answer prefix (appended after the model's chat
# template, so the model continues it), and the tokens to generate, which count toward a sample's length
TEMPLATES: dict[str, dict[str, Any]] = {
    "niah": {
        "tokens_to_generate": 128,
        "template": "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided text?",
        "answer_prefix": " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    },
    "variable_tracking": {
        "tokens_to_generate": 30,
        "template": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",
        "answer_prefix": " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the value {query}, they are: ",
    },
    "common_words_extraction": {
        "tokens_to_generate": 120,
        "template": "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
        "answer_prefix": " Answer: The top 10 words that appear most often in the list are:",
    },
    "freq_words_extraction": {
        "tokens_to_generate": 50,
        "template": "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?",
        "answer_prefix": " Answer: According to the coded text above, the three most frequently appeared words are:",
    },
    "qa": {
        "tokens_to_generate": 32,
        "template": "Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
        "answer_prefix": " Answer:",
    },
}

# scripts/data/synthetic/niah.py and variable_tracking.py
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DOCUMENT_PROMPT = "Document {i}:\n{document}"
# np.round(np.linspace(0, 100, num=40)).astype(int): no value sits on a .5, so Python's round gives the same
DEPTHS = [round(i * 100 / 39) for i in range(40)]


@dataclass(frozen=True)
class NiahArgs:
    type_haystack: str  # "noise", "essay" or "needle"
    type_needle_k: str  # "words", "numbers" or "uuids"
    type_needle_v: str
    num_needle_k: int = 1
    num_needle_v: int = 1
    num_needle_q: int = 1


# scripts/synthetic.yaml: RULER's 13 tasks -> (base task, its arguments), in RULER's order
SUBTASKS: dict[str, tuple[str, Any]] = {
    "niah_single_1": ("niah", NiahArgs("noise", "words", "numbers")),
    "niah_single_2": ("niah", NiahArgs("essay", "words", "numbers")),
    "niah_single_3": ("niah", NiahArgs("essay", "words", "uuids")),
    "niah_multikey_1": ("niah", NiahArgs("essay", "words", "numbers", num_needle_k=4)),
    "niah_multikey_2": ("niah", NiahArgs("needle", "words", "numbers")),
    "niah_multikey_3": ("niah", NiahArgs("needle", "uuids", "uuids")),
    "niah_multivalue": ("niah", NiahArgs("essay", "words", "numbers", num_needle_v=4)),
    "niah_multiquery": ("niah", NiahArgs("essay", "words", "numbers", num_needle_q=4)),
    "vt": ("variable_tracking", {"num_chains": 1, "num_hops": 4}),
    "cwe": ("common_words_extraction", {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}),
    "fwe": ("freq_words_extraction", {"alpha": 2.0}),
    "qa_1": ("qa", {"dataset": "squad"}),
    "qa_2": ("qa", {"dataset": "hotpotqa"}),
}
QA_FILES = {"squad": "squad.json", "hotpotqa": "hotpotqa.json"}  # the names RULER's download script saves


@lru_cache(maxsize=None)
def wonderwords_list(name: str) -> tuple[str, ...]:
    """A word list of the `wonderwords` package ("nounlist.txt", "adjectivelist.txt", "verblist.txt")."""
    text = resources.files("wonderwords.assets").joinpath(name).read_text(encoding="utf-8")
    return tuple(line.rstrip() for line in text.splitlines() if line.strip())


@lru_cache(maxsize=1)
def cwe_words() -> tuple[str, ...]:
    """common_words_extraction.py's vocabulary: sorted(set(nouns + adjectives + verbs))."""
    return tuple(sorted(set(wonderwords_list("nounlist.txt") + wonderwords_list("adjectivelist.txt")
                            + wonderwords_list("verblist.txt"))))


def essay_words(path: str | Path) -> list[str]:
    """The essays haystack as RULER splits it: the text with whitespace runs made one space, split on spaces.

    path: a folder of .txt files (read in name order and concatenated, as RULER's download script builds
    PaulGrahamEssays.json) or a JSON file {"text": ...} (RULER's PaulGrahamEssays.json itself).
    """
    source = Path(path)
    if source.is_dir():
        files = sorted(source.glob("*.txt"))
        if not files:
            raise ValueError(f"RULER essays folder {source} holds no .txt files")
        text = "".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    elif source.is_file():
        try:
            text = json.loads(source.read_text(encoding="utf-8"))["text"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise DataError(f"{source}: not RULER's essays JSON (an object with a 'text' string)") from None
        if not isinstance(text, str):
            raise DataError(f"{source}: 'text' is not a string")
    else:
        raise ValueError(f"RULER essays {source} does not exist; give a folder of .txt essays or PaulGrahamEssays.json")
    words = [w for w in re.sub(r"\s+", " ", text).strip().split(" ") if w]
    if len(words) < 100:
        raise ValueError(f"RULER essays {source} hold {len(words)} words; give at least a few essays")
    return words


def split_sentences(text: str) -> list[str]:
    """Sentences of a text: a split after '.', '!' or '?' followed by whitespace (RULER uses nltk's punkt, whose
    model is a download; see ruler.py)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


@dataclass
class QAData:
    """qa.py's reading of a QA set: questions with their answers and gold document indices, and every document."""

    questions: list[dict[str, Any]]  # {"query", "outputs": [answers], "context": [doc index], "more_context": [...]}
    documents: list[str]
    others: dict[int, list[int]] = field(default_factory=dict)  # question -> documents outside its own (cache)


def read_squad(path: Path) -> QAData:
    """SQuAD v2 (dev-v2.0.json, saved by RULER as squad.json), as qa.py's read_squad: answerable questions, the
    paragraph as gold document, the article's other paragraphs as `more_context`."""
    data = _json(path)
    try:
        documents = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        index = {c: i for i, c in enumerate(documents)}
        questions = []
        for article in data["data"]:
            more = [index[p["context"]] for p in article["paragraphs"]]
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    if not qa.get("is_impossible", False):
                        questions.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                          "context": [index[paragraph["context"]]],
                                          "more_context": [i for i in more if i != index[paragraph["context"]]]})
    except (KeyError, TypeError) as error:
        raise DataError(f"{path}: not SQuAD v2 JSON (missing {error}); RULER's qa_1 reads dev-v2.0.json") from None
    if not questions:
        raise DataError(f"{path}: no answerable question")
    return QAData(questions, documents)


def read_hotpotqa(path: Path) -> QAData:
    """HotpotQA dev (distractor setting, saved by RULER as hotpotqa.json), as qa.py's read_hotpotqa: every
    paragraph "title\\nsentences" is a document; a question's ten paragraphs are its gold documents."""
    data = _json(path)
    try:
        documents = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
        index = {c: i for i, c in enumerate(documents)}
        questions = [{"query": d["question"], "outputs": [d["answer"]],
                      "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in data]
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"{path}: not HotpotQA JSON ({error}); RULER's qa_2 reads hotpot_dev_distractor_v1.json") from None
    if not questions:
        raise DataError(f"{path}: no question")
    return QAData(questions, documents)


def _json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None


def read_qa(dataset: str, path: Path) -> QAData:
    return read_squad(path) if dataset == "squad" else read_hotpotqa(path)
