"""Shared test set-up. Triton kernels run in interpreter mode on machines without a GPU.

Markers (pyproject.toml): `gpu` tests need a CUDA device and are skipped here where torch sees none (no per-file
skipif); `slow` marks the costliest tests, parametrized cases and modules (a module whose shared fixture takes
seconds), so that `pytest -m "not slow"` runs in under 2 minutes on 2 CPU cores with a cheap case of each kind
(the quick loop; the whole suite before a commit)."""

import os
from pathlib import Path

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if _has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real benchmark rows); tests using it skip where a checkout lacks it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real benchmark rows not found at {SHARED_DATA} (present only beside the project's own checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain transformers checkpoint (made once from its GGUF file)."""
    from nsa_eval.model_adapters.smollm2 import plain_checkpoint

    return plain_checkpoint()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    """SmolLM2's real tokenizer, for prompts whose length is measured in tokens (one per test module)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): on 2
    shared cores a second thread that waits for a busy core makes each small op up to 100 times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """The real SmolLM2 model behind the LanguageModel interface, loaded once per test session."""
    from nsa_eval.model_adapters.hf import HFModel

    return HFModel.from_pretrained(str(smollm2_dir), name="SmolLM2-135M-Instruct", device="cpu")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny randomly initialised Llama (2 layers, hidden 64) saved with SmolLM2's real tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
