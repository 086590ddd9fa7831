"""`nsa-eval inspect` (nsa_eval/fidelity.py): bad input in one line before any model loads, the means and bins of
fidelity.json by hand, and a real run on smollm2-nsa writing fidelity.json and the figures."""

import json

import pytest
import torch

from nsa_eval.fidelity import Totals, auto_bin_width, summarise, table
from cli_checks import assert_one_line_error, invoke

NIAH_TINY = ["--task", "niah", "--task-option", "niah.lengths=200", "--task-option", "niah.depths=50"]


@pytest.mark.parametrize("args, fragments", [
    (["--model", "smollm2", *NIAH_TINY], ["smollm2 runs full attention", "--attention sparse"]),
    (["--model", "hf:./nowhere", *NIAH_TINY], ["runs full attention"]),
    (["--model", "openai:http://127.0.0.1:1/v1#m", *NIAH_TINY], ["native engine", "openai:"]),
    (["--model", "smollm2-nsa", "--task", "nah"], ["nah", "niah"]),
    (["--model", "smollm2", "--attention", "sparse", "--sparse-budget", "512,1k", *NIAH_TINY], ["one budget"]),
    (["--model", "smollm2", "--attention", "sparse", "--sparse-budget", "64", *NIAH_TINY], ["--sparse-budget 64"]),
    (["--model", "smollm2-nsa", "--attention", "sparse", *NIAH_TINY], ["--attention sparse applies to smollm2"]),
    (["--model", "smollm2-nsa", "--task-option", "niah.lenghts=1k", "--task", "niah"], ["no option 'lenghts'"]),
    (["--model", "smollm2-nsa", "--bin-width", "wide", *NIAH_TINY], ["--bin-width"]),
])
def test_bad_input_is_one_line_before_the_model_loads(args, fragments):
    assert_one_line_error(invoke("inspect", *args), *fragments, alone=True)


def test_an_output_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    result = invoke("inspect", "--model", "smollm2-nsa", *NIAH_TINY, "--output", tmp_path)
    assert_one_line_error(result, str(tmp_path), "fidelity.json", alone=True)


def test_the_means_and_bins_by_hand():
    """Two layers, one KV head; prompt 1 at positions 10 and 70, prompt 2 at 70 (bins of 64: [0, 64) and [64, 128))."""
    totals = Totals()
    recall = torch.tensor([[[1.0], [0.5]], [[1.0], [0.0]]])  # [layers, P, H]
    share = torch.tensor([[[1.0], [0.8]], [[1.0], [0.6]]])
    totals.add(recall, share, [10, 70], 64, [False, True])
    totals.add(torch.tensor([[[0.25]], [[0.75]]]), torch.tensor([[[0.5]], [[0.9]]]), [70], 64, [True])
    result = summarise(totals, 64)
    assert result["queries"] == 3
    r = result["metrics"]["recall"]
    assert r["by_layer_head"] == [[pytest.approx((1 + 0.5 + 0.25) / 3)], [pytest.approx((1 + 0 + 0.75) / 3)]]
    assert r["mean"] == pytest.approx(3.5 / 6)
    assert result["position_bins"] == [{"first": 0, "last": 63, "queries": 1}, {"first": 64, "last": 127, "queries": 2}]
    assert r["by_bin_layer"] == [[1.0, 1.0], [pytest.approx(0.375), pytest.approx(0.375)]]
    assert r["by_bin"] == [1.0, pytest.approx(0.375)]
    assert result["metrics"]["mass_share"]["by_bin"] == [1.0, pytest.approx((0.8 + 0.6 + 0.5 + 0.9) / 4)]
    # selective queries: prompt 1's position 70 (mean over layers 0.25 recall, 0.7 share) and prompt 2's (0.5, 0.7)
    assert result["selective"] == {"queries": 2, "recall": pytest.approx(0.375), "mass_share": pytest.approx(0.7)}
    shown = table({**result, "model": "m", "task": "niah", "prompts": [{}, {}], "layers": 2, "kv_heads": 1,
                   "kernels": "reference", "device": "cpu", "selection": {"block": 64, "num_selected": 2}})
    assert any(line.split()[:1] == ["all"] for line in shown)
    assert shown[-1].startswith("where the selection has a choice")
    assert auto_bin_width(300) == 64 and auto_bin_width(4096) == 512 and auto_bin_width(5000) == 1024


@pytest.mark.slow
def test_inspect_on_smollm2_nsa_writes_the_json_and_figures(tmp_path):
    """smollm2-nsa (blocks of 64, 16 selected, a 512-token window) on a 200-token NIAH prompt: its selection holds
    every block, so recall and mass share are 1 everywhere; the folder holds fidelity.json and both figures in PNG,
    SVG and PDF, and the table is printed."""
    out = tmp_path / "inspect"
    result = invoke("inspect", "--model", "smollm2-nsa", *NIAH_TINY, "--limit", 1, "--positions", 4, "--device",
                    "cpu", "--output", out)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "fidelity.json").read_text())
    assert data["attention"] == "nsa" and data["kernels"] == "reference" and data["task"] == "niah"
    assert data["selection"] == {"block": 64, "num_selected": 16, "window": 512, "leading_tokens": 64,
                                 "local_blocks": 2}
    assert (data["layers"], data["kv_heads"], data["queries"]) == (30, 3, 4)
    (prompt,) = data["prompts"]
    assert 150 < prompt["tokens"] <= 200 and len(prompt["positions"]) == 4
    assert prompt["positions"][-1] == prompt["tokens"] - 1
    for name in ("recall", "mass_share"):
        metric = data["metrics"][name]
        assert metric["mean"] == pytest.approx(1.0, abs=1e-5)
        assert len(metric["by_layer_head"]) == 30 and len(metric["by_layer_head"][0]) == 3
        assert len(metric["by_bin"]) == len(data["position_bins"])
    assert sum(b["queries"] for b in data["position_bins"]) == 4
    assert data["selective"]["queries"] == 0 and data["selective"]["recall"] is None
    for figure in ("layer_x_head", "layer_x_position"):
        for kind in ("png", "svg", "pdf"):
            assert (out / f"{figure}.{kind}").stat().st_size > 1000
    assert "selection fidelity of SmolLM2-135M-Instruct-NSA on niah" in result.output
    assert "no query saw more blocks than n" in result.output
