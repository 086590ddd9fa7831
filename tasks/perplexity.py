"""Perplexity by position: the token-level negative log-likelihood of long documents, binned by position.

Documents come from `--data perplexity=PATH`: a .txt file (one document), a folder of .txt files (one document
each, in file-name order), or a .jsonl file (also .json, .parquet, .csv) whose rows hold a "text" field (one document
a row; an "id" field, where present, names it). Every token of a document is scored as lm-eval's
loglikelihood_rolling scores it (the backend's `loglikelihood_rolling`): its tokens without special tokens, the first
predicted from a prefix token (BOS, else EOS), in windows of the model's max length (`--max-length`):
- window "disjoint" (the default; lm-eval's): each window after the first predicts the next max-length tokens, with
  only its own tokens as context;
- window "sliding": each window after the first predicts `stride` new tokens after max-length - stride tokens of
  context (default stride: half the max length).
A token's position is its place in the window that predicted it (0: predicted from the prefix token alone; p: after
p + 1 tokens of context), so the tokens of a document that fits one window sit at their own index. Positions are
binned by `bin_width` tokens (1024: 0-1k, 1k-2k, ... up to the max length).

Metrics, lower is better: `perplexity` = exp(NLL summed over every document's tokens / their number), overall and per
position bin (breakdown "position", keyed by a bin's first position; a cell's n counts the documents with tokens in
the bin, `tokens` the tokens); `nll` (nats per token); `word_perplexity`, `byte_perplexity` and `bits_per_byte` as
lm-eval's (words: the document split at whitespace runs, bytes: its UTF-8 bytes). Standard errors by the delta method
with documents as clusters (a ratio of sums over documents); 0 with one document, as the harness's other means.
Per sample (what paired comparisons pair by id): the document's own nll and perplexity. A record's details hold the
document's NLL sum and token count per bin, from which the metrics are aggregated.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from nsa_eval.tasks.base import DataError, Sample, Task, TaskContext, Tokens, token_count
from nsa_eval.tasks.data import SUFFIXES, check_rows, local_rows, utf8_text

WINDOWS = ("disjoint", "sliding")
DATA_HELP = 'a .txt file, a folder of .txt files, or a .jsonl file whose rows hold a "text" field'
METRICS = ("perplexity", "nll", "word_perplexity", "byte_perplexity", "bits_per_byte")


def read_documents(path: str | Path) -> list[tuple[str, str]]:
    """[(document id, text)] from a .txt file, a folder of .txt files, or a file of rows with a "text" field;
    ValueError for a path that is none of them, DataError for an empty document or a bad row."""
    where = Path(path).expanduser()
    if where.is_dir():
        files = sorted(f for f in where.iterdir() if f.is_file() and f.suffix.lower() == ".txt")
        if not files:
            raise ValueError(f"perplexity data {where} holds no .txt files; give {DATA_HELP}")
        documents = [(f.name, utf8_text(f)) for f in files]
    elif not where.is_file():
        raise ValueError(f"perplexity data {where} does not exist; give {DATA_HELP}")
    elif where.suffix.lower() == ".txt":
        documents = [(where.name, utf8_text(where))]
    elif where.suffix.lower() in SUFFIXES:
        source, rows = local_rows(where)
        if not rows:
            raise DataError(f"{source} holds no rows; give at least one document")
        checked = check_rows(source, rows, {"text": str}, text_cells=where.suffix.lower() == ".csv")
        documents, seen = [], set()
        for (number, _), row in zip(rows, checked):
            doc_id = str(row["id"]) if isinstance(row.get("id"), (str, int)) else f"row{number}"
            if doc_id in seen:
                raise DataError(f"{source}: row {number}: id '{doc_id}' is used by an earlier row; give each document "
                                "its own id")
            seen.add(doc_id)
            if not row["text"].strip():
                raise DataError(f"{source}: row {number}: field 'text' is empty; give a document with text")
            documents.append((doc_id, row["text"]))
        return documents
    else:
        raise ValueError(f"perplexity data {where}: unsupported file type '{where.suffix}'; give {DATA_HELP}")
    for doc_id, text in documents:
        if not text.strip():
            raise DataError(f"{where / doc_id if where.is_dir() else where}: the document is empty; give a document "
                            "with text")
    return documents


def bin_label(start: int, width: int) -> str:
    """A position bin as tables print it: 0-1k, 1k-2k (k = 1024), else 0-512, 512-1024."""
    def tokens(n: int) -> str:
        return f"{n // 1024}k" if n and n % 1024 == 0 else str(n)
    return f"{tokens(start)}-{tokens(start + width)}"


def ratio_stderr(numerators: list[float], denominators: list[float]) -> float:
    """The standard error of sum(numerators) / sum(denominators) with each pair a cluster (a document), by the delta
    method; 0 for fewer than two clusters."""
    m = len(numerators)
    if m < 2:
        return 0.0
    ratio = sum(numerators) / sum(denominators)
    spread = sum((a - ratio * b) ** 2 for a, b in zip(numerators, denominators)) / (m - 1)
    return math.sqrt(spread / m) / (sum(denominators) / m)


def _ratio_metrics(nll: list[float], tokens: list[float]) -> dict[str, dict[str, float]]:
    """perplexity and nll of summed NLLs over summed tokens, with their delta-method standard errors."""
    mean = sum(nll) / sum(tokens)
    error = ratio_stderr(nll, tokens)
    return {"perplexity": {"mean": math.exp(mean), "stderr": math.exp(mean) * error},
            "nll": {"mean": mean, "stderr": error}}


class Perplexity(Task):
    """options: data_path (--data perplexity=PATH), bin_width (tokens per position bin), window ("disjoint" |
    "sliding"), stride (sliding: new tokens per window; default half the max length), max_documents."""

    name = "perplexity"
    version = "1"
    headline = "perplexity"
    breakdown_keys = ("position",)
    data_help = DATA_HELP  # what --data perplexity=PATH takes (run_config's line for a missing path)

    def __init__(self, data_path: str | None = None, bin_width: Tokens = 1024, window: str = "disjoint",
                 stride: Tokens | None = None, max_documents: int | None = None):
        if data_path is None:
            raise ValueError(f"perplexity scores your documents: give them with --data perplexity=PATH ({DATA_HELP})")
        self.data_path = str(data_path)
        self.bin_width = token_count(bin_width, "perplexity.bin_width")
        if self.bin_width < 1:
            raise ValueError(f"perplexity.bin_width {bin_width}: give at least 1 token per bin")
        if window not in WINDOWS:
            raise ValueError(f"perplexity.window '{window}': use {' or '.join(WINDOWS)}")
        self.window = window
        if stride is not None and window != "sliding":
            raise ValueError("perplexity.stride applies to perplexity.window=sliding; add that or leave the stride out")
        self.stride = None if stride is None else token_count(stride, "perplexity.stride")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"perplexity.stride {stride}: give at least 1 token")
        if max_documents is not None and max_documents < 1:
            raise ValueError(f"perplexity.max_documents {max_documents}: give at least 1 document")
        self.max_documents = max_documents
        self._documents: list[tuple[str, str]] | None = None

    def prepare(self) -> None:
        """Read and check the documents (the CLI calls this before the model loads)."""
        if self._documents is None:
            self._documents = read_documents(self.data_path)[: self.max_documents]

    def config(self) -> dict[str, Any]:
        self.prepare()
        digest = hashlib.sha256(json.dumps(self._documents, ensure_ascii=False).encode()).hexdigest()
        return {"data": self.data_path, "documents": len(self._documents), "documents_sha256": digest,
                "bin_width": self.bin_width, "window": self.window, "stride": self.stride,
                "max_documents": self.max_documents}

    def check_length(self, max_length: int, cap: int | None = None) -> None:
        """A sliding stride must leave context in the window (--max-length, when given, before the model loads)."""
        if self.stride is not None and self.stride >= max_length:
            raise ValueError(f"perplexity.stride {self.stride} leaves no context in a window of --max-length "
                             f"{max_length}; give a stride below it (or perplexity.window=disjoint)")

    def window_stride(self, max_length: int) -> int | None:
        """New tokens per window after the first: None for disjoint windows; sliding: the stride, or half the window."""
        if self.window == "disjoint":
            return None
        self.check_length(max_length)
        return self.stride or max(1, max_length // 2)

    def samples(self, ctx: TaskContext) -> list[Sample]:
        self.prepare()
        stride = self.window_stride(ctx.max_length)
        documents = self._documents if ctx.limit is None else self._documents[: ctx.limit]
        return [Sample(id=doc_id, prompt=text, target=None, rolling=True, stride=stride) for doc_id, text in documents]

    def _sums(self, sample: Sample, output: list[Any]) -> dict[str, Any]:
        """The document's NLL sum and tokens, words and bytes, and NLL sum and tokens per position bin."""
        bins: dict[int, list[float]] = {}
        for logprob, position in output:
            cell = bins.setdefault(int(position) // self.bin_width * self.bin_width, [0.0, 0])
            cell[0] -= float(logprob)
            cell[1] += 1
        text = sample.prompt
        return {"tokens": len(output), "nll_sum": -sum(float(lp) for lp, _ in output),
                "words": len(re.split(r"\s+", text)), "bytes": len(text.encode("utf-8")),
                "bins": {str(start): bins[start] for start in sorted(bins)}}

    def score(self, sample: Sample, output: list[Any]) -> dict[str, float]:
        if not output:
            raise ValueError(f"perplexity: document {sample.id} has no tokens to score")
        nll = -sum(float(lp) for lp, _ in output) / len(output)
        return {"nll": nll, "perplexity": math.exp(nll)}

    def details(self, sample: Sample, output: list[Any]) -> dict[str, Any]:
        return self._sums(sample, output)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        sums = [r["details"] for r in records]
        if not sums:
            return {"n": 0, "metrics": {}, "breakdowns": {}, "higher_is_better": {m: False for m in METRICS}}
        nll = [s["nll_sum"] for s in sums]
        metrics = _ratio_metrics(nll, [s["tokens"] for s in sums])
        for name, unit in (("word_perplexity", "words"), ("byte_perplexity", "bytes")):
            mean, error = sum(nll) / sum(s[unit] for s in sums), ratio_stderr(nll, [s[unit] for s in sums])
            metrics[name] = {"mean": math.exp(mean), "stderr": math.exp(mean) * error}
        mean, error = sum(nll) / sum(s["bytes"] for s in sums), ratio_stderr(nll, [s["bytes"] for s in sums])
        metrics["bits_per_byte"] = {"mean": mean / math.log(2), "stderr": error / math.log(2)}
        starts = sorted({int(start) for s in sums for start in s["bins"]})
        by_position = {}
        for start in starts:
            cells = [s["bins"][str(start)] for s in sums if str(start) in s["bins"]]
            ratio = _ratio_metrics([c[0] for c in cells], [c[1] for c in cells])
            tokens = sum(c[1] for c in cells)
            by_position[str(start)] = {name: {**value, "n": len(cells), "tokens": tokens}
                                       for name, value in ratio.items()}
        return {"n": len(records), "metrics": metrics, "breakdowns": {"position": by_position},
                "higher_is_better": {m: False for m in METRICS}}
