"""The KV bytes a decode step reads and the share of the context it attends (model_adapters/decode_cost.py), against
hand computations for full, sliding-window, training-free sparse and NSA attention; and the engine's records of them
(tiny NSA models on the CPU: every generation's kv_bytes_per_step and attended_share are the mean of the hand formula
over its decode steps)."""

import pytest
import torch

from nsa_eval.model_adapters.base import GenerationRequest
from nsa_eval.model_adapters.decode_cost import DecodeCost
from nsa_eval.model_adapters.runtime.config import ModelConfig, SparseSettings

# SmolLM2-135M's cache: 30 layers, 3 KV heads of 64 dims, float32 on the CPU
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               head_dim=64, v_head_dim=64, intermediate_size=1536, max_position_embeddings=8192)
PER_TOKEN = 30 * 3 * (64 + 64) * 4  # bytes of one token's key and value over every layer and KV head
PER_MEAN_KEY = 30 * 3 * 64 * 4  # one block mean's key


def test_full_attention_reads_every_cached_token_and_attends_all_of_them():
    cost = DecodeCost.of_config(ModelConfig(**SMOLLM2, attention="full"), 4)
    for t in (1, 513, 2048):
        assert cost.kv_bytes(t) == t * PER_TOKEN == t * 46080
        assert cost.attended(t) / t == 1.0
    window = DecodeCost.of_config(ModelConfig(**SMOLLM2, attention="full", sliding_window=256), 2)
    assert window.kv_bytes(1000) == 256 * PER_TOKEN // 2 and window.attended(1000) == 256
    assert window.kv_bytes(100) == 100 * PER_TOKEN // 2 and window.attended(100) == 100


def test_sparse_attention_reads_the_block_mean_keys_and_its_budget():
    settings = SparseSettings(budget=128, leading=16, local=32, block=16)  # 8 blocks of 16 tokens
    cost = DecodeCost.of_config(ModelConfig(**SMOLLM2, attention="sparse", sparse=settings), 4)
    # 512 tokens: 32 complete blocks scored by their mean keys; 8 blocks (128 tokens) read
    assert cost.kv_bytes(512) == 128 * PER_TOKEN + 32 * PER_MEAN_KEY
    assert cost.attended(512) / 512 == 128 / 512 == 0.25  # budget / context
    # 520 tokens: 32 complete blocks, the newest block holds 8 tokens: 7 whole blocks and those 8
    assert cost.kv_bytes(520) == (7 * 16 + 8) * PER_TOKEN + 32 * PER_MEAN_KEY
    assert cost.attended(520) == 120
    # a context within the budget: every token (7 blocks, 6 of them complete)
    assert cost.kv_bytes(100) == 100 * PER_TOKEN + 6 * PER_MEAN_KEY and cost.attended(100) == 100


def test_nsa_reads_compressed_blocks_selected_blocks_and_the_window():
    # the paper's layout: l 32, d 16, l' 64, n 16, w 512; bfloat16
    cost = DecodeCost.of_config(ModelConfig(**SMOLLM2, attention="nsa"), 2)
    per_token = PER_TOKEN // 2
    # 4096 tokens: (4096 - 32) // 16 + 1 = 255 compressed blocks; 16 of 64 selection blocks (1024 tokens); 512 window
    assert cost.kv_bytes(4096) == (255 + 1024 + 512) * per_token
    # attended: the selected and window tokens, the two local blocks (128 tokens, inside the window) counted once
    assert cost.attended(4096) == 1024 + 512 - 128
    # 1000 tokens: 16 selection blocks hold every token; 61 compressed blocks; the window's 512 read again
    assert cost.kv_bytes(1000) == (61 + 1000 + 512) * per_token and cost.attended(1000) == 1000
    # 20 tokens: no complete compressed block yet
    assert cost.kv_bytes(20) == (20 + 20) * per_token
    # fla's layout without a window: l = d = l' = 64, n 16
    fla = DecodeCost.of_config(ModelConfig(**SMOLLM2, attention="nsa", block_len=64, block_stride=64, select_len=64,
                                           window=0, compression="mean", shared_kv=True), 2)
    assert fla.kv_bytes(4100) == (64 + 15 * 64 + 4) * per_token and fla.attended(4100) == 15 * 64 + 4


def test_a_sample_averages_over_its_decode_steps():
    cost = DecodeCost.of_config(ModelConfig(**SMOLLM2, attention="full"), 4)
    steps = cost.over_steps(prompt_tokens=100, steps=4)  # contexts 101, 102, 103, 104
    assert steps.steps == 4 and steps.kv_bytes_per_step == 102.5 * PER_TOKEN and steps.mean_attended_share == 1.0
    assert cost.over_steps(100, 0).kv_bytes_per_step is None  # finished on its first token: no decode step


def test_transformers_configs():
    from transformers import GPT2Config, LlamaConfig

    llama = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    assert DecodeCost.of_transformers(llama, 4).kv_bytes(10) == 10 * 2 * 2 * (16 + 16) * 4
    sparse = DecodeCost.of_transformers(llama, 4, SparseSettings(budget=32, leading=8, local=16, block=8))
    assert sparse.attention == "sparse" and sparse.kv_bytes(64) == 2 * 2 * 4 * (32 * 32 + 8 * 16)
    gpt2 = GPT2Config(n_embd=32, n_layer=1, n_head=2)  # no num_key_value_heads: one per query head
    assert DecodeCost.of_transformers(gpt2, 4).kv_bytes(5) == 5 * 1 * 2 * (16 + 16) * 4
    mixed = LlamaConfig(num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"], sliding_window=8)
    assert DecodeCost.of_transformers(mixed, 4) is None  # layers of two kinds: not modelled, not guessed


# ---- the engine's records -------------------------------------------------------------------------------------

PAPER = dict(block_len=8, block_stride=4, select_len=8, num_selected=4, window=16, compression="mlp",
             compress_hidden_size=16, shared_kv=False)
FLA = dict(block_len=8, block_stride=8, select_len=8, num_selected=4, window=0, compression="mean", shared_kv=True)


def hand_nsa(t: int, l: int, d: int, ls: int, n: int, w: int) -> tuple[int, int]:
    """(raw tokens read, compressed blocks read) of one NSA step at context t, written out."""
    compressed = (t - l) // d + 1 if t >= l else 0
    blocks = (t + ls - 1) // ls
    selected = t if blocks <= n else (n - 1) * ls + (t - (blocks - 1) * ls)
    return selected + min(w, t), compressed


@pytest.mark.parametrize("layout", [PAPER, FLA], ids=["paper", "fla"])
def test_the_engine_records_each_generation_s_decode_cost(layout, smollm2_dir):
    from transformers import AutoTokenizer

    from nsa_eval.model_adapters.runtime.engine import Engine
    from nsa_eval.model_adapters.runtime.model import Transformer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, v_head_dim=16, intermediate_size=64,
                         max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id, **layout)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lm = Engine(Transformer(config).init_weights(std=0.3, seed=0).eval(), tokenizer, "tiny-nsa", max_length=96,
                    batch_size=2)
        prompts = ["1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12", "Hello", "The capital of France is"]
        generations = lm.generate([GenerationRequest(p, max_new_tokens=20) for p in prompts])
    finally:
        torch.set_num_threads(threads)
    for generation in generations:
        tokens, finish = generation.new_tokens[0], generation.finish_reasons[0]
        assert generation.decode_steps == tokens - 1 + (finish == "stop")  # no stop strings: "stop" is EOS
        assert generation.decode_steps > 0 and generation.decode_ms_per_token > 0
        contexts = range(generation.prompt_tokens + 1, generation.prompt_tokens + generation.decode_steps + 1)
        per_step, shares = [], []
        for t in contexts:
            raw, compressed = hand_nsa(t, config.block_len, config.block_stride, config.select_len,
                                       config.num_selected, config.window)
            per_step.append(2 * 2 * 4 * (raw * (16 + 16) + compressed * (16 + 16)))  # layers x KV heads x float32
            selected = raw - min(config.window, t)
            local = min(selected, t - max((t + 7) // 8 - 2, 0) * 8)
            shares.append(min(t, selected + min(config.window, t) - min(local, config.window)) / t)
        assert generation.kv_bytes_per_step == pytest.approx(sum(per_step) / len(per_step), rel=1e-12)
        assert generation.attended_share == pytest.approx(sum(shares) / len(shares), rel=1e-12)
    assert min(g.attended_share for g in generations) < 1  # the selection and the window leave tokens out


@pytest.mark.slow
def test_the_transformers_engine_records_each_generation_s_decode_cost(smollm2):
    """HFModel (SmolLM2 through transformers, full attention, float32): a batch of two prompts of other lengths."""
    smollm2.batch_size = 2
    try:
        generations = smollm2.generate([GenerationRequest("Count: 1, 2, 3, 4, 5,", max_new_tokens=6),
                                        GenerationRequest("Hi", max_new_tokens=3)])
    finally:
        smollm2.batch_size = 1
    for generation in generations:
        tokens, finish = generation.new_tokens[0], generation.finish_reasons[0]
        assert generation.decode_steps == tokens - 1 + (finish == "stop")
        prompt, steps = generation.prompt_tokens, generation.decode_steps
        mean_context = sum(range(prompt + 1, prompt + steps + 1)) / steps
        assert generation.kv_bytes_per_step == pytest.approx(mean_context * PER_TOKEN, rel=1e-12)
        assert generation.attended_share == 1.0 and generation.decode_ms_per_token > 0
