"""RULER: every task's samples with a real tokenizer (SmolLM2's): length within 1% of the target, needles and
answers where the generator says, gold scores 1 and a wrong answer 0, seeded generation; QA on small fixtures in
RULER's SQuAD / HotpotQA file formats written here."""

import json
import random
import re
from collections import Counter

import pytest

from token_count import counter

from nsa_eval.tasks.base import TaskContext
from nsa_eval.tasks.ruler import SYNTHETIC, Ruler, postprocess, string_match_all, string_match_part
from nsa_eval.tasks.ruler_generators import build_niah, fit
from nsa_eval.tasks.ruler_data import DEPTHS, NOISE, SUBTASKS, TEMPLATES, NiahArgs

LENGTHS = (4096, 8192)


def context(tokenizer, chat=False, limit=None, max_length=8192):
    return TaskContext(count_tokens=counter(tokenizer), chat=chat, max_length=max_length, limit=limit)


_FILLER = ("the river", "a small town", "the committee", "an old map", "the archive", "a quiet street", "the harbour")


def _paragraph(rng, title):
    sentences = [f"{rng.choice(_FILLER).capitalize()} near {title} was described in a report number "
                 f"{rng.randint(10, 999)}." for _ in range(rng.randint(2, 7))]
    return " ".join(sentences)


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory):
    """squad.json (SQuAD v2 layout: articles of paragraphs with qas, some unanswerable) and hotpotqa.json (the
    distractor layout: question, answer, ten [title, sentences] paragraphs), made up but shaped as RULER reads them."""
    rng = random.Random(7)
    folder = tmp_path_factory.mktemp("ruler-qa")
    articles = []
    for a in range(40):
        paragraphs = []
        for p in range(8):
            code = f"K{a:02d}{p}{rng.randint(100, 999)}"
            text = _paragraph(rng, f"site {a}-{p}") + f" The code of site {a}-{p} is {code}."
            paragraphs.append({"context": text, "qas": [
                {"question": f"What is the code of site {a}-{p}?", "is_impossible": False,
                 "answers": [{"text": code, "answer_start": text.index(code)}]},
                {"question": f"Who painted site {a}-{p}?", "is_impossible": True, "answers": []}]})
        articles.append({"title": f"article {a}", "paragraphs": paragraphs})
    (folder / "squad.json").write_text(json.dumps({"version": "v2.0", "data": articles}), encoding="utf-8")
    hotpot = []
    for q in range(60):
        titles = [f"Place {q}-{k}" for k in range(10)]
        paragraphs = [[t, [s + " " for s in _paragraph(rng, t).split(". ")]] for t in titles]
        answer = f"Founder{q}"
        paragraphs[3][1].append(f"It was founded by {answer}.")
        hotpot.append({"_id": str(q), "question": f"Who founded Place {q}-3?", "answer": answer, "type": "bridge",
                       "level": "easy", "supporting_facts": [[titles[3], 0]], "context": paragraphs})
    (folder / "hotpotqa.json").write_text(json.dumps(hotpot), encoding="utf-8")
    return folder


ALL_TASKS = [*SYNTHETIC, "qa_1", "qa_2"]
# the two costliest are `slow`; each generator (niah, vt, cwe, fwe, qa) keeps quick cases
TASK_CASES = [pytest.param(t, marks=pytest.mark.slow) if t in ("niah_multikey_3", "qa_2") else t for t in ALL_TASKS]


def check_sample(task, built, tokens, length, count, chat, essays=False):
    """What every generated sample must hold; returns nothing, asserts."""
    base, args = SUBTASKS[task]
    budget = TEMPLATES[base]["tokens_to_generate"]
    prompt = built.prompt(chat)
    assert tokens == count(prompt) + budget
    assert (1 - 0.01) * length <= tokens <= length, (task, length, tokens)
    body = built.body
    assert built.spans, task
    for offset, text in built.spans:  # the generator's positions hold what it says they hold
        assert body[offset:offset + len(text)] == text
    span_texts = [text for _, text in built.spans]
    if base == "niah":
        for answer in built.answers:
            assert any(text.endswith(f" is: {answer}.") for text in span_texts)
            assert body.count(answer) == 1  # the answer appears once: in its needle
        assert len(built.spans) == max(args.num_needle_k, args.num_needle_q) * args.num_needle_v
        assert len(built.answers) == args.num_needle_q * args.num_needle_v
        one = args.num_needle_q * args.num_needle_v == 1
        assert body.startswith("A special magic" if one else "Some special magic")
        assert built.prefix.endswith("mentioned in the provided text " + ("is" if one else "are"))
        haystack = args.type_haystack if args.type_haystack != "essay" or essays else "noise"
        if haystack == "noise":
            assert body.count(NOISE) > 10
    elif base == "variable_tracking":
        names = built.answers
        assert len(names) == 5 and span_texts[0] == f"VAR {names[0]} = {built.prefix.split('value ')[1].split(',')[0]}"
        assert span_texts[1:] == [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(4)]
        assert [o for o, _ in built.spans] == sorted(o for o, _ in built.spans)
        # the in-context example (its own template, answer prefix and 5 names) comes first
        assert body.count("Memorize and track") == 2 and built.spans[0][0] > body.rindex("Memorize and track")
        example = body[:body.rindex("Memorize and track")]
        assert re.search(r"they are: ( [A-Z]{3}){5}\n\n$", example) and "12345" not in example
    elif base == "common_words_extraction":
        main = body.rsplit("Below is a numbered list of words.", 1)[1]
        words = Counter(re.findall(r"\d+\. (\S+)", main.split("\nQuestion:")[0]))
        assert {w: words[w] for w in built.answers} == {w: 30 for w in built.answers}
        assert set(words.values()) == {30, 3}
        assert len(built.spans) == 300 and {t.split(". ")[1] for t in span_texts} == set(built.answers)
    elif base == "freq_words_extraction":
        coded = Counter(body.split("coded words. ", 1)[1].split("\nQuestion:")[0].split(" "))
        top = [w for w, _ in coded.most_common(4)]
        assert top[0] == "..." and top[1:] == built.answers
        assert Counter(span_texts) == {w: coded[w] for w in built.answers}
    else:  # QA: the gold documents are where the generator says, with the answer in them
        assert all(text.startswith("Document ") for text in span_texts)
        assert any(answer in text for text in span_texts for answer in built.answers)
        assert body.endswith("Question: " + body.rsplit("Question: ", 1)[1])


@pytest.mark.parametrize("task", TASK_CASES)
def test_each_task_at_each_length(tokenizer, qa_dir, task):
    count = counter(tokenizer)
    ruler = Ruler(lengths=LENGTHS, tasks=[task], data_path=str(qa_dir), seed=3)
    ctx = context(tokenizer)
    for length in LENGTHS:
        hint = {}
        for index in range(2):
            built, tokens = ruler.generate(task, length, index, ctx, hint)
            check_sample(task, built, tokens, length, count, chat=False)
            metric = string_match_part if task.startswith("qa_") else string_match_all
            assert metric(" ".join(built.answers), built.answers) == 1.0
    samples = ruler.samples(context(tokenizer, limit=1))
    assert [s.id for s in samples] == [f"{task}/{n}/0" for n in LENGTHS]
    for sample in samples:
        assert sample.breakdown == {"task": task, "length": sample.breakdown["length"]}
        assert sample.max_new_tokens == TEMPLATES[SUBTASKS[task][0]]["tokens_to_generate"]
        assert sample.prompt.endswith(ruler.generate(task, sample.breakdown["length"], 0, ctx)[0].prefix)
        gold = " " + ", ".join(sample.target) + "."
        assert ruler.score(sample, [gold]) == {"score": 1.0}
        assert ruler.score(sample, ["\x00 " + gold.upper() + "\n"]) == {"score": 1.0}  # case and control characters
        assert ruler.score(sample, ["I could not find it."]) == {"score": 0.0}
        wrong = re.sub(r"[0-9]", lambda m: str((int(m.group()) + 1) % 10), gold.swapcase().translate(
            str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", "BCDEFGHIJKLMNOPQRSTUVWXYZAbcdefghijklmnopqrstuvwxyza")))
        assert ruler.score(sample, [wrong]) == {"score": 0.0}
        details = ruler.details(sample, [gold])
        assert details["length_tokens"] == counter(tokenizer)(sample.prompt) + sample.max_new_tokens


def test_chat_prompts_are_the_template_as_the_user_message(tokenizer):
    count = counter(tokenizer)
    ruler = Ruler(lengths=[4096], tasks=["niah_multiquery", "vt", "cwe", "fwe"], seed=1)
    ctx = context(tokenizer, chat=True)
    for task in ruler.tasks:
        built, tokens = ruler.generate(task, 4096, 0, ctx)
        check_sample(task, built, tokens, 4096, count, chat=True)
    sample = ruler.samples(context(tokenizer, chat=True, limit=1))[0]
    assert sample.prompt == [{"role": "user", "content": sample.prompt[0]["content"]}]
    assert sample.prompt[0]["content"].endswith("mentioned in the provided text?")


@pytest.mark.slow
def test_generation_is_identical_for_the_same_seed(tokenizer, qa_dir):
    ctx = context(tokenizer, limit=2)
    first = Ruler(lengths=[4096], data_path=str(qa_dir), seed=11).samples(ctx)
    again = Ruler(lengths=[4096], data_path=str(qa_dir), seed=11).samples(ctx)
    other = Ruler(lengths=[4096], data_path=str(qa_dir), seed=12).samples(ctx)
    assert len(first) == 13 * 2 and {s.breakdown["task"] for s in first} == set(SUBTASKS)
    assert [(s.id, s.prompt, s.target) for s in first] == [(s.id, s.prompt, s.target) for s in again]
    assert all(a.prompt != b.prompt for a, b in zip(first, other))
    assert first[0].prompt != first[1].prompt  # samples of one cell differ


def test_essays_haystack_puts_needles_at_sentence_boundaries(tokenizer, tmp_path):
    rng = random.Random(0)
    essays = tmp_path / "essays"
    essays.mkdir()
    for k in range(3):
        (essays / f"essay{k}.txt").write_text(
            "\n\n".join(_paragraph(rng, f"essay {k} part {p}") for p in range(300)), encoding="utf-8")
    ruler = Ruler(lengths=[4096], tasks=["niah_multikey_1", "niah_single_1"], essays=str(essays))
    assert ruler.config()["haystack"] == f"essays: {essays}"
    count = counter(tokenizer)
    built, tokens = ruler.generate("niah_multikey_1", 4096, 0, context(tokenizer))
    check_sample("niah_multikey_1", built, tokens, 4096, count, chat=False, essays=True)
    assert NOISE not in built.body and "essay 0 part 0" in built.body
    for offset, needle in built.spans:  # a needle starts the text or follows a sentence's end
        before = built.body[:offset]
        assert before.endswith("\n") or before.endswith(". ") or before.endswith(".  "), before[-30:]
    noise, _ = ruler.generate("niah_single_1", 4096, 0, context(tokenizer))
    assert NOISE in noise.body  # niah_single_1's haystack is RULER's noise whatever the essays
    assert "noise" in Ruler().config()["haystack"]


def test_niah_generator_follows_ruler_on_small_haystacks():
    args = NiahArgs("noise", "words", "numbers", num_needle_k=4, num_needle_q=2)
    built = build_niah(30, random.Random(0), args, None)
    lines = built.body.split("\n")
    assert lines.count(NOISE) == 30 and len(built.spans) == 4
    query = built.body.split("special magic numbers for ")[-1].split(" mentioned")[0]
    assert re.fullmatch(r"[\w-]+, and [\w-]+", query)
    assert len(built.answers) == 2 and built.prefix == f" The special magic numbers for {query} mentioned in the provided text are"
    assert DEPTHS[:4] == [0, 3, 5, 8] and DEPTHS[-1] == 100 and len(set(DEPTHS)) == 40


def test_metrics_are_rulers():
    assert postprocess("  \x01The answer\tis 5\n ") == "The answer\nis 5"
    assert string_match_all("alpha and BETA", ["alpha", "beta", "gamma", "delta"]) == 0.5
    assert string_match_part("It is Paris", ["paris", "Lyon"]) == 1.0
    assert string_match_part("It is Rome", ["paris", "Lyon"]) == 0.0


def test_fit_finds_the_largest_fitting_size_with_few_measurements():
    measured = []

    def measure(n):
        measured.append(n)
        return 100 + 23 * n + (n % 3)

    n, built, tokens, rate = fit(lambda n: n, measure, 40000, 1)
    assert measure(n) <= 40000 and (measure(n + 1) > 40000 or 40000 - tokens <= 160)
    assert len(set(measured)) <= 8 and rate == pytest.approx(23, rel=0.1)
    with pytest.raises(ValueError):
        fit(lambda n: n, measure, 50, 1)


def test_aggregate_breaks_down_by_task_and_length():
    ruler = Ruler()
    records = [{"scores": {"score": s}, "breakdown": {"task": t, "length": n}} for t, n, s in
               [("vt", 4096, 1.0), ("vt", 4096, 0.0), ("vt", 8192, 0.0), ("cwe", 4096, 0.5), ("cwe", 8192, 1.0)]]
    result = ruler.aggregate(records)
    assert result["metrics"]["score"]["mean"] == pytest.approx(2.5 / 5)
    assert result["metrics"]["ruler_avg"]["mean"] == pytest.approx((0.5 + 0.0 + 0.5 + 1.0) / 4)
    assert result["breakdowns"]["task x length"]["vt|4096"]["score"] == {"mean": 0.5, "stderr": 0.5, "n": 2}
    assert set(result["breakdowns"]["length"]) == {"4096", "8192"}


def test_bad_options_are_one_line_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="RULER task 'niah_single_9' is unknown; RULER's tasks: niah_single_1"):
        Ruler(tasks="niah_single_9")
    with pytest.raises(ValueError, match="RULER qa_1 needs squad.json"):
        Ruler(tasks=["qa_1"])
    with pytest.raises(ValueError, match="at least 1024 tokens"):
        Ruler(lengths=[512])
    with pytest.raises(ValueError, match="not a whole number of tokens"):
        Ruler(lengths=["4kb"])
    assert Ruler(lengths="8k").lengths == [8192]
    with pytest.raises(ValueError, match="does not fit --max-length 4096"):
        Ruler(lengths=[8192]).samples(context(tokenizer, max_length=4096))
    with pytest.raises(ValueError, match="is not a folder"):
        Ruler(data_path=str(tmp_path / "missing"))
    assert Ruler().tasks == list(SYNTHETIC) and len(SYNTHETIC) == 11
    default = Ruler(tasks=["vt"], samples=1)
    assert [s.breakdown["length"] for s in default.samples(context(tokenizer, max_length=8192))] == [4096, 8192]
    assert default.config()["lengths"] == [4096, 8192]
