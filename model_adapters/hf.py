"""`hf:PATH_OR_ID`: any transformers causal LM behind the LanguageModel interface.

Generation runs our own decode loop over transformers' KV cache (rather than `model.generate`) so that every
request gets its own seeded sampler, stop sequences are checked as text, and prefill and decode are timed
separately; each row's decode steps give the KV bytes a step reads and the share of the context it attends
(model_adapters/decode_cost.py).
"""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Any

import torch

from nsa_eval.model_adapters.base import Generation, GenerationRequest, LanguageModel, ModelLoadError
from nsa_eval.model_adapters.decode_cost import DecodeCost, StepCost
from nsa_eval.model_adapters.prompts import PromptTokens, cut_at_stop, eos_ids, first_line, truncate_middle
from nsa_eval.model_adapters.scoring import ForwardScoring
from nsa_eval.model_adapters.runtime.model import DEFAULT_PREFILL_CHUNK  # one default for both engines


def resolve_device(device: str | None) -> torch.device:
    """'cuda' when available and not asked otherwise; a missing CUDA device is a clear error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but no CUDA device is available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA, float32 on the CPU unless asked otherwise."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown --dtype '{dtype}'; use one of {', '.join(table)}")
    return table[dtype]


class HFModel(PromptTokens, ForwardScoring, LanguageModel):
    """A transformers causal LM and its tokenizer.

    max_length: prompt + generation budget in tokens (defaults to the model's max_position_embeddings).
    batch_size: requests per forward pass; prompts are left-padded within a batch.
    prefill_chunk: prompt tokens per forward pass during prefill, so that activation memory is bounded by the chunk
        rather than the prompt (a 64k-token prompt fits in GPU memory). None: DEFAULT_PREFILL_CHUNK on CUDA, the
        whole prompt in one pass elsewhere; 0: one pass. Applies where `chunked_prefill_supported(model)`.
    chat: whether the tokenizer has a chat template (tasks then send chat messages).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str,
        max_length: int | None = None,
        batch_size: int = 1,
        prefill_chunk: int | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        model_max = getattr(model.config, "max_position_embeddings", None) or 2048
        if max_length is not None and max_length > model_max:
            raise ValueError(
                f"--max-length {max_length} exceeds {name}'s max_position_embeddings ({model_max}); "
                f"use --max-length {model_max} or less"
            )
        self.max_length = max_length or model_max
        self.batch_size = max(1, batch_size)
        self.prefill_chunk = _resolve_prefill_chunk(prefill_chunk, model, self.device)
        self.chat = getattr(tokenizer, "chat_template", None) is not None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_ids = eos_ids(model.config, tokenizer, getattr(model, "generation_config", None))
        # transformers 5.2x renamed `past_key_values` to `cache`; support both spellings
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # prefill computes the last position's logits only, where the model can (a 64k prompt's full logits are GBs)
        self._prefill_args = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_length: int | None = None,
        batch_size: int = 1,
        prefill_chunk: int | None = None,
        name: str | None = None,
        attn_implementation: str | None = None,
        **load_kwargs: Any,
    ) -> "HFModel":
        """Load from a local directory (or a hub id where the hub is reachable)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress bar is the one a user watches

        looks_local = path_or_id.startswith((".", "/", "~")) or os.path.exists(path_or_id)
        path = Path(path_or_id).expanduser()
        if looks_local:
            if not path.is_dir():
                raise ModelLoadError(f"model directory {path} does not exist; give a directory with config.json")
            if not (path / "config.json").is_file() and "gguf_file" not in load_kwargs:
                raise ModelLoadError(
                    f"{path} has no config.json, so it is not a transformers checkpoint; "
                    "point hf: at the folder that save_pretrained wrote"
                )
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        source = str(path) if looks_local else path_or_id
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **load_kwargs)
        except Exception as error:  # transformers raises many types; the user needs one line
            raise ModelLoadError(f"could not load a tokenizer from {source}: {first_line(error)}") from None
        try:
            extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **extra, **load_kwargs)
        except Exception as error:
            raise ModelLoadError(f"could not load model weights from {source}: {first_line(error)}") from None
        model.to(torch_device)
        return cls(model, tokenizer, name or Path(source).name, max_length=max_length, batch_size=batch_size,
                   prefill_chunk=prefill_chunk)

    @property
    def decode_cost(self) -> DecodeCost | None:
        """What a decode step reads and attends, from the transformers config, dtype and sparse settings (None where
        the config's cache is not plain per-layer K/V: model_adapters/decode_cost.py)."""
        return DecodeCost.of_transformers(self.model.config, self.dtype.itemsize,
                                          getattr(self.model.config, "nsa_eval_sparse", None))

    def describe(self) -> dict[str, Any]:
        # self.model: a transformers model (its config holds whatever config.json had), or the runtime's NSA model,
        # which slices its prompt over its own cache (its prefill_chunk)
        return {"device": str(self.device), "dtype": str(self.dtype), "batch_size": self.batch_size,
                "prefill_chunk": self.prefill_chunk or getattr(self.model, "prefill_chunk", None),
                "attention": getattr(self.model.config, "attention", None)}

    # ---- tokens -------------------------------------------------------------------------------------

    # ---- generation ---------------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        results: list[Generation] = []
        for start in range(0, len(requests), self.batch_size):
            results.extend(self._generate_batch(requests[start : start + self.batch_size]))
        return results

    @torch.no_grad()
    def _generate_batch(self, requests: list[GenerationRequest]) -> list[Generation]:
        rows: list[tuple[int, int]] = []  # (request index, sample index)
        prompts: list[list[int]] = []
        truncated: list[bool] = []
        for i, request in enumerate(requests):
            budget = self.max_length - request.max_new_tokens
            if budget < 1:
                raise ValueError(
                    f"max_new_tokens {request.max_new_tokens} leaves no room for a prompt in --max-length {self.max_length}"
                )
            ids, cut = truncate_middle(self.encode(request.prompt), budget)
            truncated.append(cut)
            greedy = request.temperature <= 0
            for j in range(1 if greedy else request.n):
                rows.append((i, j))
                prompts.append(ids)
        max_new = max(r.max_new_tokens for r in requests)
        input_ids, attention_mask = self._left_pad(prompts)
        generators = [_row_generator(requests[i].seed, j) for i, j in rows]

        _sync(self.device)
        t0 = time.perf_counter()
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits, past = self._prefill(input_ids, attention_mask, position_ids)
        _sync(self.device)
        prefill_ms = (time.perf_counter() - t0) * 1e3

        n_rows = len(rows)
        new_tokens: list[list[int]] = [[] for _ in range(n_rows)]
        done = [False] * n_rows
        finish = ["length"] * n_rows
        t1 = time.perf_counter()
        steps = 0
        row_steps = [0] * n_rows  # decode steps whose logits a row still took its next token from
        for step in range(max_new):
            next_ids = []
            for r, (i, _) in enumerate(rows):
                next_ids.append(_pick(logits[r], requests[i], generators[r]))
            for r, (i, _) in enumerate(rows):
                if done[r]:
                    continue
                token = next_ids[r]
                if token in self.eos_ids:
                    done[r], finish[r] = True, "stop"
                    continue
                new_tokens[r].append(token)
                request = requests[i]
                if request.stop:
                    text = self.tokenizer.decode(new_tokens[r], skip_special_tokens=True)
                    if cut_at_stop(text, request.stop) is not None:
                        done[r], finish[r] = True, "stop"
                        continue
                if len(new_tokens[r]) >= request.max_new_tokens:
                    done[r] = True
            if all(done) or step == max_new - 1:
                break
            feed = torch.tensor(next_ids, device=self.device).unsqueeze(1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((n_rows, 1))], dim=1)
            position_ids = position_ids[:, -1:] + 1
            out = self.model(
                input_ids=feed,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{self._cache_arg: past},
            )
            past = getattr(out, self._cache_arg)
            logits = out.logits[:, -1, :].float()
            steps += 1
            for r in range(n_rows):
                row_steps[r] += not done[r]
        _sync(self.device)
        decode_s = time.perf_counter() - t1

        generations = []
        cost_model = self.decode_cost
        for i, request in enumerate(requests):
            row_ids = [r for r, (ri, _) in enumerate(rows) if ri == i]
            row_texts, row_counts, row_finish = [], [], []
            for r in row_ids:
                text = self.tokenizer.decode(new_tokens[r], skip_special_tokens=True)
                cut = cut_at_stop(text, request.stop)
                row_texts.append(text if cut is None else cut)
                row_counts.append(len(new_tokens[r]))
                row_finish.append(finish[r])
            if len(row_ids) == 1 and request.n > 1:  # greedy: every sample is the same text
                row_texts, row_counts, row_finish = (x * request.n for x in (row_texts, row_counts, row_finish))
            generated = sum(len(new_tokens[r]) for r in row_ids)
            cost = (sum((cost_model.over_steps(len(prompts[r]), row_steps[r]) for r in row_ids), StepCost())
                    if cost_model is not None else StepCost(sum(row_steps[r] for r in row_ids)))
            generations.append(
                Generation(
                    texts=row_texts,
                    new_tokens=row_counts,
                    finish_reasons=row_finish,
                    prompt_tokens=len(prompts[row_ids[0]]),
                    truncated=truncated[i],
                    prefill_ms=prefill_ms,
                    decode_tokens_per_s=generated / decode_s if decode_s > 0 and steps else 0.0,
                    decode_steps=cost.steps,
                    decode_ms_per_token=decode_s * 1e3 / steps if steps and cost.steps else None,
                    kv_bytes_per_step=cost.kv_bytes_per_step if cost_model is not None else None,
                    attended_share=cost.mean_attended_share if cost_model is not None else None,
                )
            )
        return generations

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Left-padded prompts input_ids [B, T] (mask and positions alike) -> (the last position's logits [B, V]
        float32, the KV cache). With prefill_chunk, slices of that many tokens go through the model one after the
        other over the growing cache; each slice's attention mask covers every token so far."""
        width = input_ids.shape[1]
        step = self.prefill_chunk or width
        past = None
        for start in range(0, width, step):
            end = min(start + step, width)
            out = self.model(
                input_ids=input_ids[:, start:end], attention_mask=attention_mask[:, :end],
                position_ids=position_ids[:, start:end], use_cache=True,
                **({self._cache_arg: past} if past is not None else {}), **self._prefill_args,
            )
            past = getattr(out, self._cache_arg)
        return out.logits[:, -1, :].float(), past

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        return ids.to(self.device), mask.to(self.device)


def chunked_prefill_supported(model: Any) -> bool:
    """Whether a prompt can be prefilled in slices over the model's cache: transformers models (training-free sparse
    attention included: a slice after cached tokens runs on the NSA kernels' query offset). Not the NSA model: it
    slices its prompt over its own cache itself (its `prefill_chunk`)."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _resolve_prefill_chunk(prefill_chunk: int | None, model: Any, device: torch.device) -> int | None:
    """Tokens per prefill pass, or None for one pass (see HFModel; the value is checked by
    nsa_eval.models.LoadOptions); ValueError for a model that slices its prompt itself."""
    if not chunked_prefill_supported(model):
        if prefill_chunk:
            raise ValueError(f"--prefill-chunk applies to transformers models, not to {type(model).__name__} (it "
                             "chunks its prompt itself); leave --prefill-chunk out")
        return None
    if prefill_chunk is None:
        return DEFAULT_PREFILL_CHUNK if device.type == "cuda" else None
    return prefill_chunk or None


def _pick(logits: torch.Tensor, request: GenerationRequest, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; else temperature + nucleus (top_p) sampling with the row's generator."""
    if request.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / request.temperature, dim=-1)
    if request.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < request.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    choice = torch.multinomial(probs.cpu(), 1, generator=generator)
    return int(choice)


def _row_generator(seed: int, sample_index: int) -> torch.Generator:
    generator = torch.Generator()  # sampling happens on CPU probabilities: same results on any device
    generator.manual_seed((seed * 1_000_003 + sample_index) % (2**63))
    return generator


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
