"""Model specs on the command line -> LanguageModel backends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nsa_eval.model_adapters.base import LanguageModel
from nsa_eval.registry import MODEL_KINDS, did_you_mean

LOCAL_KINDS = ("nsa", "vllm")  # specs whose target is always a local checkpoint folder


def _looks_local(target: str) -> bool:
    """An hf: target that names a local folder rather than a hub id ('org/name')."""
    return target.startswith(("/", "./", "../", "~")) or Path(target).expanduser().exists()


def check_model_spec(spec: str, attention: str = "full", prefill_chunk: int | None = None) -> None:
    """Everything about a model spec that can be checked without loading it (its kind, a local checkpoint folder
    and its config.json, options that do not apply): one ValueError line, before any 'loading ...' message."""
    kind, _, target = spec.partition(":")
    known = [k.split(":")[0] for k in MODEL_KINDS]
    if kind not in known or (kind == "smollm2" and target):
        raise ValueError(f"unknown model spec '{spec}'.{did_you_mean(kind, known)} Known specs: {', '.join(MODEL_KINDS)}.")
    if attention != "full" and kind not in ("smollm2", "hf"):
        raise ValueError(f"--attention {attention} applies to smollm2 and hf: checkpoints, not to '{spec}'")
    if prefill_chunk is not None and kind not in ("smollm2", "hf", "nsa"):
        raise ValueError(f"--prefill-chunk applies to smollm2, hf: and nsa: checkpoints, not to '{spec}'; leave it out")
    if kind in ("hf", "nsa", "vllm") and not target:
        raise ValueError(f"model spec '{kind}:' needs a checkpoint folder{' or hub id' if kind == 'hf' else ''}, "
                         f"e.g. {kind}:./my-checkpoint")
    if kind == "openai" and not target.startswith(("http://", "https://")):
        raise ValueError(f"model spec '{spec}': give the server's URL, e.g. openai:http://127.0.0.1:8000/v1#MODEL")
    if kind in LOCAL_KINDS or (kind == "hf" and _looks_local(target)):
        folder = Path(target).expanduser()
        if not folder.exists():
            raise ValueError(f"model folder {target} does not exist; give a checkpoint folder (config.json and weights)"
                             + (" or a hub id" if kind == "hf" else ""))
        if not folder.is_dir():
            raise ValueError(f"model path {target} is a file; give the checkpoint folder holding config.json and weights")
        config = folder / "config.json"
        if not config.is_file():
            raise ValueError(f"model folder {target} holds no config.json; give a checkpoint folder (config.json and weights)")
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, OSError) as error:
            raise ValueError(f"{config} is not valid JSON ({error}); the checkpoint in {target} is corrupt") from None


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
