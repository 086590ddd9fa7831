"""The request-level interface every backend implements (as lm-evaluation-harness's `LM`).

Tasks never see tensors: the runner turns a task's samples into these requests, a backend answers
them, and the runner hands the plain texts / log-probabilities back to the task for scoring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Union, runtime_checkable

ChatMessages = list[dict[str, str]]  # [{"role": "user", "content": "..."}, ...]
Prompt = Union[str, ChatMessages]


@dataclass
class GenerationRequest:
    """One prompt to complete.

    prompt: plain text (sent as is) or chat messages (rendered with the model's chat template).
    n: number of samples; with temperature 0 (greedy) every sample is the same text.
    seed: makes sampled generations reproducible, request by request (not batch-order dependent).
    """

    prompt: Prompt
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0


@dataclass
class Generation:
    """The answer to one GenerationRequest.

    texts: n completions, each cut before the first stop sequence.
    new_tokens: tokens generated per completion (those of a stop sequence included; EOS not counted).
    finish_reasons: per completion, "stop" (a stop sequence or EOS) or "length" (max_new_tokens).
    prompt_tokens: prompt length in tokens after truncation; truncated: whether the middle was cut.
    prefill_ms: wall time of the prompt's forward pass in milliseconds.
    decode_tokens_per_s: generated tokens per second of decode time, over all n completions.
    """

    texts: list[str]
    new_tokens: list[int]
    finish_reasons: list[str]
    prompt_tokens: int
    truncated: bool = False
    prefill_ms: float = 0.0
    decode_tokens_per_s: float = 0.0


@dataclass
class LoglikelihoodRequest:
    """log P(continuation | context), summed over the continuation's tokens."""

    context: Prompt
    continuation: str


@dataclass
class Loglikelihood:
    """logprob: summed log-probability in nats; is_greedy: every continuation token was the argmax."""

    logprob: float
    is_greedy: bool
    continuation_tokens: int
    truncated: bool = False


@runtime_checkable
class LanguageModel(Protocol):
    name: str  # what reports print
    max_length: int  # prompt + generation budget in tokens

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]: ...

    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[Loglikelihood]: ...

    def count_tokens(self, text: Prompt) -> int: ...  # chat messages: counted with the chat template applied


class ModelLoadError(ValueError):
    """A model spec that cannot be loaded; the message is one line naming the problem and the fix."""
