"""The task tests' shared set-up: SmolLM2's real tokenizer, for prompts whose length is measured in tokens."""

import pytest


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)
