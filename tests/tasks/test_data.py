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
    with pytest.raises(DataError, match=r"broken\.jsonl: row 3, column 2: not valid JSON \(Expecting property name"):
        load(path)


def test_a_truncated_row_is_placed_where_it_was_cut(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps(ROWS[0]) + '\n{"question": "Tom has 3 appl\n', encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load(path)
    assert str(caught.value) == (f"{path}: row 2, column 28: not valid JSON (the string opened at column 14 is not "
                                 "closed by the row's end: cut short?)")


@pytest.mark.parametrize("name, content, place", [
    ("bad.jsonl", b'{"question": "a"}\n{"question": "b\xffc"}\n', "line 2, column 16"),
    ("bad.csv", b"\xffquestion,answer\n", "line 1, column 1"),
    ("bad.json", b'[{"question": "\xfe"}]', "line 1, column 16"),
])
def test_a_file_that_is_not_utf8_names_the_line_and_column(tmp_path, name, content, place):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load(path)
    assert str(caught.value).startswith(f"{path}: {place}: not UTF-8 text (byte 0x")


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


def test_no_network_is_one_line_at_once_without_retries(monkeypatch):
    """Not cached, not offline, and the hub refuses connections: one line naming --data within seconds (no
    huggingface_hub retry storm)."""
    import time

    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    start = time.perf_counter()
    with pytest.raises(ValueError) as caught:
        load_rows(None, task="demo", hub_id="org/surely-not-cached-demo", hub_config=None, split="test", schema=SCHEMA)
    assert time.perf_counter() - start < 10
    message = str(caught.value)
    assert "not in the local datasets cache" in message and "http://127.0.0.1:9" in message and "cannot be reached" in message
    assert "--data demo=PATH" in message and "\n" not in message
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set.*--data demo=PATH"):
        load_rows(None, task="demo", hub_id="org/surely-not-cached-demo", hub_config=None, split="test", schema=SCHEMA)


def test_a_dataset_in_the_local_cache_loads_with_no_network(tmp_path, monkeypatch):
    """The datasets cache is read first: a hub id cached earlier loads though the hub cannot be reached (here a
    cache entry made from a local file and filed under the hub id, as `datasets` files a downloaded one)."""
    import shutil

    import datasets

    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    datasets.load_dataset("json", data_files={"test": str(tmp_path / "rows.jsonl")}, cache_dir=str(tmp_path / "build"))
    built = next(p for p in (tmp_path / "build" / "json").glob("*/0.0.0/*") if p.is_dir())
    entry = tmp_path / "cache" / "org___cached-demo" / "main" / "0.0.0" / built.name
    shutil.copytree(built, entry)
    (entry / "json-test.arrow").rename(entry / "cached-demo-test.arrow")
    info = json.loads((entry / "dataset_info.json").read_text())
    (entry / "dataset_info.json").write_text(json.dumps({**info, "config_name": "main", "dataset_name": "cached-demo"}))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    rows = load_rows(None, task="demo", hub_id="org/cached-demo", hub_config="main", split="test", schema=SCHEMA)
    assert rows == ROWS


def test_an_empty_source_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl holds no rows; give demo data with at least one row"):
        load(tmp_path / "empty.jsonl")
