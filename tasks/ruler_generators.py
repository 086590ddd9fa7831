"""RULER's sample generators (NVIDIA/RULER scripts/data/synthetic/*.py) and the length fitting that sizes each
sample's haystack to a target token count; tasks/ruler.py turns them into the task (its docstring says where these
differ from RULER and why)."""

from __future__ import annotations

import math
import random
import string
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from nsa_eval.tasks.base import Prompt
from nsa_eval.tasks.ruler_data import (DEPTHS, DOCUMENT_PROMPT, NEEDLE, NOISE, TEMPLATES, NiahArgs, QAData, cwe_words,
                                       split_sentences, wonderwords_list)


@dataclass
class Built:
    """One generated sample: the user text (template filled), RULER's answer prefix, the answers, and where the
    generator put what the answers come from, as (character offset in body, text) pairs."""

    body: str
    prefix: str
    answers: list[str]
    spans: list[tuple[int, str]] = field(default_factory=list)

    def prompt(self, chat: bool) -> Prompt:
        return [{"role": "user", "content": self.body}] if chat else self.body + self.prefix


# ---------------------------------------------------------------------------------------------- random values


def _word(rng: random.Random) -> str:
    return f"{rng.choice(wonderwords_list('adjectivelist.txt'))}-{rng.choice(wonderwords_list('nounlist.txt'))}"


def _random(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return _word(rng)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _join(parts: list[tuple[str, bool]], sep: str, start: int) -> tuple[str, list[tuple[int, str]]]:
    """Join texts with sep; the offsets (from start) of the parts flagged True."""
    spans, offset = [], start
    for text, marked in parts:
        if marked:
            spans.append((offset, text))
        offset += len(text) + len(sep)
    return sep.join(text for text, _ in parts), spans


def _head(template: str, **fields: Any) -> int:
    """Characters of the filled template before its {context}."""
    return len(template.split("{context}", 1)[0].format(**fields))


# ---------------------------------------------------------------------------------------------- generators


def build_niah(n: int, rng: random.Random, args: NiahArgs, essays: list[str] | None) -> Built:
    """niah.py's generate_input_output with n haystack units (lines of noise or needles, or essay words)."""
    num_k = max(args.num_needle_k, args.num_needle_q)
    keys, values, needles = [], [], []
    for _ in range(num_k):
        keys.append(_random(args.type_needle_k, rng))
        value = []
        for _ in range(args.num_needle_v):
            value.append(_random(args.type_needle_v, rng))
            needles.append(NEEDLE.format(type_needle_v=args.type_needle_v, key=keys[-1], value=value[-1]))
        values.append(value)
    rng.shuffle(needles)
    haystack = args.type_haystack if args.type_haystack != "essay" or essays else "noise"
    if haystack == "essay":
        words = essays[:n] if n <= len(essays) else (essays * -(-n // len(essays)))[:n]
        sentences = split_sentences(" ".join(words))
        cuts = [0] + sorted(int(len(sentences) * (depth / 100)) for depth in rng.sample(DEPTHS, len(needles)))
        cuts.append(len(sentences))
        parts: list[tuple[str, bool]] = []
        for i in range(1, len(cuts)):
            parts.append((" ".join(sentences[cuts[i - 1]:cuts[i]]), False))
            if i - 1 < len(needles):
                parts.append((needles[i - 1], True))
        sep = " "
    else:
        if haystack == "noise":
            lines = [(NOISE, False)] * n
        else:
            lines = [(NEEDLE.format(type_needle_v=args.type_needle_v, key=_random(args.type_needle_k, rng),
                                    value=_random(args.type_needle_v, rng)), False) for _ in range(n)]
        for index, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
            lines.insert(index, (needle, True))
        parts, sep = lines, "\n"
    indices = rng.sample(range(num_k), args.num_needle_q)
    queries = [keys[i] for i in indices]
    answers = [a for i in indices for a in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix = TEMPLATES["niah"]["template"], TEMPLATES["niah"]["answer_prefix"]
    type_v = args.type_needle_v
    if args.num_needle_q * args.num_needle_v == 1:
        template, prefix = (_singular(t) for t in (template, prefix))
        type_v = type_v[:-1]
    context, spans = _join(parts, sep, _head(template, type_needle_v=type_v))
    return Built(template.format(type_needle_v=type_v, context=context, query=query),
                 prefix.format(type_needle_v=type_v, query=query), answers, spans)


def _singular(text: str) -> str:
    """niah.py's rewording when one value is asked for (applied to the template and the answer prefix)."""
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text


def _chains(rng: random.Random, num_chains: int, num_hops: int, icl: bool) -> tuple[list[list[str]], list[list[str]]]:
    """variable_tracking.py's generate_chains: names of 5 capitals (3 in the example), value 12345 in the example."""
    k = 3 if icl else 5
    names = ["".join(rng.choices(string.ascii_uppercase, k=k)) for _ in range((num_hops + 1) * num_chains)]
    while len(set(names)) < num_chains * (num_hops + 1):
        names.append("".join(rng.choices(string.ascii_uppercase, k=k)))
    all_names, chains = [], []
    for i in range(0, len(names), num_hops + 1):
        these = names[i:i + num_hops + 1]
        all_names.append(these)
        chain = [f"VAR {these[0]} = {12345 if icl else rng.randint(10000, 99998)}"]
        chain += [f"VAR {these[j + 1]} = VAR {these[j]} " for j in range(num_hops)]
        chains.append(chain)
    return all_names, chains


def build_vt(n: int, rng: random.Random, icl: str | None, num_chains: int = 1, num_hops: int = 4) -> Built:
    """variable_tracking.py's generate_input_output on the noise haystack (n lines), after the in-context example
    (icl, already redrawn by the caller; None while building the example itself)."""
    names, chains = _chains(rng, num_chains, num_hops, icl=icl is None)
    value = chains[0][0].split("=")[-1].strip()
    lines: list[tuple[str, bool]] = [(NOISE, False)] * n
    for chain in chains:
        positions = sorted(rng.sample(range(len(lines)), len(chain)))
        for j, position in enumerate(positions):
            lines.insert(position + j, (chain[j], True))
    template, prefix = TEMPLATES["variable_tracking"]["template"], TEMPLATES["variable_tracking"]["answer_prefix"]
    lead = "" if icl is None else icl + "\n"
    context, spans = _join(lines, "\n", len(lead) + _head(template))
    assert ". \n" not in context  # RULER's context.replace(". \n", ".\n") changes nothing on this haystack
    body = lead + template.format(context=context, query=value, num_v=num_hops + 1)
    return Built(body, prefix.format(num_v=num_hops + 1, query=value), names[0], spans)


def redraw_icl(icl: str, rng: random.Random, num_hops: int = 4) -> str:
    """variable_tracking.py's randomize_icl: the example's answer names and its value 12345 redrawn."""
    for item in icl.strip().split()[-num_hops - 1:]:
        icl = icl.replace(item, "".join(rng.choices(string.ascii_uppercase, k=len(item))))
    return icl.replace("12345", str(rng.randint(10000, 99998)))


def _cwe_pick(rng: random.Random, count: int) -> list[str]:
    words = cwe_words()
    if count <= len(words):
        return rng.sample(words, count)
    picked = rng.sample(words, len(words))  # then adjective-noun pairs (RULER: its randle word list)
    seen = set(picked)
    while len(picked) < count:
        word = _word(rng)
        if word not in seen:
            seen.add(word)
            picked.append(word)
    return picked


def _cwe_example(rng: random.Random, num_words: int, common_repeats: int, uncommon_repeats: int,
                 common_nums: int = 10) -> tuple[list[tuple[str, str]], list[str]]:
    """common_words_extraction.py's get_example: the numbered entries (text, word) and the common words."""
    full = _cwe_pick(rng, num_words)
    common, uncommon = full[:common_nums], full[common_nums:]
    word_list = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(word_list)
    return [(f"{i + 1}. {word}", word) for i, word in enumerate(word_list)], common


def build_cwe(n: int, rng: random.Random, length: int) -> Built:
    """common_words_extraction.py's generate_input_output with n distinct words, after its one example."""
    template, prefix = TEMPLATES["common_words_extraction"]["template"], TEMPLATES["common_words_extraction"]["answer_prefix"]
    if length < 4096:
        shot_entries, shot_answer = _cwe_example(rng, 20, 3, 1)
        entries, common = _cwe_example(rng, n, 6, 1)
    else:
        shot_entries, shot_answer = _cwe_example(rng, 40, 10, 3)
        entries, common = _cwe_example(rng, n, 30, 3)
    shot = (template.format(context=" ".join(e for e, _ in shot_entries)) + prefix + " "
            + " ".join(f"{i + 1}. {word}" for i, word in enumerate(shot_answer)))
    lead = shot + "\n"
    wanted = set(common)
    context, spans = _join([(e, word in wanted) for e, word in entries], " ", len(lead) + _head(template))
    return Built(lead + template.format(context=context), prefix, common, spans)


def fwe_vocabulary(rng: random.Random, length: int, coded_wordlen: int = 6) -> list[str]:
    """freq_words_extraction.py's vocabulary: (length - 50) // 50 random lowercase words, the top one '...'."""
    size = (length - TEMPLATES["freq_words_extraction"]["tokens_to_generate"]) // 50
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=coded_wordlen)) for _ in range(size)]
    while len(set(vocab)) < size:
        vocab.append("".join(rng.choices(string.ascii_lowercase, k=coded_wordlen)))
    vocab = sorted(set(vocab))
    rng.shuffle(vocab)
    vocab[0] = "..."
    return vocab


ZETA_2 = math.pi**2 / 6  # scipy.special.zeta(2.0), the normaliser of RULER's alpha = 2.0


def build_fwe(n: int, rng: random.Random, length: int, alpha: float = 2.0) -> Built:
    """freq_words_extraction.py's gen_text with num_words = n: word k of the vocabulary int(n * k^-alpha / zeta)
    times, shuffled; answer: words 2 to 4."""
    vocab = fwe_vocabulary(rng, length)
    counts = [int(n * (k ** -alpha) / ZETA_2) for k in range(1, len(vocab) + 1)]
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    rng.shuffle(words)
    template, prefix = TEMPLATES["freq_words_extraction"]["template"], TEMPLATES["freq_words_extraction"]["answer_prefix"]
    answers = vocab[1:4]
    wanted = set(answers)
    context, spans = _join([(w, w in wanted) for w in words], " ", _head(template))
    return Built(template.format(context=context), prefix, answers, spans)


def build_qa(n: int, rng: random.Random, data: QAData, index: int) -> Built:
    """qa.py's generate_input_output for question `index` with n documents (its gold ones among them)."""
    question = data.questions[index]
    gold, more = question["context"], question.get("more_context", [])
    if n < len(data.documents):
        if n - len(gold) > len(more):
            if index not in data.others:
                taken = set(gold) | set(more)
                data.others[index] = [i for i in range(len(data.documents)) if i not in taken]
            others = data.others[index]
            chosen = gold + more + rng.sample(others, max(0, n - len(gold) - len(more)))
        else:
            chosen = gold + rng.sample(more, n - len(gold))
    else:
        chosen = (list(range(len(data.documents))) * -(-n // len(data.documents)))[:n]
    rng.shuffle(chosen)
    template, prefix = TEMPLATES["qa"]["template"], TEMPLATES["qa"]["answer_prefix"]
    golden = set(gold)
    parts = [(DOCUMENT_PROMPT.format(i=i + 1, document=data.documents[d]), d in golden) for i, d in enumerate(chosen)]
    context, spans = _join(parts, "\n\n", _head(template))
    return Built(template.format(context=context, query=question["query"]), prefix, list(question["outputs"]), spans)


# ---------------------------------------------------------------------------------------------- length fitting


def fit(build: Callable[[int], Built], measure: Callable[[Built], int], target: int, low: int, *,
        guess: int | None = None, rate: float | None = None, high: int = 10**7) -> tuple[int, Built, int, float]:
    """The largest n (haystack units) whose sample measures at most `target` tokens, found with few measurements
    of whole prompts: from a guess, steps by the token rate per unit (secant, updated from each measurement),
    bisecting when a step leaves the bracket; stops early within 0.4% of the target. Returns (n, sample, tokens,
    tokens per unit). ValueError when even `low` units are too long."""
    cache: dict[int, tuple[int, Built]] = {}

    def at(n: int) -> tuple[int, Built]:
        if n not in cache:
            built = build(n)
            cache[n] = (measure(built), built)
        return cache[n]

    close = max(1, int(0.004 * target))
    if at(low)[0] > target:
        raise ValueError(f"{at(low)[0]} tokens")
    lo, hi = low, high + 1  # lo fits; hi is the smallest n known not to fit
    if rate is None or rate <= 0:
        probe = min(high, low + 16)
        rate = max((at(probe)[0] - at(low)[0]) / max(1, probe - low), 1e-3)
        if at(probe)[0] <= target:
            lo = max(lo, probe)
        else:
            hi = min(hi, probe)
    last = (lo, at(lo)[0])
    step = guess if guess is not None else None
    for _ in range(64):
        if target - at(lo)[0] <= close or hi - lo <= 1:
            break
        n = step if step is not None else lo + round((target - close / 2 - at(lo)[0]) / rate)
        step = None
        if not lo < n < hi:
            n = (lo + hi) // 2 if hi <= high else min(high, max(lo + 1, 2 * lo))
        if not lo < n < hi:
            break
        value = at(n)[0]
        if n != last[0] and value != last[1] and (value - last[1]) / (n - last[0]) > 0:
            rate = (value - last[1]) / (n - last[0])
        last = (n, value)
        if value <= target:
            lo = n
        else:
            hi = n
    tokens, built = at(lo)
    return lo, built, tokens, rate
