"""Checkpoints on the native engine (model_adapters/runtime/): `nsa:PATH`, and `hf:PATH_OR_ID` / `smollm2` where the
checkpoint is Llama-family (llama, qwen2, qwen3, mistral) and `--engine` is `auto` or `native`."""

from __future__ import annotations

import json
from pathlib import Path

from nsa_eval.model_adapters.base import ModelLoadError
from nsa_eval.model_adapters.hf import resolve_device, resolve_dtype
from nsa_eval.model_adapters.prompts import first_line
from nsa_eval.model_adapters.runtime.config import SparseSettings
from nsa_eval.model_adapters.runtime.weights import FLA_MODEL_TYPE, HF_MODEL_TYPES


def local_folder(path_or_id: str) -> Path | None:
    """The checkpoint folder of a local path, or of a hub id already in the local Hugging Face cache (no network);
    None for a hub id that is not cached."""
    path = Path(path_or_id).expanduser()
    if path.is_dir() or path_or_id.startswith((".", "/", "~")):
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path_or_id, local_files_only=True))
    except Exception:  # not cached, or not a valid id: the transformers path reports it
        return None


def native_supported(folder: Path | None) -> bool:
    """Whether the native engine runs the checkpoint in `folder` (its config.json's model_type)."""
    if folder is None or not (folder / "config.json").is_file():
        return False
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    return model_type in HF_MODEL_TYPES or model_type in ("nsa_eval", FLA_MODEL_TYPE)


def load_native(path: str | Path, *, device: str | None = None, dtype: str | None = None,
                max_length: int | None = None, batch_size: int = 8, name: str | None = None,
                prefill_chunk: int | None = None, attention: str | None = None,
                sparse: SparseSettings | None = None, nsa_only: bool = False):
    """The checkpoint folder's model on the native engine (an Engine) with the tokenizer saved beside it;
    ModelLoadError (one line) where either is missing or broken. prefill_chunk: prompt tokens per slice over the
    cache (None: 8192 on CUDA, one pass on the CPU; 0: one pass; checked by nsa_eval.models.LoadOptions). attention 'sparse': training-free sparse attention
    over a full-attention checkpoint (with `sparse`). nsa_only: refuse other checkpoints (the `nsa:` spec)."""
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    from nsa_eval.model_adapters.runtime.checkpoint import from_pretrained
    from nsa_eval.model_adapters.runtime.engine import Engine

    hf_logging.disable_progress_bar()
    folder = Path(path).expanduser()
    if nsa_only and (folder / "config.json").is_file() and native_supported(folder):
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type not in ("nsa_eval", FLA_MODEL_TYPE):
            raise ModelLoadError(f"{folder / 'config.json'} has model_type {model_type!r}, not an NSA checkpoint "
                                 f"('nsa_eval', or 'nsa' for flash-linear-attention); a full-attention checkpoint "
                                 f"loads with hf:{folder}")
    torch_device = resolve_device(device)
    model = from_pretrained(folder, device=torch_device, dtype=resolve_dtype(dtype, torch_device),
                            attention=attention if attention != "full" else None, sparse=sparse)
    model.prefill_chunk = prefill_chunk
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers does not know model_type nsa_eval and says so while it reads
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as error:  # transformers raises many types; the user needs one line
        raise ModelLoadError(f"no usable tokenizer in {folder} ({first_line(error)}); save one beside the weights: "
                             "tokenizer.save_pretrained(FOLDER)") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    generation_config = None
    if (folder / "generation_config.json").is_file():
        try:
            generation_config = GenerationConfig.from_pretrained(str(folder))
        except Exception as error:
            raise ModelLoadError(f"{folder / 'generation_config.json'} is unreadable ({first_line(error)})") from None
    label = name or folder.name
    if model.config.attention == "sparse":
        label = f"{label}+sparse{model.config.sparse.budget}"
    return Engine(model, tokenizer, label, max_length=max_length, batch_size=batch_size,
                  generation_config=generation_config)
