"""Checkpoint folders <-> the runtime's model: ours (config.json with every field, model.safetensors; model_type
nsa_eval), flash-linear-attention's NSA (model_type nsa) and Llama-family transformers checkpoints (llama, qwen2,
qwen3, mistral), their names and config fields mapped explicitly in runtime/weights.py. Every failure to read is a
ModelLoadError of one line naming what is wrong. Written: ours (save_pretrained) and fla's NSA layout (save_fla)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from nsa_eval.model_adapters.base import ModelLoadError
from nsa_eval.model_adapters.runtime.config import MODEL_TYPE, ModelConfig
from nsa_eval.model_adapters.runtime.model import Transformer
from nsa_eval.model_adapters.runtime.rope import inv_frequencies
from nsa_eval.model_adapters.runtime.weights import FLA_MODEL_TYPE, HF_MODEL_TYPES, config_from_fla, config_from_hf, \
    FLA_EXPORT_MAP, FLA_NAME_MAP, HF_NAME_MAP, fla_config_from, our_name

WEIGHTS_FILE = "model.safetensors"
# what a checkpoint folder may hold beside config.json and its weights that a converted copy takes along
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
              "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json", "generation_config.json")


def save_pretrained(model: Transformer, path: str | Path) -> None:
    """config.json (every hyperparameter) and model.safetensors into `path` (a tokenizer goes beside them)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    # copies: the attention's and MLP's input weights are row slices of one tensor (fused_linear)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})


def save_fla(model: Transformer | dict[str, torch.Tensor], config: ModelConfig | None, path: str | Path,
             tokenizer=None) -> None:
    """flash-linear-attention's NSA checkpoint of a model (a Transformer, or its state dict under our names with its
    `config`; None: the Transformer's own) into `path`: config.json (fla's NSAConfig fields, model_type nsa;
    weights.fla_config_from), model.safetensors under fla's names (weights.FLA_EXPORT_MAP; lm_head.weight left out
    when tied, as fla saves it) and the tokenizer's files when one is given; fla.models.NSAForCausalLM.from_pretrained
    and our loader read it. ValueError of one line, before anything is written, for a config fla's layout cannot hold
    or a state that does not fit the config."""
    from safetensors.torch import save_file

    if isinstance(model, Transformer):
        config = config or model.config
        state = model.state_dict()
    elif config is None:
        raise ValueError("save_fla: give the config of a state dict")
    else:
        state = dict(model)
    fla_config = fla_config_from(config)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        head = state.pop("lm_head.weight", None)
        if head is not None and "embed.weight" in state and not torch.equal(head, state["embed.weight"]):
            raise ValueError("save_fla: tie_word_embeddings is true but lm_head.weight differs from embed.weight")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"save_fla: the weights do not fit the config: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")
    wrong = [f"{k} {tuple(state[k].shape)} (config: {shape})" for k, shape in expected.items()
             if tuple(state[k].shape) != shape]
    if wrong:
        raise ValueError(f"save_fla: weights of the wrong shape: {', '.join(wrong[:3])}")
    renamed = {}
    for name, tensor in state.items():
        fla = our_name(name, FLA_EXPORT_MAP)
        assert fla is not None, f"FLA_EXPORT_MAP lacks {name}"  # every name of an expressible config maps
        # copies: the attention's and MLP's input weights are row slices of one tensor (fused_linear)
        renamed[fla] = tensor.detach().to("cpu", copy=True).contiguous()
    dtypes = {t.dtype for t in renamed.values()}
    if len(dtypes) == 1:
        fla_config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(fla_config, indent=2) + "\n")
    save_file(renamed, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


def export_fla(source: str | Path, out: str | Path) -> tuple[ModelConfig, list[str]]:
    """The checkpoint folder `source` (any layout read_checkpoint reads) as flash-linear-attention's NSA checkpoint in
    `out` (save_fla), with the tokenizer and generation files found beside it (SIDE_FILES, copied as they are) ->
    (its config, the names of the files copied). The config is checked before the weights are read; nothing is
    written when either does not fit (ValueError / ModelLoadError of one line)."""
    source = Path(source)
    config = read_config(source)
    fla_config_from(config, where=str(source / "config.json"))
    _, state = read_checkpoint(source)
    save_fla(state, config, out)
    copied = [name for name in SIDE_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copyfile(source / name, Path(out) / name)
    return config, copied


def from_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    attention: str | None = None, sparse=None) -> Transformer:
    """The model of a checkpoint folder (any layout above) on `device` in `dtype`. attention: None (the checkpoint's
    own), or "sparse" (with `sparse`, SparseSettings) to run a full-attention checkpoint with training-free sparse
    attention. ModelLoadError (one line) for anything that does not fit."""
    path = Path(path)
    config, state = read_checkpoint(path)
    if attention and attention != config.attention:
        if config.attention != "full" or attention != "sparse":
            raise ModelLoadError(f"--attention {attention} applies to full-attention checkpoints; {path} has "
                                 f"attention {config.attention!r}")
        fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
        try:
            config = ModelConfig(**{**fields, "attention": "sparse", "sparse": sparse})
        except ValueError as error:
            raise ModelLoadError(str(error)) from None
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} ({', '.join(unexpected[:3])}"
                         f"{', ...' if len(unexpected) > 3 else ''})")
        raise ModelLoadError(f"weights in {path} do not fit its config.json: {'; '.join(parts)}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise ModelLoadError(f"weights in {path}: {name} has shape {tuple(state[name].shape)} but config.json "
                                 f"implies {tuple(shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = inv_frequencies(config.head_dim, config.rope_theta, config.rope_scaling,
                                     config.max_position_embeddings)[0]  # a buffer: made on meta above
    return model.to(device).eval()


def read_checkpoint(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """config.json and the weights (safetensors, sharded safetensors, or pytorch_model.bin) of a checkpoint folder,
    names mapped to ours. ModelLoadError with one line naming what is wrong."""
    config, model_type = _read_config(path)
    state = _read_weights(path)
    if model_type in (FLA_MODEL_TYPE, *HF_MODEL_TYPES):
        fla = model_type == FLA_MODEL_TYPE
        mapped = {}
        for name, tensor in state.items():
            ours = our_name(name, FLA_NAME_MAP if fla else HF_NAME_MAP)
            if ours is None:
                if name.endswith("rotary_emb.inv_freq"):  # a buffer some checkpoints carry: made from the config
                    continue
                raise ModelLoadError(f"{path}: weight {name} has no counterpart in our model ("
                                     f"{'FLA_NAME_MAP' if fla else 'HF_NAME_MAP'} in model_adapters/runtime/weights.py)"
                                     "; load it with --engine transformers")
            mapped[ours] = tensor
        state = mapped
    return config, state


def read_config(path: Path) -> ModelConfig:
    """A checkpoint folder's config.json (any layout above) as our ModelConfig, without reading its weights;
    ModelLoadError with one line naming what is wrong."""
    return _read_config(path)[0]


def _read_config(path: Path) -> tuple[ModelConfig, str | None]:
    if not path.is_dir():
        raise ModelLoadError(f"NSA checkpoint folder {path} does not exist; give a folder with config.json and weights")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json; save_pretrained writes one")
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{config_file} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{config_file} must hold a JSON object")
    model_type = data.get("model_type")
    try:
        if model_type == MODEL_TYPE:
            config = ModelConfig.from_dict(data, where=str(config_file))
        elif model_type == FLA_MODEL_TYPE:
            config = config_from_fla(data, where=str(config_file))
        elif model_type in HF_MODEL_TYPES:
            config = config_from_hf(data, where=str(config_file))
        else:
            raise ModelLoadError(
                f"{config_file} has model_type {model_type!r}, which the native engine does not run (it runs "
                f"'{MODEL_TYPE}', flash-linear-attention's 'nsa' and {', '.join(HF_MODEL_TYPES)}); load it with "
                "--engine transformers")
        config.validate(str(config_file))
    except TypeError as error:
        raise ModelLoadError(f"{config_file}: {error}") from None
    except ModelLoadError:
        raise
    except ValueError as error:
        raise ModelLoadError(str(error)) from None
    return config, model_type


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / f"{WEIGHTS_FILE}.index.json"
    if (path / WEIGHTS_FILE).is_file():
        files = [path / WEIGHTS_FILE]
    elif index.is_file():
        try:
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ModelLoadError(f"{index} is not a valid safetensors index ({error})") from None
    elif (path / "pytorch_model.bin").is_file():
        try:
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as error:  # pickle and zip errors of many kinds: the user needs one line
            raise ModelLoadError(f"could not read {path / 'pytorch_model.bin'}: {str(error).splitlines()[0]}") from None
    else:
        raise ModelLoadError(f"{path} has no weights ({WEIGHTS_FILE}); runtime.checkpoint.save_pretrained writes them")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as error:
            raise ModelLoadError(f"could not read weights {file}: {str(error).splitlines()[0]}") from None
    return state

