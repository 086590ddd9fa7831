"""LongBench task on small fixtures in the real row schema (fixtures/longbench_rows.jsonl, one or two rows per
subset): reference prompts, middle truncation, chat-template exceptions, scoring, buckets and averages.

Token counts come from whitespace words or characters (stand-ins for a model tokenizer, which these
tests do not load); the truncation only ever sees counts, so any counter exercises the same code.
"""

import json
from pathlib import Path

import pytest

from nsa_eval.tasks.base import DataError, TaskContext
from nsa_eval.tasks.longbench import (
    LONGBENCH_E_SUBSETS,
    MAX_NEW_TOKENS,
    SUBSETS,
    LongBench,
    parse_subsets,
    truncate_text_middle,
)

FIXTURE = Path(__file__).parent / "fixtures" / "longbench_rows.jsonl"


def words(prompt):
    text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt) + " <chat> <template>"
    return len(text.split())


def context(chat=False, max_length=100_000, limit=None, count_tokens=words):
    return TaskContext(count_tokens=count_tokens, chat=chat, max_length=max_length, limit=limit)


@pytest.fixture
def rows():
    return [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def folder(tmp_path, rows):
    """The layout of LongBench's data.zip: one {subset}.jsonl per subset."""
    for row in rows:
        with (tmp_path / f"{row['dataset']}.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(tmp_path)


def test_prompt_is_the_reference_template_filled_with_the_row(folder):
    task = LongBench(data_path=folder, subsets="qasper")
    first = task.samples(context())[0]
    assert first.prompt == (
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
        "article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
        "\"unanswerable\". Do not provide any explanation.\n\n"
        "Article: We train a sparse attention model on 270B tokens. The compression block length is 32 and the "
        "selection block length is 64. Results are reported on LongBench and on AIME.\n\n"
        " Answer the question based on the above article as concisely as you can, using a single phrase or sentence "
        "if possible. If the question cannot be answered based on the information in the article, write "
        "\"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not "
        "provide any explanation.\n\n"
        "Question: What is the selection block length?\n\nAnswer:"
    )
    assert first.max_new_tokens == 128 and first.temperature == 0
    assert first.breakdown == {"subset": "qasper", "length": "0-4k"}
    assert first.target == {"answers": ["64", "The selection block length is 64"], "all_classes": None}


def test_every_subset_loads_with_its_budget_and_chat_only_where_the_reference_uses_it(folder):
    samples = LongBench(data_path=folder).samples(context(chat=True))
    assert [s.breakdown["subset"] for s in samples][:3] == ["narrativeqa", "qasper", "qasper"]
    assert {s.breakdown["subset"] for s in samples} == set(SUBSETS)
    for sample in samples:
        subset = sample.breakdown["subset"]
        assert sample.max_new_tokens == MAX_NEW_TOKENS[subset]
        plain = subset in {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
        assert isinstance(sample.prompt, str) == plain, subset
    buckets = {s.id.split("/")[0]: s.breakdown["length"] for s in samples}
    assert (buckets["lcc"], buckets["multifieldqa_en"], buckets["musique"]) == ("0-4k", "4-8k", "8k+")


def test_gold_answer_scores_one_and_a_wrong_answer_zero_on_every_subset(folder):
    task = LongBench(data_path=folder)
    for sample in task.samples(context()):
        gold = sample.target["answers"][0]
        # ROUGE-L's F carries the reference's +1e-8 in its denominator
        assert task.score(sample, [gold])["score"] == pytest.approx(1.0, abs=1e-7), sample.id
        assert task.score(sample, ["0"]) == {"score": 0.0}, sample.id


def test_long_prompts_lose_their_middle_to_fit_the_budget(folder):
    task = LongBench(data_path=folder, subsets="qasper")
    full = task.samples(context())[0].prompt
    cut = task.samples(context(max_length=60 + MAX_NEW_TOKENS["qasper"]))[0]  # room for 60 prompt words
    assert words(cut.prompt) <= 60 < words(full)
    assert cut.prompt.startswith(" ".join(full.split(" ")[:10]))  # the instruction at the start stays
    assert cut.prompt.endswith("Question: What is the selection block length?\n\nAnswer:")  # and the question
    assert "270B" not in cut.prompt  # the middle went
    assert task.details(cut, ["x"]) == {"prompt_cut_in_middle": True}


def test_truncation_keeps_the_longest_prefix_and_suffix_within_half_the_budget():
    text = "".join(chr(ord("a") + i % 26) for i in range(10_000))
    assert truncate_text_middle(text, 1000, len) == (text[:500] + text[-500:], True)  # a token per character
    sentence = " ".join(f"w{i}" for i in range(5000))
    kept, cut = truncate_text_middle(sentence, 301, lambda t: len(t.split()))  # 150 words from each end
    head = " ".join(f"w{i}" for i in range(150)) + " "
    tail = " " + " ".join(f"w{i}" for i in range(4850, 5000))
    assert cut and kept == head + tail
    assert truncate_text_middle("short text", 10, lambda t: len(t.split())) == ("short text", False)


def test_one_file_with_several_subsets_gives_the_same_samples_as_a_folder(folder):
    from_folder = LongBench(data_path=folder, subsets="table2").samples(context())
    from_file = LongBench(data_path=str(FIXTURE), subsets="table2").samples(context())
    assert [(s.id, s.prompt) for s in from_file] == [(s.id, s.prompt) for s in from_folder]
    assert len({s.breakdown["subset"] for s in from_file}) == 10


def test_longbench_e_reads_the_e_files(tmp_path, rows):
    for row in rows:
        if row["dataset"] in LONGBENCH_E_SUBSETS:
            row = dict(row, dataset=f"{row['dataset']}_e")
            with (tmp_path / f"{row['dataset']}.jsonl").open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    samples = LongBench(data_path=str(tmp_path), longbench_e=True).samples(context())
    assert {s.breakdown["subset"] for s in samples} == set(LONGBENCH_E_SUBSETS)
    with pytest.raises(ValueError, match="'dureader' is not a LongBench-E subset"):
        LongBench(subsets="dureader", longbench_e=True)


def test_subset_names_and_groups():
    assert parse_subsets("table2", False) == [
        "multifieldqa_en", "multifieldqa_zh", "qasper", "hotpotqa", "2wikimqa", "gov_report", "dureader",
        "passage_retrieval_en", "passage_retrieval_zh", "lcc",
    ]
    assert parse_subsets("lcc, qasper,lcc", False) == ["lcc", "qasper"]
    assert parse_subsets(None, False) == list(SUBSETS) and len(SUBSETS) == 21
    with pytest.raises(ValueError, match="'hotpot' is not a LongBench subset. Did you mean 'hotpotqa'"):
        parse_subsets("hotpot", False)


def test_aggregate_averages_over_subsets_and_the_table2_group():
    task = LongBench()
    records = [
        {"scores": {"score": s}, "breakdown": {"subset": subset, "length": bucket}}
        for subset, s, bucket in [("qasper", 1.0, "0-4k"), ("qasper", 0.0, "8k+"), ("lcc", 0.5, "0-4k"), ("trec", 0.2, "4-8k")]
    ]
    result = task.aggregate(records)
    assert result["metrics"]["score"]["mean"] == pytest.approx(1.7 / 4)
    assert result["metrics"]["subset_average"]["mean"] == pytest.approx((0.5 + 0.5 + 0.2) / 3)
    assert result["metrics"]["table2_average"]["mean"] == pytest.approx((0.5 + 0.5) / 2)
    assert result["metrics"]["table2_average"]["n"] == 2
    assert result["breakdowns"]["length"]["0-4k"]["score"]["mean"] == pytest.approx(0.75)
    assert result["breakdowns"]["subset x length"]["qasper|8k+"]["score"]["mean"] == 0.0


def test_malformed_rows_and_impossible_budgets(tmp_path, rows):
    bad = dict(rows[0])
    del bad["answers"]
    (tmp_path / "narrativeqa.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"narrativeqa\.jsonl: row 2: field 'answers' is missing"):
        LongBench(data_path=str(tmp_path), subsets="narrativeqa").samples(context())
    wrong_type = dict(rows[0], length="2900")
    (tmp_path / "narrativeqa.jsonl").write_text(json.dumps(wrong_type) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 1: field 'length' should be an integer, got str"):
        LongBench(data_path=str(tmp_path), subsets="narrativeqa").samples(context())
    with pytest.raises(ValueError, match="generates up to 512 tokens, which leaves no room"):
        LongBench(data_path=str(FIXTURE), subsets="gov_report").samples(context(max_length=512))
    with pytest.raises(DataError, match=r"holds none of the 1 subsets asked for \(qasper\)"):
        LongBench(data_path=str(tmp_path), subsets="qasper").samples(context())


def test_data_missing_asked_subsets_is_an_error_naming_those_present(tmp_path, rows):
    """A file or folder holding 1 of the 21 subsets with subsets=all must not average over n=1 without a word."""
    one_subset = tmp_path / "qasper-only.jsonl"
    one_subset.write_text("".join(json.dumps(r) + "\n" for r in rows if r["dataset"] == "qasper"), encoding="utf-8")
    for source in (one_subset, tmp_path):
        if source == tmp_path:
            (tmp_path / "qasper.jsonl").write_text(one_subset.read_text(encoding="utf-8"), encoding="utf-8")
        task = LongBench(data_path=str(source), subsets="all")
        with pytest.raises(DataError) as caught:
            task.prepare()
        message = str(caught.value)
        assert "holds 1 of the 21 subsets asked for" in message and "missing: narrativeqa" in message
        assert "--task-option longbench.subsets=qasper" in message
        assert len(LongBench(data_path=str(source), subsets="qasper").samples(context())) == 2


def test_the_hub_path_reads_the_subset_file_inside_data_zip(tmp_path, rows, monkeypatch):
    """LongBench's hub copy is a data.zip of {subset}.jsonl (its loading script no longer runs under
    `datasets` >= 4); the same zip, made locally, stands in for the hub one here."""
    import zipfile

    import datasets

    with zipfile.ZipFile(tmp_path / "data.zip", "w") as archive:
        archive.writestr("data/qasper.jsonl", "".join(json.dumps(r) + "\n" for r in rows if r["dataset"] == "qasper"))
    monkeypatch.setattr("nsa_eval.tasks.longbench.HUB_FILE", f"zip://data/{{name}}.jsonl::{tmp_path / 'data.zip'}")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # a local zip needs no network either way
    samples = LongBench(subsets="qasper").samples(context())
    assert [s.target["answers"][0] for s in samples] == ["64", "32"]


def test_table2_group_is_the_papers(shared_data):
    from nsa_eval.tasks.longbench import TABLE2_SUBSETS

    paper = json.loads((shared_data.parent / "reference" / "nsa_paper.json").read_text(encoding="utf-8"))
    assert TABLE2_SUBSETS == paper["table2_longbench"]["subsets"]
