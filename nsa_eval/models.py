"""Model specs on the command line -> LanguageModel backends."""

from __future__ import annotations

from typing import Any

from nsa_eval.model_adapters.base import LanguageModel
from nsa_eval.registry import MODEL_KINDS, did_you_mean


def load_model(spec: str, **options: Any) -> LanguageModel:
    """Load the backend a spec names: `smollm2`, `hf:PATH_OR_ID`, `openai:URL#MODEL`, `vllm:PATH`.

    options: device, dtype, max_length, batch_size (as HFModel.from_pretrained).
    """
    kind, _, target = spec.partition(":")
    if spec == "smollm2":
        from nsa_eval.model_adapters.smollm2 import load_smollm2

        return load_smollm2(**options)
    if kind == "hf":
        if not target:
            raise ValueError("model spec 'hf:' needs a path or hub id, e.g. hf:./my-checkpoint")
        from nsa_eval.model_adapters.hf import HFModel

        return HFModel.from_pretrained(target, **options)
    if kind == "openai":
        from nsa_eval.model_adapters.openai_backend import OpenAIModel

        return OpenAIModel.from_spec(target, max_length=options.get("max_length"))
    if kind == "vllm":
        if not target:
            raise ValueError("model spec 'vllm:' needs a checkpoint folder, e.g. vllm:./my-checkpoint")
        from nsa_eval.model_adapters.vllm_backend import VLLMModel

        return VLLMModel.from_pretrained(target, **options)
    known = [k.split(":")[0] for k in MODEL_KINDS]
    raise ValueError(
        f"unknown model spec '{spec}'.{did_you_mean(kind, known)} Known specs: {', '.join(MODEL_KINDS)}."
    )
