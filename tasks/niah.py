"""Needle in a haystack: find a random number hidden at a given depth of a long filler text.

A grid of context lengths (in the model's own tokens) x depth percents, `samples_per_cell` samples each.
Every sample hides "The special magic number for {key} is {value}." with a fresh seeded 7-digit value,
at the sentence boundary closest to `depth` percent of the haystack's tokens, and asks for it back. The whole
prompt (chat template included, when the model gets chat messages) lands within 1% of the target length.
Score: 1 when the value appears in the response (digits compared after dropping separators).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Callable

from nsa_eval.tasks.base import Prompt, Sample, Task, TaskContext, Tokens, token_count

KEYS = [
    "Lisbon", "Nairobi", "Oslo", "Quito", "Hanoi", "Tbilisi", "Montevideo", "Reykjavik", "Windhoek",
    "Ulaanbaatar", "Valletta", "Tallinn", "Kathmandu", "Asuncion", "Dakar", "Bratislava", "Canberra", "Lima",
]

_SUBJECTS = [
    "the old harbour", "a quiet village", "the research team", "the city council", "a travelling merchant",
    "the river valley", "an early morning train", "the school library", "a family of farmers", "the mountain pass",
    "the night market", "a young engineer", "the orchestra", "the lighthouse keeper", "a group of students",
    "the local bakery", "the museum curator", "a fishing boat", "the weather station", "the town square",
]
_VERBS = [
    "noticed", "remembered", "described", "planned", "repaired", "visited", "measured", "painted", "studied",
    "celebrated", "ignored", "rebuilt", "questioned", "followed", "recorded", "welcomed", "organised", "crossed",
]
_OBJECTS = [
    "the narrow bridge", "a long letter", "the autumn festival", "an unusual map", "the broken clock",
    "a field of sunflowers", "the northern road", "a box of photographs", "the stone wall", "a new garden",
    "the winter supplies", "an empty warehouse", "the copper roof", "a distant island", "the spring harvest",
]
_TAILS = [
    "before the first snow arrived", "while the wind was rising", "after a long and careful discussion",
    "during the quietest week of the year", "without telling anyone about it", "as the evening light faded",
    "in the middle of a busy afternoon", "just as the rain began", "for reasons nobody fully understood",
    "with more patience than expected", "long after the others had left", "under a clear and cold sky",
]
_REFLECTIONS = [
    "Nobody could say exactly why it mattered so much.", "It became a story told for many years.",
    "Some people found it ordinary, others remarkable.", "The details were written down in a small notebook.",
    "Later, the same thing happened again in a different form.", "It was the kind of day that people forget slowly.",
    "Most of the neighbours agreed it had been worth the effort.", "There was little else to report that season.",
]


def filler_sentences(rng: random.Random):
    """An endless stream of plain English sentences, reproducible from the generator's seed."""
    while True:
        if rng.random() < 0.2:
            yield rng.choice(_REFLECTIONS)
        else:
            subject = rng.choice(_SUBJECTS)
            yield f"{subject[0].upper()}{subject[1:]} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."


def haystack_sentences(haystack_dir: str | Path) -> list[str]:
    """The sentences of every .txt file in a folder, in file-name order."""
    folder = Path(haystack_dir)
    if not folder.is_dir():
        raise ValueError(f"niah.haystack_dir {folder} is not a folder; give a folder of .txt files")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise ValueError(f"niah.haystack_dir {folder} holds no .txt files; give a folder of .txt files")
    text = " ".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s.strip()]
    if len(sentences) < 2:
        raise ValueError(f"niah.haystack_dir {folder}: its text has fewer than two sentences; give a longer text")
    return sentences


class NeedleInAHaystack(Task):
    """options: lengths (target prompt tokens), depths (percent), samples_per_cell, haystack_dir, seed."""

    name = "niah"
    version = "1"
    headline = "accuracy"
    breakdown_keys = ("length", "depth")
    max_new_tokens = 32

    def __init__(
        self,
        lengths: list[Tokens] | tuple[Tokens, ...] = (1024, 2048, 4096),
        depths: list[int] | tuple[int, ...] = (0, 25, 50, 75, 100),
        samples_per_cell: int = 1,
        haystack_dir: str | None = None,
        seed: int = 0,
    ):
        self.lengths = sorted({token_count(n, "niah.lengths") for n in lengths})
        self.depths = sorted({int(d) for d in depths})
        if not self.lengths or self.lengths[0] < 128:
            raise ValueError(f"niah.lengths {lengths}: each length must be at least 128 tokens")
        if not self.depths or self.depths[0] < 0 or self.depths[-1] > 100:
            raise ValueError(f"niah.depths {depths}: depths are percents between 0 and 100")
        if samples_per_cell < 1:
            raise ValueError(f"niah.samples_per_cell {samples_per_cell}: give at least 1 sample per cell")
        self.samples_per_cell = samples_per_cell
        self.haystack_dir = haystack_dir
        self.seed = seed
        self._corpus = haystack_sentences(haystack_dir) if haystack_dir else None

    def config(self) -> dict[str, Any]:
        return {
            "lengths": self.lengths,
            "depths": self.depths,
            "samples_per_cell": self.samples_per_cell,
            "haystack": str(self.haystack_dir) if self.haystack_dir else "generated",
            "seed": self.seed,
            "max_new_tokens": self.max_new_tokens,
        }

    def check_length(self, max_length: int, cap: int | None = None) -> None:
        """The longest length + the generation budget (under the run's --max-new-tokens cap) within max_length, in
        tokens; the CLI calls it before the model loads when --max-length is given."""
        longest = self.lengths[-1]
        generated = self.max_new_tokens if cap is None else min(cap, self.max_new_tokens)
        if longest + generated > max_length:
            raise ValueError(
                f"NIAH length {longest} does not fit --max-length {max_length} (prompt + "
                f"{generated} generated tokens); lower niah.lengths or raise --max-length"
            )

    def samples(self, ctx: TaskContext) -> list[Sample]:
        self.check_length(ctx.max_length, ctx.max_new_tokens)
        samples = []
        for length in self.lengths:
            for depth in self.depths:
                for index in range(self.samples_per_cell):
                    samples.append(self._sample(length, depth, index, ctx))
                    if ctx.limit is not None and len(samples) >= ctx.limit:
                        return samples
        return samples

    def _sample(self, length: int, depth: int, index: int, ctx: TaskContext) -> Sample:
        rng = random.Random(f"{self.seed}-{length}-{depth}-{index}")
        key = rng.choice(KEYS)
        value = str(rng.randrange(1_000_000, 10_000_000))
        needle = f"The special magic number for {key} is {value}."
        question = f"What is the special magic number for {key} mentioned in the provided text?"
        sentences = self._sentences(rng, length)
        prompt, _ = build_prompt(sentences, needle, question, depth, length, ctx.count_tokens, ctx.chat)
        return Sample(
            id=f"len{length}-depth{depth}-{index}",
            prompt=prompt,
            target=value,
            breakdown={"length": length, "depth": depth},
            max_new_tokens=self.max_new_tokens,
        )

    def _sentences(self, rng: random.Random, length: int) -> list[str]:
        """Enough filler sentences to exceed `length` tokens (a sentence is at least ~3 tokens)."""
        needed = length // 3 + 8
        if self._corpus is None:
            stream = filler_sentences(rng)
            return [next(stream) for _ in range(needed)]
        start = rng.randrange(len(self._corpus))
        return [self._corpus[(start + i) % len(self._corpus)] for i in range(needed)]

    def score(self, sample: Sample, output: list[str]) -> dict[str, float]:
        found = [float(_digits(sample.target) in _digits(text)) for text in output]
        return {"accuracy": sum(found) / len(found)}


def _digits(text: str) -> str:
    return re.sub(r"(?<=\d)[,\s](?=\d)", "", text)


def render_prompt(context: str, question: str, chat: bool) -> Prompt:
    instruction = "There is an important piece of information hidden inside the following text. Find it and memorise it."
    body = f"{instruction}\n\n<text>\n{context}\n</text>\n\n{question} Answer with the number only."
    if chat:
        return [{"role": "user", "content": body}]
    return f"{body}\nAnswer: The special magic number is"


def build_prompt(
    sentences: list[str],
    needle: str,
    question: str,
    depth: int,
    length: int,
    count_tokens: Callable[[Prompt], int],
    chat: bool,
) -> tuple[Prompt, int]:
    """The prompt whose token count is within 1% of `length`, and the sentence index where the needle sits.

    Finds how many filler sentences fit (binary search on whole sentences, then word by word into the
    next sentence), then puts the needle at the sentence boundary nearest `depth` percent of the filler's
    tokens.
    """

    def prompt_for(parts: list[str], at: int) -> Prompt:
        return render_prompt(" ".join(parts[:at] + [needle] + parts[at:]), question, chat)

    def size(parts: list[str]) -> int:
        return count_tokens(prompt_for(parts, len(parts)))

    low, high = 0, len(sentences)
    if size(sentences) < length:
        raise ValueError(f"the haystack is too short for a {length}-token prompt; give a longer --haystack")
    while low < high:  # largest number of whole sentences whose prompt fits in `length`
        mid = (low + high + 1) // 2
        if size(sentences[:mid]) <= length:
            low = mid
        else:
            high = mid - 1
    parts = sentences[:low]
    words = sentences[low].split() if low < len(sentences) else []
    tail: list[str] = []
    for word in words:  # fill word by word: the last filler sentence may be cut short (and closed with a ".")
        if size(parts + [_sentence(tail + [word])]) > length:
            break
        tail.append(word)
    if tail:
        parts = parts + [_sentence(tail)]
    at = needle_position(parts, depth, count_tokens)
    return prompt_for(parts, at), at


def _sentence(words: list[str]) -> str:
    text = " ".join(words)
    return text if text.endswith((".", "!", "?")) else text.rstrip(",;:") + "."


def needle_position(parts: list[str], depth: int, count_tokens: Callable[[Prompt], int]) -> int:
    """Index of the sentence boundary whose token offset is nearest `depth` percent of the filler's tokens."""
    if depth <= 0 or not parts:
        return 0
    if depth >= 100:
        return len(parts)
    total = count_tokens(" ".join(parts))
    goal = total * depth / 100
    low, high = 0, len(parts)
    while low < high:  # first boundary at or past the goal
        mid = (low + high) // 2
        if count_tokens(" ".join(parts[:mid])) < goal:
            low = mid + 1
        else:
            high = mid
    if low > 0 and goal - count_tokens(" ".join(parts[: low - 1])) < count_tokens(" ".join(parts[:low])) - goal:
        return low - 1
    return low
