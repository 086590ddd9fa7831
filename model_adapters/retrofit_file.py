"""What a retrofit ships (model_adapters/retrofit.py trains it): the trained tensors alone, float16, in one
safetensors file with the run's record (recipe, base fingerprint, corpus, versions, losses) as metadata, and the NSA
checkpoint rebuilt from that file onto the base's weights (what `--model smollm2-nsa` loads)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from nsa_eval.model_adapters.retrofit import STAGE2_PROJECTIONS, Recipe, Retrofit, nsa_config, trained_tensors
from nsa_eval.model_adapters.runtime.model import Transformer

DELTA_FORMAT = "nsa-eval-retrofit-1"
PROBE_TEXT = ("The harness reads a long report, finds the number hidden in its middle, and answers with it. "
              "def mean(values):\n    return sum(values) / len(values)\n")

def base_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (first 16 hex digits) of a base checkpoint's weights in float32, names sorted."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_delta(retrofit: Retrofit, path: Path, record: dict) -> None:
    """The shipped file: trained_tensors in float16 (safetensors) with `record` (recipe, base fingerprint, corpus,
    versions, losses) as JSON metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.to(torch.float16).contiguous() for k, v in trained_tensors(retrofit).items()}
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={"format": DELTA_FORMAT, "record": json.dumps(record)})
    partial.replace(path)


def read_delta(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A save_delta file -> (tensors in float32, record); ValueError (one line) for anything else."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{path} is not a retrofit file ({str(error).splitlines()[0]})") from None
    if metadata.get("format") != DELTA_FORMAT:
        raise ValueError(f"{path} is not a retrofit file (no '{DELTA_FORMAT}' metadata)")
    return tensors, json.loads(metadata["record"])


def build_model(base: Transformer, tensors: dict[str, torch.Tensor], record: dict) -> Transformer:
    """The NSA model: base weights (a full-attention Transformer), low-rank updates merged (W + B A in float32),
    the trained gates; in the base's dtype and device. ValueError if the base is not the one trained on."""
    recipe = Recipe.from_record(record["recipe"])
    fingerprint = base_fingerprint(base.state_dict())
    if fingerprint != record["base_fingerprint"]:
        raise ValueError(f"the base model's weights (fingerprint {fingerprint}) are not those the retrofit was trained "
                         f"on ({record['base_fingerprint']}); rebuild needs the same base checkpoint")
    config = nsa_config(base.config, recipe)
    model = Transformer(config).to(device=base.device, dtype=base.dtype)
    state = {k: v.float() for k, v in base.state_dict().items()}
    for i in range(config.num_hidden_layers):
        state[f"layers.{i}.attn.g_proj.weight"] = tensors[f"layers.{i}.attn.g_proj.weight"]
        for proj in STAGE2_PROJECTIONS:
            a, b = tensors[f"layers.{i}.attn.{proj}_proj.lora_a"], tensors[f"layers.{i}.attn.{proj}_proj.lora_b"]
            state[f"layers.{i}.attn.{proj}_proj.weight"] = state[f"layers.{i}.attn.{proj}_proj.weight"] + b @ a
    model.load_state_dict({k: v.to(base.dtype) for k, v in state.items()}, strict=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()


def probe_logits(model: Transformer, tokenizer) -> dict:
    """The model's last-position logits on PROBE_TEXT (float32, CPU): its 8 largest (token, value) and the norm; the
    record keeps them so a rebuilt model can be checked against the one the retrofit produced."""
    ids = torch.tensor([tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]], device=model.device)
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float().cpu()
    top = logits.topk(8)
    return {"text": PROBE_TEXT, "top8": [[int(i), round(float(v), 5)] for v, i in zip(top.values, top.indices)],
            "norm": round(float(logits.norm()), 4)}


def build_checkpoint(delta_path: Path, base: Path, target: Path) -> Path:
    """The NSA checkpoint (config.json, model.safetensors in float32, the base's tokenizer, retrofit.json) built from
    a retrofit file and its base folder into `target` (atomically: a concurrent reader sees all of it or nothing)."""
    from nsa_eval.model_adapters.runtime.checkpoint import from_pretrained

    tensors, record = read_delta(delta_path)
    return write_checkpoint(build_model(from_pretrained(base, dtype=torch.float32), tensors, record), record, base,
                            target)


def write_checkpoint(model: Transformer, record: dict, base: Path, target: Path) -> Path:
    """A built NSA model (build_model) saved as a checkpoint into `target` with the base folder's tokenizer files and
    the retrofit's record (retrofit.json); atomic, as build_checkpoint."""
    import shutil
    import tempfile

    from nsa_eval.model_adapters.runtime.checkpoint import save_pretrained

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    save_pretrained(model, partial)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "chat_template.jinja", "vocab.json", "merges.txt"):
        if (base / name).is_file():
            shutil.copy2(base / name, partial / name)
    (partial / "retrofit.json").write_text(json.dumps(record, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    return target
