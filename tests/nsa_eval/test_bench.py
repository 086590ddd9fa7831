"""The bench package on the CPU: one group with its five commands, the shared table writer, and the model's
attention-off switch that `bench model` measures the attention share with (the timings themselves need a GPU)."""

import torch
from click.testing import CliRunner

from nsa_eval.bench.common import card_slug, length_table
from nsa_eval.bench.model import attention_removed
from nsa_eval.cli import main
from nsa_eval.model_adapters.runtime.config import ModelConfig
from nsa_eval.model_adapters.runtime.model import Transformer


def test_bench_group_holds_its_five_commands():
    result = CliRunner().invoke(main, ["bench", "--help"])
    assert result.exit_code == 0, result.output
    for command in ("kernels", "model", "tasks", "eval", "suite"):
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
