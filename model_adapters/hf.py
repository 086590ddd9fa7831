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

from nsa_eval.model_adapters.base import (Generation, GenerationRequest, LanguageModel, Loglikelihood,
                                          LoglikelihoodRequest, ModelLoadError, RollingLoglikelihood,
                                          RollingLoglikelihoodRequest)
from nsa_eval.model_adapters.decode_cost import DecodeCost, StepCost
from nsa_eval.model_adapters.prompts import (
    PromptTokens,
    cut_at_stop,
    eos_ids,
    first_line,
    loglikelihood_tokens,
    rolling_tokens,
    rolling_windows,
    truncate_middle,
)
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


class ForwardScoring:
    """Log-likelihoods and token log-probabilities from one forward pass of a causal LM that takes
    `model(input_ids=[B, T], attention_mask=[B, T]).logits` (transformers models and the runtime's Transformer).
    Needs self.model, self.tokenizer, self.render, self.max_length, self.batch_size, self.device, self.name."""

    # ---- log-likelihood -----------------------------------------------------------------------------

    @torch.no_grad()
    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[Loglikelihood]:
        """Summed log P(continuation | context), tokenised as lm-evaluation-harness does: the whole string is
        encoded once and split where the context's own encoding ends; trailing spaces of the context move to
        the continuation. Over-long inputs lose tokens from the left."""
        encoded = []
        for request in requests:
            whole, n_cont = loglikelihood_tokens(
                self.tokenizer, self.render(request.context), request.continuation, isinstance(request.context, str)
            )
            cut = len(whole) > self.max_length
            encoded.append((whole[-self.max_length :], n_cont, cut))
        results: list[Loglikelihood] = []
        for start in range(0, len(encoded), self.batch_size):
            batch = encoded[start : start + self.batch_size]
            width = max(len(ids) for ids, _, _ in batch)
            ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (seq, _, _) in enumerate(batch):
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for r, (seq, n_cont, cut) in enumerate(batch):
                positions = torch.arange(len(seq) - n_cont - 1, len(seq) - 1, device=logprobs.device)
                targets = torch.tensor(seq[-n_cont:], device=logprobs.device)
                token_lp = logprobs[r, positions, targets]
                greedy = bool((logprobs[r, positions].argmax(-1) == targets).all())
                results.append(Loglikelihood(float(token_lp.sum()), greedy, n_cont, cut))
        return results

    @torch.no_grad()
    def loglikelihood_rolling(self, requests: list[RollingLoglikelihoodRequest]) -> list[RollingLoglikelihood]:
        """Every token of each text scored as lm-eval's loglikelihood_rolling (`RollingLoglikelihoodRequest`): one
        forward pass per window of at most max_length tokens (`prompts.rolling_windows`)."""
        results = []
        for request in requests:
            tokens, prefix = rolling_tokens(self.tokenizer, request.text)
            windows = rolling_windows(tokens, prefix, self.max_length, request.stride)
            logprobs: list[float] = []
            positions: list[int] = []
            for inputs, targets in windows:
                logprobs += self._target_logprobs(inputs, targets)
                positions += range(len(inputs) - len(targets), len(inputs))
            results.append(RollingLoglikelihood(logprobs, positions, len(windows)))
        return results

    def _target_logprobs(self, inputs: list[int], targets: list[int]) -> list[float]:
        """log P(targets[j] | inputs up to position len(inputs) - len(targets) + j) in nats, float32, from one forward
        pass over inputs (the logits of the last len(targets) positions only, where the model can keep fewer)."""
        keep = {"logits_to_keep": len(targets)} if self._keeps_logits() else {}
        logits = self.model(input_ids=torch.tensor([inputs], device=self.device), **keep).logits[0, -len(targets):]
        return target_logprobs(logits, torch.tensor(targets, device=logits.device))

    def _keeps_logits(self) -> bool:
        return "logits_to_keep" in inspect.signature(self.model.forward).parameters

    @torch.no_grad()
    def token_logprobs(self, ids: list[int], top: int = 1) -> list[tuple[float, list[tuple[int, float]]]]:
        """For each token after the first: (log P(ids[i] | ids[:i]) in nats, the `top` most likely tokens at that
        position as (id, logprob)), from one forward pass. What a server needs for OpenAI's echo + logprobs."""
        if len(ids) > self.max_length:
            raise ValueError(f"{len(ids)} tokens exceed {self.name}'s --max-length {self.max_length}; send a shorter prompt")
        logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0, :-1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        chosen = logprobs.gather(1, torch.tensor(ids[1:], device=self.device).unsqueeze(1)).squeeze(1).tolist()
        best_lp, best_ids = logprobs.topk(max(1, top), dim=-1)
        return [
            (lp, list(zip(row_ids, row_lp))[:top])
            for lp, row_ids, row_lp in zip(chosen, best_ids.tolist(), best_lp.tolist())
        ]


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, rows: int = 1024) -> list[float]:
    """logits [n, V] (any dtype), targets [n] -> log_softmax(logits)[i, targets[i]] in float32, computed `rows` rows
    at a time so that a long window's float32 log-probabilities never exist whole."""
    out = []
    for start in range(0, logits.shape[0], rows):
        part = torch.log_softmax(logits[start : start + rows].float(), dim=-1)
        out.append(part.gather(1, targets[start : start + rows, None])[:, 0])
    return torch.cat(out).tolist() if out else []


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
