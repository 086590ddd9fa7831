"""nsa_eval/records.py: the typed records write the JSON the run wrote before them, byte for byte (the published runs
in results/ read and rewrite unchanged), the one config hash matches every stored run's, and the samples reader stops
at a torn write, cuts it when asked, or names the line."""

import json
import tarfile
from pathlib import Path

import pytest

from nsa_eval.records import (RunInfo, RunKey, SampleRecord, TaskMetrics, append_sample, read_samples, samples_file,
                              write_samples)

RESULTS = Path(__file__).resolve().parents[2] / "results"
RUN_FILES = sorted(RESULTS.rglob("run.json"))
METRICS_FILES = sorted(RESULTS.rglob("metrics.json"))


def as_written(data) -> str:
    """JSON as the store writes run.json and metrics.json (store.RunStore.write_json)."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: str(p.relative_to(RESULTS)))
def test_a_stored_run_json_reads_and_writes_back_unchanged_and_its_hash_is_the_one_definitions(path):
    data = json.loads(path.read_text(encoding="utf-8"))
    info = RunInfo.from_json(data)
    assert as_written(info.to_json()) == as_written(data)
    assert info.key.hash == data["config_hash"]


@pytest.mark.parametrize("path", METRICS_FILES, ids=lambda p: str(p.relative_to(RESULTS)))
def test_a_stored_metrics_json_reads_and_writes_back_unchanged(path):
    data = json.loads(path.read_text(encoding="utf-8"))
    tasks = {name: TaskMetrics.from_json(entry).to_json() for name, entry in data["tasks"].items()}
    assert as_written({**data, "tasks": tasks}) == as_written(data)


def test_stored_samples_read_and_rewrite_byte_for_byte(tmp_path):
    with tarfile.open(RESULTS / "smollm2-nsa-vs-full" / "runs" / "samples.tgz") as archive:
        archive.extractall(tmp_path, filter="data")
    files = sorted(tmp_path.rglob("*.jsonl"))
    assert len(files) >= 10
    for path in files:
        before = path.read_bytes()
        records = read_samples(path, strict=True)
        assert len(records) == before.count(b"\n")
        write_samples(path, records, [r.id for r in records])
        assert path.read_bytes() == before, path


def record(sample_id: str, **answer) -> SampleRecord:
    return SampleRecord(id=sample_id, breakdown={"length": 512}, prompt_hash="h", prompt_excerpt="p", target="7",
                        answer=answer, scores={"accuracy": 1.0})


def test_a_record_keeps_its_layout_and_leaves_out_absent_details(tmp_path):
    path = tmp_path / "t.jsonl"
    append_sample(path, record("a", responses=["7"], new_tokens=[1]))
    append_sample(path, SampleRecord(**{**record("b").__dict__, "details": {"why": "x"}}))
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert list(lines[0]) == ["id", "breakdown", "prompt_hash", "prompt_excerpt", "target", "responses", "new_tokens",
                              "scores"]
    assert list(lines[1])[-2:] == ["scores", "details"]
    assert [r.to_json() for r in read_samples(path)] == lines


def test_a_torn_last_line_stops_the_reader_and_cut_removes_it(tmp_path):
    path = tmp_path / "t.jsonl"
    for sample_id in ("a", "b"):
        append_sample(path, record(sample_id))
    whole = path.read_bytes()
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"id": "c", "sco')
    assert [r.id for r in read_samples(path)] == ["a", "b"]
    assert path.read_bytes() != whole  # reading alone changes nothing
    with pytest.raises(ValueError, match="t.jsonl line 3 is corrupt"):
        read_samples(path, strict=True)
    assert [r.id for r in read_samples(path, cut=True)] == ["a", "b"] and path.read_bytes() == whole
    path.write_text(path.read_text() + "\n" + '{"id": "d"}\n')
    assert [r.id for r in read_samples(path)] == ["a", "b"]  # a blank line is skipped; a line that is no record stops
    with pytest.raises(ValueError, match=r"line 4 is not a sample record \(no 'breakdown'\)"):
        read_samples(path, strict=True)
    assert read_samples(tmp_path / "absent.jsonl") == []


def test_samples_file_finds_the_legacy_name(tmp_path):
    assert samples_file(tmp_path, "lm-eval:gsm8k") == tmp_path / "samples" / "lm-eval_gsm8k.jsonl"
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "lm-eval:gsm8k.jsonl").write_text("")
    assert samples_file(tmp_path, "lm-eval:gsm8k") == tmp_path / "samples" / "lm-eval:gsm8k.jsonl"


def test_run_key_leaves_out_what_older_hashes_did_not_hold():
    key = RunKey(model={"spec": "smollm2"}, tasks={}, seed=0, limit=None, device="cpu", dtype="float32")
    assert list(key.to_json()) == ["model", "tasks", "seed", "limit", "device", "dtype"]
    sparse = RunKey(**{**key.__dict__, "max_new_tokens": 8, "sparse": {"budget": 512}})
    assert list(sparse.to_json()) == ["model", "tasks", "seed", "limit", "max_new_tokens", "device", "dtype",
                                      "attention", "sparse"]
    assert sparse.to_json()["attention"] == "sparse" and sparse.hash != key.hash
    assert RunKey.from_json(sparse.to_json()) == sparse


def test_updated_sets_fields_as_dict_update_sets_keys():
    key = RunKey(model={}, tasks={}, seed=0, limit=None, device="cpu", dtype="float32")
    new = RunInfo(run_id="r", created="t", key=key, config_hash=key.hash, argv=["run"])
    assert list(new.to_json())[-1] == "argv" and new.to_json()["prefill_chunk"] is None  # always written, null or not
    stored = new.updated(compile_s=1.0)
    read = RunInfo.from_json(json.loads(json.dumps(stored.to_json())))
    resumed = read.updated(resumed=1, argv=["again"]).updated(settings={"--seed": 0}, compile_s=2.0)
    assert list(resumed.to_json())[-4:] == ["argv", "compile_s", "resumed", "settings"]
    assert resumed.to_json()["compile_s"] == 2.0 and resumed.to_json()["argv"] == ["again"]
