"""`nsa:PATH`: an NSA checkpoint (ours or flash-linear-attention's) behind the LanguageModel interface.

The model (model_adapters/nsa_model.py) answers the calls of a transformers causal LM, so HFModel's decode loop
serves it unchanged: batching, stop sequences, sampling, middle truncation, timings and log-likelihoods.
"""

from __future__ import annotations

from pathlib import Path

from nsa_eval.model_adapters.base import ModelLoadError
from nsa_eval.model_adapters.hf import HFModel, _first_line, resolve_device, resolve_dtype
from nsa_eval.model_adapters.nsa_model import NSAForCausalLM


def load_nsa(path: str, *, device: str | None = None, dtype: str | None = None, max_length: int | None = None,
             batch_size: int = 1, name: str | None = None, prefill_chunk: int | None = None) -> HFModel:
    """The checkpoint folder's model and the tokenizer saved beside it; ModelLoadError (one line) where either is
    missing or broken. prefill_chunk: prompt tokens per slice over the NSA cache (None: 8192 on CUDA, one pass on
    the CPU; 0: one pass)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = Path(path).expanduser()
    torch_device = resolve_device(device)
    model = NSAForCausalLM.from_pretrained(folder, device=torch_device, dtype=resolve_dtype(dtype, torch_device))
    model.prefill_chunk = prefill_chunk
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers does not know model_type nsa_eval and says so while it reads
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as error:  # transformers raises many types; the user needs one line
        raise ModelLoadError(f"no usable tokenizer in {folder} ({_first_line(error)}); save one beside the weights: "
                             "tokenizer.save_pretrained(FOLDER)") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return HFModel(model, tokenizer, name or folder.name, max_length=max_length, batch_size=batch_size)
