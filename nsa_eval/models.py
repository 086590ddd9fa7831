"""Model specs on the command line -> LanguageModel backends."""

from __future__ import annotations

from typing import Any

from nsa_eval.model_adapters.base import LanguageModel
from nsa_eval.registry import MODEL_KINDS, did_you_mean


def load_model(spec: str, **options: Any) -> LanguageModel:
    """Load the backend a spec names: `smollm2`, `hf:PATH_OR_ID`, `nsa:PATH`, `openai:URL#MODEL`, `vllm:PATH`.

    options: device, dtype, max_length, batch_size (as HFModel.from_pretrained); attention ('full' or 'sparse')
    and sparse (SparseSettings) for `smollm2` and `hf:` (our attention kernels through transformers); prefill_chunk
    (None: the backend's default) for `smollm2` and `hf:`.
    """
    kind, _, target = spec.partition(":")
    attention = options.pop("attention", None) or "full"
    sparse = options.pop("sparse", None)
    prefill_chunk = options.pop("prefill_chunk", None)
    if attention != "full" and not (spec == "smollm2" or kind == "hf"):
        raise ValueError(f"--attention {attention} applies to smollm2 and hf: checkpoints, not to '{spec}'")
    if prefill_chunk is not None and not (spec == "smollm2" or kind in ("hf", "nsa")):
        raise ValueError(f"--prefill-chunk applies to smollm2, hf: and nsa: checkpoints, not to '{spec}'; leave it out")
    if spec == "smollm2" or kind == "hf":
        from nsa_eval.model_adapters.hf import HFModel, resolve_device
        from nsa_eval.model_adapters.hf_attention import SparseSettings, attn_implementation, enable_sparse

        if kind == "hf" and not target:
            raise ValueError("model spec 'hf:' needs a path or hub id, e.g. hf:./my-checkpoint")
        implementation = attn_implementation(attention, resolve_device(options.get("device")))
        if spec == "smollm2":
            from nsa_eval.model_adapters.smollm2 import load_smollm2

            model = load_smollm2(attn_implementation=implementation, prefill_chunk=prefill_chunk, **options)
        else:
            model = HFModel.from_pretrained(target, attn_implementation=implementation, prefill_chunk=prefill_chunk,
                                            **options)
        if attention == "sparse":
            enable_sparse(model, sparse or SparseSettings())
        return model
    if kind == "nsa":
        if not target:
            raise ValueError("model spec 'nsa:' needs a checkpoint folder, e.g. nsa:./my-nsa-checkpoint")
        from nsa_eval.model_adapters.nsa_adapter import load_nsa

        return load_nsa(target, prefill_chunk=prefill_chunk, **options)
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
