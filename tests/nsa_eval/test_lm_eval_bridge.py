"""lm-evaluation-harness both ways on an lm-eval task defined in local YAML over local data, fully offline:
lm-eval running our backend (`--model nsa-eval`) and our runner running the lm-eval task (`lm-eval:TASK`) ask
the model the same things and report the same scores."""

import json
from importlib import metadata

import pytest
from click.testing import CliRunner
from interop_helpers import write_lm_eval_tasks

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

import nsa_eval.lm_eval_bridge  # noqa: E402,F401  (registers the `nsa-eval` model)
from nsa_eval.cli import main  # noqa: E402

TASKS = ["toy_mc", "toy_gen"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_lm_eval_tasks(tmp_path_factory.mktemp("lm-eval-tasks"))


def run_ours(*args):
    return CliRunner().invoke(main, ["run", *args, "--device", "cpu", "--quiet"], catch_exceptions=False)


@pytest.mark.slow
def test_both_directions_give_the_same_scores(tiny_llama_dir, task_dir, tmp_path):
    out = tmp_path / "run"
    result = run_ours("--model", f"hf:{tiny_llama_dir}", "--tasks", ",".join(f"lm-eval:{t}" for t in TASKS),
                      "--include-path", str(task_dir), "--output", str(out))
    assert result.exit_code == 0, result.output
    ours = json.loads((out / "metrics.json").read_text())["tasks"]
    # the tiny model's tokenizer has a chat template, so our run sent chat messages: lm-eval's equivalent flags
    theirs = lm_eval.simple_evaluate(
        model="nsa-eval", model_args={"model": f"hf:{tiny_llama_dir}", "device": "cpu"}, tasks=TASKS,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        apply_chat_template=True, fewshot_as_multiturn=True, log_samples=True,
    )
    for name, keys in {"toy_mc": ["acc", "acc_norm"], "toy_gen": ["exact_match,first-number"]}.items():
        for key in keys:
            metric, _, filter_name = key.partition(",")
            filter_name = filter_name or "none"
            mine = ours[f"lm-eval:{name}"]["metrics"][key]
            assert mine["mean"] == theirs["results"][name][f"{metric},{filter_name}"]
            assert mine["stderr"] == pytest.approx(theirs["results"][name][f"{metric}_stderr,{filter_name}"])
        assert ours[f"lm-eval:{name}"]["n"] == len(theirs["samples"][name]) == 8

    # sample by sample: the same prompts gave the same log-likelihoods and the same generations
    records = {t: {r["id"]: r for r in map(json.loads, (out / "samples" / f"lm-eval_{t}.jsonl").read_text().splitlines())}
               for t in TASKS}
    for sample in theirs["samples"]["toy_mc"]:
        mine = records["toy_mc"][str(sample["doc_id"])]
        assert [r[0][0] for r in sample["resps"]] == pytest.approx([lp for lp, _ in mine["loglikelihoods"]], rel=1e-5)
        assert [r[0][1] for r in sample["resps"]] == [greedy for _, greedy in mine["loglikelihoods"]]
        assert mine["scores"]["acc"] == sample["acc"]
    for sample in theirs["samples"]["toy_gen"]:
        assert records["toy_gen"][str(sample["doc_id"])]["responses"] == sample["resps"][0]
    # the 1-shot example came from lm-eval's sampler with its default seed: the prompt holds another row's answer
    first = records["toy_mc"]["0"]["prompt_excerpt"]
    assert first.count("Question:") == 2 and "[assistant]" in first

    run_info = json.loads((out / "run.json").read_text())
    assert run_info["versions"]["lm_eval"] == metadata.version("lm-eval")
    assert run_info["tasks"]["lm-eval:toy_mc"]["config"]["lm_eval_version"] == metadata.version("lm-eval")
    assert run_info["tasks"]["lm-eval:toy_gen"]["version"] == "2.0"


@pytest.mark.slow
def test_plain_text_prompts_without_the_chat_template(tiny_llama_dir, task_dir, tmp_path):
    out = tmp_path / "run"
    result = run_ours("--model", f"hf:{tiny_llama_dir}", "--tasks", "lm-eval:toy_mc", "--include-path", str(task_dir),
                      "--output", str(out), "--no-chat-template", "--limit", "4")
    assert result.exit_code == 0, result.output
    theirs = lm_eval.simple_evaluate(
        model="nsa-eval", model_args=f"model=hf:{tiny_llama_dir},device=cpu", tasks=["toy_mc"], limit=4,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )
    ours = json.loads((out / "metrics.json").read_text())["tasks"]["lm-eval:toy_mc"]["metrics"]
    assert ours["acc"]["mean"] == theirs["results"]["toy_mc"]["acc,none"]
    assert ours["acc_norm"]["mean"] == theirs["results"]["toy_mc"]["acc_norm,none"]
    record = json.loads((out / "samples" / "lm-eval_toy_mc.jsonl").read_text().splitlines()[0])
    assert record["prompt_excerpt"].startswith("Question:") and record["prompt_excerpt"].endswith("Answer:")


@pytest.mark.slow
def test_lm_eval_command_line_runs_our_backend(tiny_llama_dir, task_dir, tmp_path, monkeypatch):
    """`nsa-eval lm-eval ...` is lm-eval's own CLI with `--model nsa-eval` available."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [
        "lm-eval", "--model", "nsa-eval", "--model_args", f"model=hf:{tiny_llama_dir}", "--device", "cpu",
        "--tasks", "toy_gen", "--include_path", str(task_dir), "--limit", "2", "--output_path", str(tmp_path / "out"),
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert len(written) == 1
    results = json.loads(written[0].read_text())["results"]["toy_gen"]
    assert results["exact_match,first-number"] in (0.0, 0.5, 1.0)


@pytest.mark.parametrize("yaml_text, message", [
    ("group: toy_all\ntask: [toy_mc, toy_gen]\n", "lm-eval:toy_all is a group of 2 tasks; name them one by one"),
])
def test_tasks_it_cannot_run_end_in_one_line(task_dir, tmp_path, yaml_text, message):
    folder = write_lm_eval_tasks(tmp_path / "tasks")
    (folder / "extra.yaml").write_text(yaml_text.format(data=folder / "toy.jsonl"))
    name = "toy_all"
    result = run_ours("--model", "smollm2", "--tasks", f"lm-eval:{name}", "--include-path", str(folder))
    assert "loading" not in result.output  # refused before any model loads
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


# ---- perplexity (loglikelihood_rolling) ---------------------------------------------------------------------

PAGES = [  # wikitext-2-raw's first lines, as EleutherAI/wikitext_document_level holds them ("page")
    " = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing "
    "video game developed by Sega and Media.Vision for the PlayStation Portable . Released in January 2011 in Japan , "
    "it is the third game in the Valkyria series . \n",
    " = Tower Building of the Little Rock Arsenal = \n \n The Tower Building of the Little Rock Arsenal , also known "
    "as U.S. Arsenal Building , is a building located in MacArthur Park in downtown Little Rock , Arkansas . \n",
    " = Cicely Mary Barker = \n \n Cicely Mary Barker ( 28 June 1895 – 16 February 1973 ) was an English "
    "illustrator best known for a series of fantasy illustrations depicting fairies and flowers . \n",
]
TOY_PPL = """task: toy_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: page
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""
WINDOW = 16  # every page takes several windows


def lm_eval_hf(folder):
    """lm-eval's own transformers backend (HFLM) on the checkpoint, float32, with the small window."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(folder), max_length=WINDOW, dtype="float32", device="cpu", batch_size=1)


def test_perplexity_tasks_give_lm_evals_own_perplexities(tiny_llama_dir, tmp_path):
    """An lm-eval perplexity task (loglikelihood_rolling) through our runner, lm-eval running our backend and lm-eval's
    own transformers backend: the same word and byte perplexities, document by document the same log-likelihoods."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "pages.jsonl").write_text("".join(json.dumps({"page": page}) + "\n" for page in PAGES))
    (folder / "toy_ppl.yaml").write_text(TOY_PPL.format(data=folder / "pages.jsonl"))
    out = tmp_path / "run"
    result = run_ours("--model", f"hf:{tiny_llama_dir}", "--tasks", "lm-eval:toy_ppl", "--include-path", str(folder),
                      "--max-length", str(WINDOW), "--output", str(out))
    assert result.exit_code == 0, result.output
    ours = json.loads((out / "metrics.json").read_text())["tasks"]["lm-eval:toy_ppl"]["metrics"]
    records = [json.loads(line) for line in (out / "samples" / "lm-eval_toy_ppl.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["windows"] > 2 for r in records)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    bridged = lm_eval.simple_evaluate(model="nsa-eval", model_args={"model": f"hf:{tiny_llama_dir}", "device": "cpu",
                                                                    "max_length": WINDOW},
                                      tasks=["toy_ppl"], task_manager=manager, log_samples=True)
    theirs = lm_eval.simple_evaluate(model=lm_eval_hf(tiny_llama_dir), tasks=["toy_ppl"], task_manager=manager,
                                     log_samples=True)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours[metric]["mean"] == bridged["results"]["toy_ppl"][f"{metric},none"]
        assert ours[metric]["mean"] == pytest.approx(theirs["results"]["toy_ppl"][f"{metric},none"], rel=1e-5)
    by_doc = {str(s["doc_id"]): s["resps"][0][0] for s in theirs["samples"]["toy_ppl"]}
    for record in records:
        assert record["loglikelihood"] == pytest.approx(by_doc[record["id"]], abs=1e-4)


@pytest.mark.slow
def test_lm_evals_wikitext_on_a_local_copy(tiny_llama_dir, tmp_path):
    """lm-eval's own `wikitext` task (its detokenizer, word counts and aggregation) from a local copy of its rows
    (`--data lm-eval:wikitext=FILE`, offline) through our runner: lm-eval's transformers backend's word perplexity."""
    from nsa_eval.lm_eval_bridge import load_task

    data = tmp_path / "wikitext.jsonl"
    data.write_text("".join(json.dumps({"page": page}) + "\n" for page in PAGES))
    out = tmp_path / "run"
    result = run_ours("--model", f"hf:{tiny_llama_dir}", "--tasks", "lm-eval:wikitext", "--data",
                      f"lm-eval:wikitext={data}", "--max-length", str(WINDOW), "--output", str(out))
    assert result.exit_code == 0, result.output
    ours = json.loads((out / "metrics.json").read_text())["tasks"]["lm-eval:wikitext"]
    theirs = lm_eval.simple_evaluate(model=lm_eval_hf(tiny_llama_dir), tasks=[load_task("wikitext", data_path=str(data))])
    assert ours["headline"] == "word_perplexity" and ours["n"] == 3
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours["metrics"][metric]["mean"] == pytest.approx(theirs["results"]["wikitext"][f"{metric},none"], rel=1e-5)


def test_a_missing_include_path_is_one_line(tmp_path):
    result = run_ours("--tasks", "lm-eval:toy_mc", "--include-path", str(tmp_path / "missing"))
    assert result.exit_code == 1 and "--include-path" in result.output and "is not a folder" in result.output


def test_an_lm_eval_task_reads_local_data_given_with_data(tiny_llama_dir, task_dir, tmp_path):
    """`--data lm-eval:TASK=PATH` replaces the task's dataset: a file serves every split, a folder one file a split."""
    from interop_helpers import TOY_ROWS

    three = tmp_path / "three.jsonl"
    three.write_text("".join(json.dumps(row) + "\n" for row in TOY_ROWS[:3]))
    out = tmp_path / "run"
    result = run_ours("--model", f"hf:{tiny_llama_dir}", "--tasks", "lm-eval:toy_gen", "--include-path", str(task_dir),
                      "--data", f"lm-eval:toy_gen={three}", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["tasks"]["lm-eval:toy_gen"]["n"] == 3
    config = json.loads((out / "run.json").read_text())["tasks"]["lm-eval:toy_gen"]["config"]
    assert config["data"] == str(three) and config["task_config"]["dataset_kwargs"]["data_files"]["test"] == str(three)
    prompts = [json.loads(line)["prompt_excerpt"] for line in (out / "samples" / "lm-eval_toy_gen.jsonl").read_text().splitlines()]
    assert [TOY_ROWS[i]["question"] in prompts[i] for i in range(3)] == [True] * 3

    from nsa_eval.lm_eval_bridge import LmEvalTask

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "validation.jsonl").write_text(three.read_text())
    with pytest.raises(ValueError, match="lm-eval:toy_gen could not read .*a folder needs one SPLIT.jsonl per split"):
        LmEvalTask("toy_gen", include_path=str(task_dir), data_path=str(folder))  # the task reads the test split
    (folder / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in TOY_ROWS[:2]))
    assert len(LmEvalTask("toy_gen", include_path=str(task_dir), data_path=str(folder))._task.eval_docs) == 2


@pytest.mark.slow
def test_lm_eval_gsm8k_from_one_file_never_shows_an_item_its_own_question(shared_data, tmp_path):
    """One `--data` file serves lm-eval's train (shot) and test splits: each prompt's 5 shots are the 5 other rows of a
    6-row file, never the asked item (lm-eval alone drew 5 of all 6, the asked one mostly among them)."""
    from nsa_eval.lm_eval_bridge import LmEvalTask
    from nsa_eval.tasks.base import TaskContext

    lines = (shared_data / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines[:6]]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(lines[:6]) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    result = run_ours("--model", "smollm2", "--tasks", "lm-eval:gsm8k", "--data", f"lm-eval:gsm8k={data}",
                      "--max-new-tokens", "1", "--output", str(out))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "run.json").read_text())["tasks"]["lm-eval:gsm8k"]["config"]
    assert config["fewshot_excludes_asked_item"] is True
    records = [json.loads(line) for line in (out / "samples" / "lm-eval_gsm8k.jsonl").read_text().splitlines()]
    assert len(records) == 6
    for record in records:  # the excerpt's start is the first shot, its end the asked question
        asked = rows[int(record["id"])]["question"]
        head, _, tail = record["prompt_excerpt"].partition(" [...] ")
        assert asked[-60:] in tail and asked[:60] not in head, record["prompt_excerpt"]

    task = LmEvalTask("gsm8k", data_path=str(data))  # the whole prompts, as plain text
    samples = task.samples(TaskContext(count_tokens=len, chat=False, max_length=4096, seed=0, limit=None))
    for sample in samples:
        assert sample.prompt.count(rows[int(sample.id)]["question"]) == 1, sample.prompt
        assert sum(sample.prompt.count(row["question"]) for row in rows) == 6  # 5 shots and the question

    data.write_text("\n".join(lines[:5]) + "\n", encoding="utf-8")  # 4 other rows cannot give 5 shots
    result = run_ours("--model", "smollm2", "--tasks", "lm-eval:gsm8k", "--data", f"lm-eval:gsm8k={data}",
                      "--output", str(tmp_path / "few"))
    assert result.exit_code == 1 and "loading" not in result.output
    assert result.output.strip() == (f"Error: lm-eval:gsm8k needs 5 shots other than the item asked; {data} holds 5 "
                                     "rows (give at least 6)")
    assert not (tmp_path / "few").exists()


def test_one_sample_writes_strict_json_with_null_and_a_reason(tiny_llama_dir, task_dir, tmp_path):
    """lm-eval gives no standard error for n=1 (NaN): metrics.json holds null and says why; strict readers accept it,
    the run's summary line and the report show it as missing."""
    out = tmp_path / "run"
    result = run_ours("--model", f"hf:{tiny_llama_dir}", "--tasks", "lm-eval:toy_gen", "--include-path", str(task_dir),
                      "--limit", "1", "--output", str(out))
    assert result.exit_code == 0, result.output

    def refuse(constant):
        raise AssertionError(f"{constant} in metrics.json")

    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=refuse)
    entry = metrics["tasks"]["lm-eval:toy_gen"]["metrics"]["exact_match,first-number"]
    assert entry["stderr"] is None and entry["stderr_reason"] == "one sample (n=1): no standard error"
    assert "± n/a (n=1)" in result.output
    report = CliRunner().invoke(main, ["report", str(out), "--format", "md", "--out", str(tmp_path / "report")],
                                catch_exceptions=False)
    assert report.exit_code == 0, report.output
