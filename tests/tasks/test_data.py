"""Loading benchmark rows: every local format, folders, and one clear DataError line for a malformed row."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nsa_eval.tasks.base import DataError
from nsa_eval.tasks.data import load_rows

SCHEMA = {"question": str, "choices": list[str], "answer": int, "note": (str, None)}
ROWS = [
    {"question": "2+2?", "choices": ["3", "4"], "answer": 1, "note": None},
    {"question": "Capital of France?", "choices": ["Paris", "Rome"], "answer": 0, "note": "geo"},
]


def load(path, **kwargs):
    return load_rows(str(path), task="demo", hub_id="org/demo", hub_config=None, split="test", schema=SCHEMA, **kwargs)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_every_local_format_reads_the_same_rows(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "a.json").write_text(json.dumps(ROWS), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    (tmp_path / "a.csv").write_text(
        'question,choices,answer,note\n2+2?,"[""3"", ""4""]",1,\nCapital of France?,"[""Paris"", ""Rome""]",0,geo\n',
        encoding="utf-8",
    )
    for suffix in ("jsonl", "json", "parquet", "csv"):
        assert load(tmp_path / f"a.{suffix}") == ROWS, suffix


def test_a_folder_gives_the_file_named_after_the_split(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", ROWS[:1])
    write_jsonl(tmp_path / "dev.jsonl", ROWS[1:])
    assert load(tmp_path) == ROWS[:1]
    assert load_rows(str(tmp_path), task="demo", hub_id="org/demo", hub_config=None, split="dev", schema=SCHEMA) == ROWS[1:]
    with pytest.raises(ValueError, match=r"holds no other\{\.jsonl"):
        load(tmp_path, name="other")


def test_aliases_fill_a_field_from_another_name(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "choices": [], "answer": 0, "remark": "x"}])
    rows = load(path, aliases={"note": ("remark",)})
    assert rows[0]["note"] == "x"


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"choices": ["a"], "answer": 0, "note": None}, "row 2: field 'question' is missing"),
        ({"question": "q", "choices": ["a"], "answer": "0", "note": None}, "row 2: field 'answer' should be an integer, got str '0'"),
        ({"question": "q", "choices": ["a"], "answer": True, "note": None}, "row 2: field 'answer' should be an integer, got bool"),
        ({"question": "q", "choices": "a", "answer": 0, "note": None}, "row 2: field 'choices' should be a list of a string"),
        ({"question": "q", "choices": ["a", 3], "answer": 0, "note": None}, "row 2: field 'choices' should be a list"),
        ({"question": "q", "choices": [], "answer": 0, "note": 5}, "row 2: field 'note' should be a string or null"),
        (["not", "an", "object"], "row 2: expected an object with fields, got list"),
    ],
)
def test_a_malformed_row_names_the_file_the_row_and_the_field(tmp_path, bad_row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], bad_row])
    with pytest.raises(DataError) as caught:
        load(path)
    text = str(caught.value)
    assert text.startswith(str(path)) and message in text
    assert "\n" not in text


def test_bad_json_line_and_row_numbers_count_lines(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl: row 3: not valid JSON"):
        load(path)


def test_missing_path_and_unknown_suffix_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "nope.jsonl")
    (tmp_path / "rows.txt").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported data file type '.txt'"):
        load(tmp_path / "rows.txt")
    (tmp_path / "obj.json").write_text('{"rows": []}', encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON array"):
        load(tmp_path / "obj.json")


def test_unreachable_hub_says_which_dataset_and_how_to_give_a_local_copy(monkeypatch):
    import datasets
    import huggingface_hub

    # offline mode (read by `datasets` at import, hence set on its config) fails at once, as no network would
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as caught:
        load_rows(None, task="demo", hub_id="org/surely-not-cached-demo", hub_config=None, split="test", schema=SCHEMA)
    assert "org/surely-not-cached-demo" in str(caught.value) and "--data demo=PATH" in str(caught.value)
