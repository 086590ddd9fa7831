"""Which sample of which request decodes in which cache slot: the engine's scheduler, plain Python (no torch), kept
apart from the code that runs the model (runtime/engine.py) as in vLLM's v1 engine.

- Requests added while the engine is idle form a wave taken longest prompt first (similar lengths then decode
  together, and the cache is sized for the wave); requests added once the wave has started are taken after every
  request already waiting, first come first served.
- A free slot takes the next request's next sample at once. A request with n > 1 sampled completions is prefilled
  once into the staging slot and copied into a free slot per sample as slots free up.
- A request whose prompt and budget do not fit the current cache waits, and every request behind it, until no slot
  is busy; the engine then grows the cache (`fits`).
- Each decode step runs slots [0, bucket): the next power of two above the highest busy slot, at most `slots`.

A slot is one sequence's place in the cache (runtime/cache.py); a DecodingSample is what occupies it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from nsa_eval.model_adapters.base import GenerationRequest


@dataclass
class RequestState:
    """A request being answered: its prompt ids after truncation, samples still to start, samples that have finished."""

    index: int
    asked: GenerationRequest  # what the caller asked for: prompt, budget, stops, sampling
    ids: list[int]
    truncated: bool
    to_start: list[int]
    decoded_samples: int  # samples it decodes: n when sampled, 1 when greedy (its text is repeated n times)
    done: list["DecodingSample"] = field(default_factory=list)
    prefill_ms: float = 0.0
    logits: Any = None  # the prompt's last logits [V] (a tensor), while samples wait in the staging slot

    @property
    def positions(self) -> int:
        """Cache positions a slot needs for one of its samples: prompt, budget and the position the last step writes."""
        return len(self.ids) + self.asked.max_new_tokens + 1


@dataclass
class DecodingSample:
    """One sample of a request, decoding in a cache slot: its new tokens (a stop sequence's included, EOS not)."""

    request: RequestState
    sample: int
    tokens: list[int] = field(default_factory=list)
    finish: str = "length"
    started: float = 0.0
    ended: float = 0.0
    decode_s: float = 0.0  # wall time of the decode steps it took part in (not of other samples' prefills)
    steps: int = 0  # decode steps it took part in (its first token comes from the prefill)


@dataclass
class Admission:
    """A free slot taking a request's next sample. stage: prefill the request into the staging slot first;
    from_staging: the sample's prompt is copied from the staging slot (else it is prefilled into the slot itself)."""

    slot: int
    request: RequestState
    stage: bool
    from_staging: bool


class Scheduler:
    """The waiting requests, the staged one and the samples decoding in a cache of `slots` slots."""

    def __init__(self, slots: int):
        self.slots = slots
        self.decoding: list[DecodingSample | None] = [None] * slots  # by slot; None: free
        self.waiting: list[RequestState] = []  # pop() takes the next one
        self.staged: RequestState | None = None  # the request whose prompt sits in the staging slot
        self.started = False  # whether the current wave has begun taking slots

    def resize(self, slots: int) -> None:
        """Decode in `slots` slots from now on (only while none is busy or staged)."""
        if self.busy() or self.staged is not None:
            raise RuntimeError("the scheduler's slots change only while none is busy")
        self.slots, self.decoding = slots, [None] * slots

    def idle(self) -> bool:
        return not self.waiting and self.staged is None and not self.busy()

    def add(self, request: RequestState) -> None:
        if self.idle():
            self.started = False
        if self.started:
            self.waiting.insert(0, request)  # after every request already waiting
        else:
            self.waiting.append(request)

    def busy(self) -> list[int]:
        return [slot for slot, sample in enumerate(self.decoding) if sample is not None]

    def bucket(self) -> int:
        """Slots a decode step runs: the next power of two above the highest busy slot, at most `slots`."""
        return min(self.slots, 1 << max(self.busy()).bit_length())

    def admit(self, fits: Callable[[RequestState], bool]) -> Iterator[Admission]:
        """Every free slot takes the next sample, in slot order. The caller `place`s each admitted sample (or
        otherwise fills its slot) before asking for the next: the engine places a sample whose prompt waits for a packed
        prefill at once, and after the prefill places it again, or leaves the slot free when its first token ended it
        (the slot then takes another in a later round of the same step)."""
        if not self.started:  # a new wave: longest prompt first (a stable sort: equal lengths, the later added first)
            self.waiting.sort(key=lambda request: len(request.ids))
            self.started = True
        for slot in range(self.slots):
            while self.decoding[slot] is None and (self.staged is not None or self.waiting):
                stage = False
                if self.staged is None:
                    if not fits(self.waiting[-1]):
                        return  # it waits for the slots to drain and the cache to grow
                    if self.waiting[-1].decoded_samples > 1:
                        self.staged, stage = self.waiting.pop(), True
                request = self.staged if self.staged is not None else self.waiting.pop()
                from_staging = request is self.staged
                yield Admission(slot, request, stage, from_staging)
                if from_staging and not request.to_start:
                    self.staged = None

    def place(self, slot: int, sample: DecodingSample) -> None:
        self.decoding[slot] = sample

    def release(self, slot: int) -> None:
        self.decoding[slot] = None
