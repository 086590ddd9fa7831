"""The request-level interface every backend implements (as lm-evaluation-harness's `LM`).

Tasks never see tensors: the runner turns a task's samples into these requests, a backend answers
them, and the runner hands the plain texts / log-probabilities back to the task for scoring.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Union

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
    decode_steps: decode steps over all n completions (each after a completion's first token, which its prefill gives).
    decode_ms_per_token: wall milliseconds per decode step (time per output token after the first; on a batched
        backend a step decodes the other samples of its batch too).
    kv_bytes_per_step: KV cache bytes one decode step reads, the mean over decode_steps; attended_share: the share of
        the context's tokens a step attends, the mean over decode_steps (model_adapters/decode_cost.py says what is
        counted). None where the backend cannot say (a server, vLLM) or no step ran.
    """

    texts: list[str]
    new_tokens: list[int]
    finish_reasons: list[str]
    prompt_tokens: int
    truncated: bool = False
    prefill_ms: float = 0.0
    decode_tokens_per_s: float = 0.0
    decode_steps: int = 0
    decode_ms_per_token: float | None = None
    kv_bytes_per_step: float | None = None
    attended_share: float | None = None


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


@dataclass
class RollingLoglikelihoodRequest:
    """log P(token | the tokens before it) for every token of a whole text, as lm-eval's loglikelihood_rolling: the
    text is encoded without special tokens, its first token is predicted from a prefix token (the tokenizer's BOS,
    else its EOS), and a text longer than the backend's max_length is scored in windows of max_length tokens
    (`prompts.rolling_windows`, lm-eval's get_rolling_token_windows + make_disjoint_window).

    stride: None for lm-eval's disjoint windows (each window after the first predicts the next max_length tokens,
    with its own tokens as the only context); S < max_length for sliding windows (each window after the first
    predicts S new tokens after max_length - S tokens of context, lm-eval's context_len = max_length - S + 1).
    """

    text: str
    stride: int | None = None


@dataclass
class RollingLoglikelihood:
    """The answer to a RollingLoglikelihoodRequest: per token of the text, in order, its log-probability in nats and
    its position in the window that predicted it (0: predicted from the prefix token alone; p: from the p + 1
    tokens before it in its window). windows: forward passes it took."""

    logprobs: list[float]
    positions: list[int]
    windows: int

    @property
    def logprob(self) -> float:
        """The text's summed log-probability (what lm-eval's loglikelihood_rolling returns)."""
        return float(sum(self.logprobs))


@dataclass
class TokenUpdate:
    """A sample's tokens so far after a step of a streaming backend (`LanguageModel.step`)."""

    index: int  # the request's, from add_request
    sample: int
    tokens: list[int]  # the sample's own list, as the step left it (no copy per step): copy it to keep it
    done: bool


@dataclass
class StepOutput:
    """What one `LanguageModel.step` did: every decoding sample's tokens after it, and the requests it finished as
    (index, Generation)."""

    tokens: list[TokenUpdate]
    finished: list[tuple[int, Generation]]


class LanguageModel(ABC):
    """What every backend is to the harness. A backend sets `name` (what reports print) and `max_length` (prompt +
    generation budget in tokens) and implements generate, loglikelihood and count_tokens; the rest has defaults."""

    name: str
    max_length: int
    chat = False  # whether tasks send chat messages by default (the tokenizer has a chat template)
    compile_s = 0.0  # seconds of warm-up (kernel compiles, graph captures), recorded apart from the samples' timings
    streams = False  # step() is the backend's own: one token per busy slot, requests join while others decode
    scoring_batch: int | None = None  # log-likelihood samples the runner hands over at once (None: --batch-size)
    _waiting: list[tuple[int, GenerationRequest]] | None = None  # the default step()'s queue
    _added = 0  # requests add_request has numbered

    @abstractmethod
    def generate(self, requests: list[GenerationRequest]) -> list[Generation]: ...

    @abstractmethod
    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[Loglikelihood]: ...

    @abstractmethod
    def count_tokens(self, text: Prompt) -> int: ...  # chat messages: counted with the chat template applied

    def add_request(self, request: GenerationRequest) -> int:
        """Queue a request for `step` -> its index (counted from 0 over the backend's life)."""
        if self._waiting is None:
            self._waiting = []
        index = self._added
        self._added += 1
        self._waiting.append((index, request))
        return index

    def step(self) -> StepOutput:
        """Advance the queued requests. A backend that `streams` decodes one token per busy slot and reports every
        decoding sample's tokens; here generate() answers every queued request at once and no tokens are reported."""
        waiting, self._waiting = self._waiting or [], []
        generations = self.generate([request for _, request in waiting]) if waiting else []
        return StepOutput([], [(index, generation) for (index, _), generation in zip(waiting, generations)])

    def has_unfinished(self) -> bool:
        return bool(self._waiting)

    def abort(self) -> None:
        """Drop every request not finished yet (a caller that stops stepping early)."""
        self._waiting = []

    def loglikelihood_rolling(self, requests: list[RollingLoglikelihoodRequest]) -> list[RollingLoglikelihood]:
        """Every token of whole texts scored (perplexity), where the backend holds the model's logits (hf:, smollm2,
        nsa:); here a ValueError line, whatever the requests (an empty list checks a backend before a run)."""
        raise ValueError(f"{self.name} ({type(self).__name__}) does not score whole documents (perplexity, "
                         "loglikelihood_rolling); run perplexity tasks on smollm2, hf: or nsa: checkpoints")

    def describe(self) -> dict[str, Any]:
        """What run.json records of the backend, where it knows it: device, dtype, batch_size, prefill_chunk and
        attention (the checkpoint's own kind); the run's settings stand in for what is left out."""
        return {}


class ModelLoadError(ValueError):
    """A model spec that cannot be loaded; the message is one line naming the problem and the fix."""
