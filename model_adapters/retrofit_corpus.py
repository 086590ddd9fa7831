"""The retrofit's training text: real long documents this machine already has, tokenized once into a file.

Documents: the Python standard library's sources (every .py under the running interpreter's stdlib folder but
site-packages, in path order, so the files of one package stand together as one long document) and its
documentation topics (pydoc_data.topics, English prose). None of it is a row of any split the harness evaluates.
The file holds the token ids as little-endian uint32 after a JSON header line (tokenizer, Python version, the
number of documents and tokens, and the SHA-256 of the ids), so a retrofit records exactly what it trained on.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = "nsa-eval-corpus-1"


@dataclass(frozen=True)
class Corpus:
    """Token ids [N] (uint32) of documents separated by the tokenizer's EOS, and how they were made."""

    ids: np.ndarray
    header: dict

    @property
    def sha256(self) -> str:
        return self.header["sha256"]


def stdlib_documents() -> list[tuple[str, str]]:
    """(name, text) of every standard-library source file (site-packages excluded) and of pydoc's topics."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "site-packages" in rel.parts or "dist-packages" in rel.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append((f"stdlib/{rel.as_posix()}", f"# {rel.as_posix()}\n{text}"))
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    for name in sorted(topics):
        docs.append((f"pydoc/{name}", topics[name]))
    return docs


def build_corpus(tokenizer, path: str | Path, max_tokens: int | None = None, progress=None) -> Corpus:
    """Tokenize stdlib_documents() into `path` (header line + uint32 ids), EOS after each document; stops after
    max_tokens if given. progress(done_docs, total_docs) is called now and then."""
    docs = stdlib_documents()
    if not docs:
        raise ValueError(f"no standard-library sources under {sysconfig.get_paths()['stdlib']}; give --corpus FILE")
    eos = tokenizer.eos_token_id
    parts, total = [], 0
    for start in range(0, len(docs), 256):
        batch = [text for _, text in docs[start:start + 256]]
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            parts.append(np.asarray(ids + [eos], dtype=np.uint32))
            total += len(ids) + 1
        if progress:
            progress(min(start + 256, len(docs)), len(docs))
        if max_tokens and total >= max_tokens:
            break
    ids = np.concatenate(parts)[:max_tokens] if max_tokens else np.concatenate(parts)
    header = {"format": MAGIC, "source": "python stdlib sources + pydoc topics",
              "python": sys.version.split()[0], "tokenizer": getattr(tokenizer, "name_or_path", "") or "",
              "vocab_size": len(tokenizer), "documents": len(parts), "tokens": int(ids.size),
              "sha256": hashlib.sha256(ids.astype("<u4").tobytes()).hexdigest()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write((json.dumps(header) + "\n").encode())
        f.write(ids.astype("<u4").tobytes())
    partial.replace(path)
    return Corpus(ids, header)


def read_corpus(path: str | Path) -> Corpus:
    """A file written by build_corpus; ValueError (one line) for anything else or a changed body."""
    path = Path(path)
    with open(path, "rb") as f:
        first = f.readline()
        try:
            header = json.loads(first)
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
        if not isinstance(header, dict) or header.get("format") != MAGIC:
            raise ValueError(f"{path} is not a retrofit corpus (made by `nsa-eval retrofit --corpus FILE`)")
        ids = np.frombuffer(f.read(), dtype="<u4")
    if ids.size != header["tokens"] or hashlib.sha256(ids.tobytes()).hexdigest() != header["sha256"]:
        raise ValueError(f"{path}: the token ids do not match their header's count and SHA-256 (a truncated or "
                         "edited file); build it again")
    return Corpus(ids.astype(np.int64), header)
