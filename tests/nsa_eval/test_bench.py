"""The bench package on the CPU: one group with its six commands, the shared table writer, the model's
attention-off switch that `bench model` measures the attention share with (the timings themselves need a GPU), and
`bench batching` end to end on the embedded SmolLM2 and real rows."""

import json

import pytest
import torch
from click.testing import CliRunner

from nsa_eval.bench.common import card_slug, length_table
from nsa_eval.bench.model import attention_removed
from nsa_eval.cli import main
from nsa_eval.model_adapters.runtime.config import ModelConfig
from nsa_eval.model_adapters.runtime.model import Transformer


def test_bench_group_holds_its_six_commands():
    result = CliRunner().invoke(main, ["bench", "--help"])
    assert result.exit_code == 0, result.output
    for command in ("kernels", "model", "tasks", "eval", "suite", "batching"):
        assert f"  {command} " in result.output


def test_card_slug_and_length_table():
    assert card_slug("NVIDIA H100 80GB HBM3") == "h100" and card_slug("Some Card 9") == "some-card-9"
    lines = length_table("**op** (ms)", ["ours", "sdpa"], [8192, 16384], lambda impl, t: f"{impl}{t // 1024}")
    assert lines == ["**op** (ms)", "", "| impl | T=8k | T=16k |", "| --- | --- | --- |",
                     "| ours | ours8 | ours16 |", "| sdpa | sdpa8 | sdpa16 |"]


def test_attention_removed_leaves_each_position_to_its_own_token():
    config = ModelConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=16, v_head_dim=16, intermediate_size=48,
                         max_position_embeddings=2048, block_len=16, block_stride=8, select_len=16, num_selected=4,
                         window=32, compression="mlp", compress_hidden_size=16, shared_kv=False)
    model = Transformer(config).init_weights(std=0.3, seed=0).eval()
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    with_attention = model(ids).logits
    with attention_removed(model):
        without = model(ids).logits
        alone = torch.cat([model(ids[:, t:t + 1]).logits for t in range(ids.shape[1])], 1)
        out = model(ids[:, :30], use_cache=True)  # decode over a cache: the step sees only its own token too
        step = model(ids[:, 30:31], past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(without, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[:, 0], alone[:, 30], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_attention, without, atol=1e-3)
    torch.testing.assert_close(model(ids).logits, with_attention)  # the switch is off again on leaving


@pytest.mark.slow
def test_bench_batching_checks_and_times_the_packed_paths_on_smollm2(shared_data, tmp_path):
    data = ["--data", f"mmlu={shared_data / 'mmlu_stem' / 'test.jsonl'}",
            "--data", f"gsm8k={shared_data / 'gsm8k' / 'test.jsonl'}"]
    result = CliRunner().invoke(main, ["bench", "batching", "--mmlu", "2", "--mmlu-shots", "0", "--gsm8k", "3",
                                       "--gsm8k-shots", "0", "--repeats", "1", "--threads", "1", "--device", "cpu",
                                       *data, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "cpu-varlen-batching.md").read_text()
    assert "2 samples, 8 requests (0-shot" in report and "3 prompts (0-shot" in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "---" not in line
            and not line.startswith("| path")]
    assert len(rows) == 5 and all(line.endswith("| yes | yes |") or line.endswith("| yes |") for line in rows)
    # passes: before, padded batches of 4 (--batch-size on the CPU), each one sample's four letters at equal lengths: a
    # pass of 4 rows each; a prompt each (the four letters share it); one pack; a prompt each; one pack
    assert [line.split(" | ")[1] for line in rows] == ["2", "2", "1", "3", "1"]
    assert "padded batches of 4 (before)" in report
    results = json.loads((tmp_path / "cpu-varlen-batching.json").read_text())
    assert results["machine"]["torch_threads"] == 1 and results["batch_tokens"] == 1024
    nothing = CliRunner().invoke(main, ["bench", "batching", "--mmlu", "0", "--gsm8k", "0", "--out", str(tmp_path)])
    assert nothing.exit_code == 1 and nothing.output.count("\n") == 1 and "nothing to measure" in nothing.output
