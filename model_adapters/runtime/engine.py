"""The generation engine: the LanguageModel that runs `hf:` Llama-family checkpoints, `nsa:` checkpoints and
`--attention sparse` on the runtime's model (runtime/model.py), with continuous batching over a static slot cache.

How a batch of requests runs (`generate_iter`):
- Each request's prompt is encoded and middle-truncated to fit `max_length` with its generation budget; requests
  are taken longest first. The cache has `batch_size` rows (one more, a staging row, when some request asks for
  n > 1 samples), sized once for the longest prompt + budget and kept across calls while it fits.
- A free row takes the next request at once: its prompt is prefilled alone into the row (slices over the cache, no
  padding) and its first token sampled from the prompt's last logits. A request's n samples share one prefill: the
  prompt goes into the staging row and is copied into a free row per sample as rows free up.
- Every step decodes one token for rows [0, bucket) (bucket: the next power of two above the highest busy row,
  capped at batch_size; a CUDA graph per bucket and per whether NSA's phi runs), samples on the device
  (runtime/sampling.py: counter-based randomness from each row's seed and step, so a sample depends only on its
  request and seed, never on the batch), and copies the new tokens to the host once (the step's one sync).
- Stop sequences are checked on a window of the newest tokens only; EOS ends a row without being counted.
Timings per request: prefill_ms of its own prefill; decode tokens/s over the wall time its rows were decoding; decode ms
per step (per output token after the first). Its rows' decode steps also give the KV bytes a step reads and the share
of the context it attends, from the model's config (model_adapters/decode_cost.py).
`warm_up()` compiles the kernels and captures the graphs before the first request (its seconds: `compile_s`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from nsa_eval.model_adapters.base import Generation, GenerationRequest, LanguageModel
from nsa_eval.model_adapters.decode_cost import DecodeCost, StepCost
from nsa_eval.model_adapters.hf import ForwardScoring
from nsa_eval.model_adapters.prompts import PromptTokens, cut_at_stop, eos_ids, truncate_middle
from nsa_eval.model_adapters.runtime.cache import SlotCache
from nsa_eval.model_adapters.runtime.model import DEFAULT_PREFILL_CHUNK, Transformer
from nsa_eval.model_adapters.runtime.sampling import row_seed, sample_tokens

CAPACITY_STEP = 1024  # cache positions are allocated in multiples of this, so nearby lengths reuse one cache


@dataclass
class _Row:
    """One sample of a request, decoding in a cache row: its new tokens (a stop sequence's included, EOS not)."""

    request: "_Request"
    sample: int
    tokens: list[int] = field(default_factory=list)
    finish: str = "length"
    started: float = 0.0
    ended: float = 0.0
    decode_s: float = 0.0  # wall time of the decode steps it took part in (not of other rows' prefills)
    steps: int = 0  # decode steps it took part in (its first token comes from the prefill)


@dataclass
class _Request:
    """A request being answered: prompt ids after truncation, samples still to start, rows that have finished."""

    index: int
    spec: GenerationRequest
    ids: list[int]
    truncated: bool
    to_start: list[int]
    rows: int
    done: list[_Row] = field(default_factory=list)
    prefill_ms: float = 0.0
    logits: torch.Tensor | None = None  # the prompt's last logits [V], while samples wait in the staging row


@dataclass
class EngineStats:
    """What the engine did since it was made: seconds and tokens of prefill and decode (decode_tokens: tokens
    the steps produced for busy rows; row_steps: busy rows summed over steps), and the steps per batch bucket."""

    prefill_s: float = 0.0
    prefill_tokens: int = 0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    buckets: dict[int, int] = field(default_factory=dict)


class _RowSettings:
    """Each row's sampling settings on the device: temperature, top_p, seed, step (tokens it has generated)."""

    def __init__(self, slots: int, device: torch.device):
        self.temperature = torch.zeros(slots, dtype=torch.float32, device=device)
        self.top_p = torch.ones(slots, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(slots, dtype=torch.long, device=device)
        self.steps = torch.zeros(slots, dtype=torch.long, device=device)
        self.sampled = [False] * slots  # rows that sample (temperature > 0), on the host

    def set(self, slot: int, request: GenerationRequest, sample: int) -> None:
        self.sampled[slot] = request.temperature > 0
        self.temperature[slot] = float(request.temperature)
        self.top_p[slot] = float(request.top_p)
        self.seeds[slot] = row_seed(request.seed, sample)
        self.steps[slot] = 0

    def sample(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """logits [n, V] of the rows `rows` -> their tokens [n]; their steps advance by one (graph-safe)."""
        tokens = sample_tokens(logits, self.temperature[rows], self.top_p[rows], self.seeds[rows], self.steps[rows])
        self.steps[rows] += 1
        return tokens

    def head(self, rows: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
        """What turns a decode step's logits [rows, V] into tokens, run in the step's CUDA graph, and its graph key:
        the argmax alone when no row of [0, rows) samples, else the sampler."""
        if any(self.sampled[:rows]):
            return (lambda logits: self.sample(logits, slice(0, rows))), "sample"
        return (lambda logits: logits.argmax(-1)), "greedy"


class Engine(PromptTokens, ForwardScoring, LanguageModel):
    """A runtime model and its tokenizer behind the LanguageModel interface (module docstring).

    max_length: prompt + generation budget in tokens (default: the model's max_position_embeddings).
    batch_size: cache rows decoding at once (also the batch of log-likelihood forward passes).
    """

    streams = True  # generate_iter below: continuous batching, requests taken while it runs, every token reported

    def __init__(self, model: Transformer, tokenizer: Any, name: str, max_length: int | None = None,
                 batch_size: int = 8, generation_config: Any = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = model.device
        model_max = model.config.max_position_embeddings
        if max_length is not None and max_length > model_max:
            raise ValueError(f"--max-length {max_length} exceeds {name}'s max_position_embeddings ({model_max}); "
                             f"use --max-length {model_max} or less")
        self.max_length = max_length or model_max
        self.batch_size = max(1, batch_size)
        self.chat = getattr(tokenizer, "chat_template", None) is not None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_ids = eos_ids(model.config, tokenizer, generation_config)
        self.cache: SlotCache | None = None
        self.compile_s = 0.0  # seconds of warm-up (kernel compiles, graph captures), apart from every sample's time
        self.stats = EngineStats()

    @property
    def prefill_chunk(self) -> int | None:
        return self.model.prefill_chunk

    @property
    def decode_cost(self) -> DecodeCost:
        """What a decode step reads and attends, from the model's config and dtype (model_adapters/decode_cost.py)."""
        return DecodeCost.of_config(self.model.config, self.model.dtype.itemsize)

    def describe(self) -> dict[str, Any]:
        # no dtype: run.json has always recorded the run's --dtype for the engine (older runs' hashes hold)
        return {"device": str(self.device), "batch_size": self.batch_size, "prefill_chunk": self.model.prefill_chunk,
                "attention": self.model.config.attention}

    def _target_logprobs(self, inputs: list[int], targets: list[int]) -> list[float]:
        """One rolling window's target log-probabilities (ForwardScoring.loglikelihood_rolling) through the model's
        own prefill, for full, NSA and sparse attention alike, with the LM head in slices (`window_logprobs`)."""
        ids = torch.tensor(inputs, dtype=torch.long, device=self.device)
        return self.model.window_logprobs(ids, torch.tensor(targets, dtype=torch.long, device=self.device)).tolist()

    # ---- generation ---------------------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        results: list[Generation | None] = [None] * len(requests)
        for index, generation in self.generate_iter(requests):
            results[index] = generation
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def generate_iter(self, requests: list[GenerationRequest],
                      more: Callable[[], list[GenerationRequest]] | None = None,
                      on_token: Callable[[int, int, list[int], bool], None] | None = None,
                      ) -> Iterator[tuple[int, Generation]]:
        """(index into requests, its Generation) as each request finishes, in the order they finish.

        more: for a server, polled once per step for requests that arrived meanwhile (numbered after the earlier
        ones; served first come, first served, in a cache sized for max_length); the call returns when no request
        is left. on_token(index, sample, tokens so far, done): after every token a row takes (streaming)."""
        if not requests and more is None:
            return
        queue = [self._request(i, r) for i, r in enumerate(requests)]
        if more is None:  # longest first: the cache fits them, and similar lengths decode together
            queue.sort(key=lambda q: len(q.ids))
            cache = self._cache(max(len(q.ids) + q.spec.max_new_tokens for q in queue) + 1)
        else:  # first come, first served: pop() takes the earliest
            queue.reverse()
            cache = self._cache(self.max_length + 1)
        count = len(requests)
        slots, staging = self.batch_size, self.batch_size  # the staging row follows the decoding rows
        settings = self.settings
        rows: list[_Row | None] = [None] * slots
        staged: _Request | None = None  # the request whose prompt sits in the staging row
        while True:
            for request in more() if more is not None else ():
                queue.insert(0, self._request(count, request))
                count += 1
            if not (queue or staged is not None or any(r is not None for r in rows)):
                return
            for slot in range(slots):  # every free row takes the next sample
                while rows[slot] is None and (staged is not None or queue):
                    if staged is None and queue[-1].rows > 1:
                        staged = queue.pop()
                        staged.logits = self._prefill(staged, cache, staging)
                    request = staged if staged is not None else queue.pop()
                    row = self._start(request, cache, slot, staging if request is staged else None, settings)
                    if request is staged and not staged.to_start:
                        staged.logits, staged = None, None
                    if on_token is not None:
                        on_token(request.index, row.sample, row.tokens, bool(row.ended))
                    if row.ended:  # finished on its first token
                        finished = self._finish(row)
                        if finished is not None:
                            yield finished
                    else:
                        rows[slot] = row
            busy = [slot for slot in range(slots) if rows[slot] is not None]
            if not busy:
                continue
            bucket = min(slots, 1 << (max(busy)).bit_length())
            step_start = time.perf_counter()
            new = self.model.decode(cache, bucket, *settings.head(bucket)).tolist()  # the step's one host sync
            now = time.perf_counter()
            for slot in busy:
                rows[slot].decode_s += now - step_start
                rows[slot].steps += 1
            self.stats.decode_s += now - step_start
            self.stats.decode_steps += 1
            self.stats.decode_tokens += len(busy)
            self.stats.buckets[bucket] = self.stats.buckets.get(bucket, 0) + 1
            for slot in busy:
                row = rows[slot]
                done = self._add_token(row, new[slot], now)
                if on_token is not None:
                    on_token(row.request.index, row.sample, row.tokens, done)
                if done:
                    rows[slot] = None
                    cache.set_active([slot], False)
                    finished = self._finish(row)
                    if finished is not None:
                        yield finished

    def prompt_ids(self, request: GenerationRequest) -> tuple[list[int], bool]:
        """The prompt tokens a request is prefilled with: encoded, cut in the middle to leave its max_new_tokens
        within max_length -> (ids, whether it was cut)."""
        budget = self.max_length - request.max_new_tokens
        if budget < 1 or request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {request.max_new_tokens} leaves no room for a prompt in --max-length "
                             f"{self.max_length}" if budget < 1 else "max_new_tokens must be at least 1")
        return truncate_middle(self.encode(request.prompt), budget)

    def _request(self, index: int, request: GenerationRequest) -> _Request:
        ids, cut = self.prompt_ids(request)
        samples = 1 if request.temperature <= 0 else request.n  # greedy: one row, its text repeated n times
        return _Request(index, request, ids, cut, list(range(samples)), samples)

    def _prefill(self, request: _Request, cache: SlotCache, row: int) -> torch.Tensor:
        """The request's prompt into cache row `row` -> its last logits [V]; records prefill_ms."""
        ids = torch.tensor(request.ids, dtype=torch.long, device=self.device)
        _sync(self.device)
        start = time.perf_counter()
        logits = self.model.prefill(ids, cache, row)
        _sync(self.device)
        seconds = time.perf_counter() - start
        request.prefill_ms = seconds * 1e3
        self.stats.prefill_s += seconds
        self.stats.prefill_tokens += len(request.ids)
        return logits

    def _start(self, request: _Request, cache: SlotCache, slot: int, staging: int | None,
               settings: _RowSettings) -> _Row:
        """The next sample of `request` in row `slot`: prefilled there, or copied from the staging row; its first
        token sampled from the prompt's logits."""
        sample = request.to_start.pop(0)
        if staging is None:
            logits = self._prefill(request, cache, slot)
        else:
            cache.copy_row(staging, slot)
            cache.set_active([slot], True)
            logits = request.logits
        settings.set(slot, request.spec, sample)
        first = settings.sample(logits[None], slice(slot, slot + 1))
        cache.ids[slot] = first[0]
        row = _Row(request, sample, started=time.perf_counter())
        if self._add_token(row, int(first[0]), row.started):
            cache.set_active([slot], False)
        return row

    def _add_token(self, row: _Row, token: int, now: float) -> bool:
        """Take a row's new token; True when the row is done (EOS, a stop sequence, or its budget)."""
        spec = row.request.spec
        if token in self.eos_ids:
            row.finish = "stop"
        else:
            row.tokens.append(token)
            if spec.stop and self._stopped(row.tokens, spec.stop):
                row.finish = "stop"
            elif len(row.tokens) < spec.max_new_tokens:
                return False
        row.ended = now
        return True

    def _stopped(self, tokens: list[int], stop: list[str]) -> bool:
        """Whether a stop sequence ends within the newest tokens: only a window of them is decoded (a stop sequence
        of L characters spans at most L tokens; the margin covers tokens that decode to partial characters)."""
        window = 2 * max(len(s) for s in stop) + 8
        return cut_at_stop(self.tokenizer.decode(tokens[-window:], skip_special_tokens=True), stop) is not None

    def _finish(self, row: _Row) -> tuple[int, Generation] | None:
        """Record a finished row; the request's Generation once all its rows are done."""
        request = row.request
        request.done.append(row)
        if len(request.done) < request.rows:
            return None
        done = sorted(request.done, key=lambda r: r.sample)
        texts = []
        for r in done:
            text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
            cut = cut_at_stop(text, request.spec.stop)
            texts.append(text if cut is None else cut)
        counts, finish = [len(r.tokens) for r in done], [r.finish for r in done]
        if request.rows == 1 and request.spec.n > 1:  # greedy: every sample is the same text
            texts, counts, finish = (x * request.spec.n for x in (texts, counts, finish))
        seconds = max(r.decode_s for r in done)  # its rows decode side by side
        generated = sum(len(r.tokens) for r in done)
        cost_model = self.decode_cost
        cost = sum((cost_model.over_steps(len(request.ids), r.steps) for r in done), StepCost())
        step_s = sum(r.decode_s for r in done)
        return request.index, Generation(
            texts=texts, new_tokens=counts, finish_reasons=finish, prompt_tokens=len(request.ids),
            truncated=request.truncated, prefill_ms=request.prefill_ms,
            decode_tokens_per_s=generated / seconds if seconds > 0 else 0.0, decode_steps=cost.steps,
            decode_ms_per_token=step_s * 1e3 / cost.steps if cost.steps else None,
            kv_bytes_per_step=cost.kv_bytes_per_step, attended_share=cost.mean_attended_share)

    # ---- the cache and the warm-up ------------------------------------------------------------------------

    def _cache(self, positions: int) -> SlotCache:
        """The cache (batch_size rows and a staging row) with room for `positions` per row: the current one when it
        fits, else a new one (allocated in steps of CAPACITY_STEP, at most max_length + 1), then warmed up."""
        if self.cache is not None and self.cache.capacity >= positions and self.cache.slots == self.batch_size + 1:
            return self.cache
        capacity = min(-(-positions // CAPACITY_STEP) * CAPACITY_STEP, self.max_length + 1)
        self.cache = None  # let the old one go before the new one is allocated
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.cache = self.model.new_cache(self.batch_size + 1, max(capacity, positions))
        self.settings = _RowSettings(self.cache.slots, self.device)  # its tensors are read by the captured graphs
        self.warm_up()
        return self.cache

    @torch.no_grad()
    def warm_up(self) -> float:
        """On CUDA: compile every kernel a run will use and capture the decode graphs of every bucket, before any
        request is timed (prompts of lengths that cover the kernels' integer specialisations, first and later
        slices; decode steps that do and do not complete a compressed block). Adds its seconds to compile_s."""
        cache = self.cache
        if cache is None or self.device.type != "cuda":
            return 0.0
        start = time.perf_counter()
        c = self.model.config
        chunk = self.model.prefill_chunk or DEFAULT_PREFILL_CHUNK
        vocab = c.vocab_size
        lengths = [16, 17, chunk + 16, chunk + 17, max(c.block_len, 64) + 5]
        for n in lengths:
            if n + 2 <= cache.capacity:
                self.model.prefill(torch.randint(0, vocab, (n,), device=self.device), cache, 0)
        buckets = sorted({min(self.batch_size, 1 << b) for b in range(self.batch_size.bit_length() + 1)})
        settings = self.settings
        greedy, sampled = GenerationRequest(prompt=""), GenerationRequest(prompt="", temperature=1.0)
        for rows in buckets:
            for length in (c.block_len - 1, c.block_len):  # the next token completes a block, then it does not
                if length + 3 > cache.capacity:
                    continue
                cache.set_active(list(range(rows)), True)
                for request in (greedy, sampled):  # both heads: the argmax alone, and the sampler
                    for r in range(rows):
                        settings.set(r, request, 0)
                    for _ in range(2):  # capture, then replay
                        cache.lengths[:rows] = length
                        cache.host_lengths[:rows] = [length] * rows
                        cache.ids[:rows] = torch.randint(0, vocab, (rows,), device=self.device)
                        self.model.decode(cache, rows, *settings.head(rows))
        cache.set_active(list(range(cache.slots)), False)
        cache.lengths.fill_(1)
        cache.host_lengths = [0] * cache.slots
        _sync(self.device)
        seconds = time.perf_counter() - start
        self.compile_s += seconds
        return seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
