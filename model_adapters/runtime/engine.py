"""The generation engine: the LanguageModel that runs `hf:` Llama-family checkpoints, `nsa:` checkpoints and
`--attention sparse` on the runtime's model (runtime/model.py), with continuous batching over a static slot cache.

How requests run (`add_request`, then `step` until `has_unfinished` is False; `generate` does both):
- Each request's prompt is encoded and middle-truncated to fit `max_length` with its generation budget when it is
  added. Which sample takes which cache slot is the scheduler's (runtime/scheduler.py: a wave longest first, later
  arrivals first come first served, n samples of a prompt through the staging slot). The cache has `batch_size`
  slots and a staging slot, sized for the waiting requests when no slot is busy and kept while it fits (`reserve`
  sizes it ahead, as a server does).
- Slots that take requests in the same step have their prompts prefilled together: packed along T into forwards of
  at most `batch_tokens` tokens (Transformer.prefill_packed: no padding, each prompt into its own slot), a prompt
  longer than that alone in slices over the cache (Transformer.prefill); each sample's first token is sampled from its
  prompt's last logits. A sample of a staged prompt copies the staging slot.
- Every step decodes one token for slots [0, bucket) (a CUDA graph per bucket and per whether NSA's phi runs:
  runtime/graphs.py), samples on the device
  (runtime/sampling.py: counter-based randomness from each slot's seed and step, so a sample depends only on its
  request and seed, never on the batch), and copies the new tokens to the host once (the step's one sync).
- The output step (runtime/output.py) checks stop sequences on a window of the newest tokens only; EOS ends a sample
  without being counted.
Timings per request: prefill_ms of its own prefill (of a packed prefill, its share by tokens); decode tokens/s over
the wall time its samples were decoding; decode ms per step (per output token after the first). Its samples' decode steps also give the KV
bytes a step reads and the share
of the context it attends, from the model's config (model_adapters/decode_cost.py).
`warm_up()` compiles the kernels and captures the graphs before the first request (its seconds: `compile_s`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from nsa_eval.model_adapters.base import Generation, GenerationRequest, LanguageModel, StepOutput, TokenUpdate
from nsa_eval.model_adapters.decode_cost import DecodeCost
from nsa_eval.model_adapters.prompts import PromptTokens, eos_ids, truncate_middle
from nsa_eval.model_adapters.runtime.cache import SlotCache
from nsa_eval.model_adapters.runtime.model import DEFAULT_PREFILL_CHUNK, Transformer
from nsa_eval.model_adapters.runtime.output import OutputStep
from nsa_eval.model_adapters.runtime.scheduler import DecodingSample, RequestState, Scheduler
from nsa_eval.model_adapters.runtime.sampling import row_seed, sample_tokens
from nsa_eval.model_adapters.scoring import PackedScoring, token_packs

CAPACITY_STEP = 1024  # cache positions are allocated in multiples of this, so nearby lengths reuse one cache
# tokens per packed forward on the CPU unless --prefill-chunk says: SmolLM2's pointwise ops over a pack of 4k tokens
# leave the caches and run 2-3x slower (results/bench/cpu-varlen-batching.md); packs of about 1k still gain
CPU_BATCH_TOKENS = 1024


@dataclass
class EngineStats:
    """What the engine did since it was made: seconds and tokens of prefill and decode (decode_tokens: tokens
    the steps produced for busy slots), and the steps per batch bucket."""

    prefill_s: float = 0.0
    prefill_tokens: int = 0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    buckets: dict[int, int] = field(default_factory=dict)


class _SlotSettings:
    """Each slot's sampling settings on the device: temperature, top_p, seed, step (tokens it has generated)."""

    def __init__(self, slots: int, device: torch.device):
        self.temperature = torch.zeros(slots, dtype=torch.float32, device=device)
        self.top_p = torch.ones(slots, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(slots, dtype=torch.long, device=device)
        self.steps = torch.zeros(slots, dtype=torch.long, device=device)
        self.sampled = [False] * slots  # slots that sample (temperature > 0), on the host

    def set(self, slot: int, request: GenerationRequest, sample: int) -> None:
        self.sampled[slot] = request.temperature > 0
        self.temperature[slot] = float(request.temperature)
        self.top_p[slot] = float(request.top_p)
        self.seeds[slot] = row_seed(request.seed, sample)
        self.steps[slot] = 0

    def sample(self, logits: torch.Tensor, slots: slice) -> torch.Tensor:
        """logits [n, V] of the slots `slots` -> their tokens [n]; their steps advance by one (graph-safe)."""
        tokens = sample_tokens(logits, self.temperature[slots], self.top_p[slots], self.seeds[slots], self.steps[slots])
        self.steps[slots] += 1
        return tokens

    def head(self, bucket: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
        """What turns a decode step's logits [bucket, V] into tokens, run in the step's CUDA graph, and its graph key:
        the argmax alone when no slot of [0, bucket) samples, else the sampler."""
        if any(self.sampled[:bucket]):
            return (lambda logits: self.sample(logits, slice(0, bucket))), "sample"
        return (lambda logits: logits.argmax(-1)), "greedy"


class Engine(PromptTokens, PackedScoring, LanguageModel):
    """A runtime model and its tokenizer behind the LanguageModel interface (module docstring).

    max_length: prompt + generation budget in tokens (default: the model's max_position_embeddings).
    batch_size: cache slots decoding at once.
    batch_tokens: tokens per packed forward (prompts prefilled together, sequences scored together): the model's
    prefill_chunk when set, else DEFAULT_PREFILL_CHUNK on CUDA and CPU_BATCH_TOKENS elsewhere.
    """

    streams = True  # step() below: continuous batching, requests taken while others decode, every token reported
    scoring_batch = 64  # log-likelihood samples per call: PackedScoring packs their sequences by tokens

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
        self.scheduler = Scheduler(max(1, batch_size))
        self.chat = getattr(tokenizer, "chat_template", None) is not None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_ids = eos_ids(model.config, tokenizer, generation_config)
        self.cache: SlotCache | None = None
        self.output = OutputStep(tokenizer, self.eos_ids, self.decode_cost)
        self.compile_s = 0.0  # seconds of warm-up (kernel compiles, graph captures), apart from every sample's time
        self.stats = EngineStats()
        self.max_batch_tokens: int | None = None  # batch_tokens when set (tests, `nsa-eval bench batching`)

    @property
    def batch_size(self) -> int:
        return self.scheduler.slots

    @batch_size.setter
    def batch_size(self, slots: int) -> None:
        self.scheduler.resize(max(1, slots))

    @property
    def prefill_chunk(self) -> int | None:
        return self.model.prefill_chunk

    @property
    def batch_tokens(self) -> int:
        """Tokens one packed forward holds (class docstring): max_batch_tokens, else prefill_chunk, else
        DEFAULT_PREFILL_CHUNK on CUDA and CPU_BATCH_TOKENS elsewhere. 1 prefills and scores one sequence at a time."""
        default = DEFAULT_PREFILL_CHUNK if self.device.type == "cuda" else CPU_BATCH_TOKENS
        return self.max_batch_tokens or self.model.prefill_chunk or default

    @property
    def decode_cost(self) -> DecodeCost:
        """What a decode step reads and attends, from the model's config and dtype (model_adapters/decode_cost.py)."""
        return DecodeCost.of_config(self.model.config, self.model.dtype.itemsize)

    def describe(self) -> dict[str, Any]:
        # no dtype: run.json has always recorded the run's --dtype for the engine (older runs' hashes hold)
        return {"device": str(self.device), "batch_size": self.batch_size, "prefill_chunk": self.model.prefill_chunk,
                "attention": self.model.config.attention}

    # ---- generation ---------------------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        """Every request's Generation, in order (add_request each, then step until none is left)."""
        indices = [self.add_request(request) for request in requests]
        finished: dict[int, Generation] = {}
        while self.has_unfinished():
            finished.update(self.step().finished)
        return [finished[index] for index in indices]

    def add_request(self, request: GenerationRequest) -> int:
        """Queue a request -> its index. Raises ValueError (one line) for a budget that leaves no room for a prompt."""
        ids, cut = self.prompt_ids(request)
        samples = 1 if request.temperature <= 0 else request.n  # greedy: one sample decoded, its text repeated n times
        index = self._added
        self._added += 1
        self.scheduler.add(RequestState(index, request, ids, cut, list(range(samples)), samples))
        return index

    def has_unfinished(self) -> bool:
        return not self.scheduler.idle()

    def abort(self) -> None:
        """Drop every request not finished yet; their slots stop decoding."""
        if self.cache is not None:
            self.cache.set_active(self.scheduler.busy(), False)
        self.scheduler = Scheduler(self.scheduler.slots)

    def reserve(self, positions: int) -> None:
        """Size the cache for slots of `positions` now (a server reserves max_length + 1, so no request waits for a
        regrowth and the warm-up happens before the first one)."""
        self._cache(positions)

    @torch.no_grad()
    def step(self) -> StepOutput:
        """Free slots take waiting samples (their prompts prefilled together, each sample's first token sampled), then one
        decode step for the busy slots -> every decoding sample's tokens after it, and the requests it finished."""
        out = StepOutput([], [])
        scheduler = self.scheduler
        if scheduler.idle():
            return out
        if not scheduler.busy() and scheduler.staged is None:
            self._cache(max(request.positions for request in scheduler.waiting))
        cache, settings, staging = self.cache, self.settings, self.batch_size  # the staging slot follows the others
        while True:  # until no slot's new sample ended on its first token (its slot then takes another)
            prefilled: list[tuple[int, DecodingSample]] = []  # samples whose prompts are prefilled together below
            for admission in scheduler.admit(lambda request: request.positions <= cache.capacity):
                request = admission.request
                decoding = DecodingSample(request, request.to_start.pop(0))
                if not admission.from_staging:
                    scheduler.place(admission.slot, decoding)  # held while its prompt waits for the others'
                    prefilled.append((admission.slot, decoding))
                    continue
                if admission.stage:
                    request.logits = self._prefill([request], cache, [staging])[0]
                cache.copy_slot(staging, admission.slot)
                cache.set_active([admission.slot], True)
                self._start(decoding, admission.slot, request.logits, cache, settings)
                if not request.to_start:
                    request.logits = None
                self._started(admission.slot, decoding, out)
            if not prefilled:
                break
            slots = [slot for slot, _ in prefilled]
            logits = self._prefill([decoding.request for _, decoding in prefilled], cache, slots)
            for (slot, decoding), prompt_logits in zip(prefilled, logits):
                scheduler.release(slot)
                self._start(decoding, slot, prompt_logits, cache, settings)
                self._started(slot, decoding, out)
        busy = scheduler.busy()
        if not busy:
            return out
        bucket = scheduler.bucket()
        step_start = time.perf_counter()
        new = self.model.decode(cache, bucket, *settings.head(bucket)).tolist()  # the step's one host sync
        now = time.perf_counter()
        self.stats.decode_s += now - step_start
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(busy)
        self.stats.buckets[bucket] = self.stats.buckets.get(bucket, 0) + 1
        for slot in busy:
            decoding = scheduler.decoding[slot]
            decoding.decode_s += now - step_start
            decoding.steps += 1
            done = self.output.take(decoding, new[slot], now)
            out.tokens.append(TokenUpdate(decoding.request.index, decoding.sample, decoding.tokens, done))
            if done:
                scheduler.release(slot)
                cache.set_active([slot], False)
                self._finished(decoding, out)
        return out

    def _started(self, slot: int, decoding: DecodingSample, out: StepOutput) -> None:
        """A sample that has its first token: reported; placed in its slot, or finished when that token ended it."""
        out.tokens.append(TokenUpdate(decoding.request.index, decoding.sample, decoding.tokens, bool(decoding.ended)))
        if decoding.ended:  # finished on its first token
            self._finished(decoding, out)
        else:
            self.scheduler.place(slot, decoding)

    def _finished(self, decoding: DecodingSample, out: StepOutput) -> None:
        finished = self.output.finish(decoding)
        if finished is not None:
            out.finished.append(finished)

    def prompt_ids(self, request: GenerationRequest) -> tuple[list[int], bool]:
        """The prompt tokens a request is prefilled with: encoded, cut in the middle to leave its max_new_tokens
        within max_length -> (ids, whether it was cut)."""
        budget = self.max_length - request.max_new_tokens
        if budget < 1 or request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {request.max_new_tokens} leaves no room for a prompt in --max-length "
                             f"{self.max_length}" if budget < 1 else "max_new_tokens must be at least 1")
        return truncate_middle(self.encode(request.prompt), budget)

    def _prefill(self, requests: list[RequestState], cache: SlotCache, slots: list[int]) -> list[torch.Tensor]:
        """Request n's prompt into cache slot slots[n] -> each prompt's last logits [V]. The prompts go packed into
        forwards of at most batch_tokens tokens (a pack of one alone, in prefill slices); each request's prefill_ms
        is its pack's wall time times its share of the pack's tokens."""
        logits: list[torch.Tensor] = []
        for pack in token_packs([len(request.ids) for request in requests], self.batch_tokens):
            prompts = [torch.tensor(requests[i].ids, dtype=torch.long, device=self.device) for i in pack]
            _sync(self.device)
            start = time.perf_counter()
            if len(pack) == 1:
                logits.append(self.model.prefill(prompts[0], cache, slots[pack[0]]))
            else:
                logits += self.model.prefill_packed(prompts, cache, [slots[i] for i in pack]).unbind(0)
            _sync(self.device)
            seconds = time.perf_counter() - start
            tokens = sum(len(requests[i].ids) for i in pack)
            for i in pack:
                requests[i].prefill_ms = seconds * 1e3 * len(requests[i].ids) / tokens
            self.stats.prefill_s += seconds
            self.stats.prefill_tokens += tokens
        return logits

    def _start(self, decoding: DecodingSample, slot: int, logits: torch.Tensor, cache: SlotCache,
               settings: _SlotSettings) -> None:
        """Slot `slot` (its prompt in the cache) begins `decoding`: its first token sampled from the prompt's
        last logits [V]; the slot stops decoding when that token ends the sample."""
        settings.set(slot, decoding.request.asked, decoding.sample)
        first = settings.sample(logits[None], slice(slot, slot + 1))
        cache.ids[slot] = first[0]
        decoding.started = time.perf_counter()
        if self.output.take(decoding, int(first[0]), decoding.started):
            cache.set_active([slot], False)

    # ---- the cache and the warm-up ------------------------------------------------------------------------

    def _cache(self, positions: int) -> SlotCache:
        """The cache (batch_size slots and a staging slot) with room for `positions` per slot: the current one when it
        fits, else a new one (allocated in steps of CAPACITY_STEP, at most max_length + 1), then warmed up."""
        if self.cache is not None and self.cache.capacity >= positions and self.cache.slots == self.batch_size + 1:
            return self.cache
        capacity = min(-(-positions // CAPACITY_STEP) * CAPACITY_STEP, self.max_length + 1)
        self.cache = None  # let the old one go before the new one is allocated
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.cache = self.model.new_cache(self.batch_size + 1, max(capacity, positions))
        self.settings = _SlotSettings(self.cache.slots, self.device)  # its tensors are read by the captured graphs
        self.warm_up()
        return self.cache

    @torch.no_grad()
    def warm_up(self) -> float:
        """On CUDA: compile every kernel a run will use and capture the decode graphs of every bucket, before any
        request is timed (prompts of lengths that cover the kernels' integer specialisations, first and later
        slices, packed prompts; decode steps that do and do not complete a compressed block). Adds its seconds to
        compile_s."""
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
        for pack in ([16, 17], [16, 16, 17]):  # packed prompts: the kernels' cu_seqlens variants
            if len(pack) <= cache.slots and max(pack) + 2 <= cache.capacity:
                self.model.prefill_packed([torch.randint(0, vocab, (n,), device=self.device) for n in pack], cache,
                                          list(range(len(pack))))
        buckets = sorted({min(self.batch_size, 1 << b) for b in range(self.batch_size.bit_length() + 1)})
        settings = self.settings
        greedy, sampled = GenerationRequest(prompt=""), GenerationRequest(prompt="", temperature=1.0)
        for bucket in buckets:
            for length in (c.block_len - 1, c.block_len):  # the next token completes a block, then it does not
                if length + 3 > cache.capacity:
                    continue
                cache.set_active(list(range(bucket)), True)
                for request in (greedy, sampled):  # both heads: the argmax alone, and the sampler
                    for slot in range(bucket):
                        settings.set(slot, request, 0)
                    for _ in range(2):  # capture, then replay
                        cache.lengths[:bucket] = length
                        cache.host_lengths[:bucket] = [length] * bucket
                        cache.ids[:bucket] = torch.randint(0, vocab, (bucket,), device=self.device)
                        self.model.decode(cache, bucket, *settings.head(bucket))
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
