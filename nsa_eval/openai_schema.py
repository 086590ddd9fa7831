"""The OpenAI API's request and answer shapes for `nsa-eval serve` (nsa_eval/serve.py): request fields read into
GenerationRequest fields, prompt and message forms, the errors the server answers with, and the answers cut into
server-sent-event chunks."""

from __future__ import annotations

import uuid
from typing import Any, Iterator

UNSUPPORTED = ("best_of", "logit_bias", "presence_penalty", "frequency_penalty", "suffix", "tools", "functions")


class RequestError(ValueError):
    """A request the server refuses: an HTTP status and an OpenAI-style error message."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


class ShuttingDown(RequestError):
    """The server was stopped (Ctrl-C, SIGTERM) before this request was answered."""

    def __init__(self) -> None:
        super().__init__(503, "the server is shutting down (Ctrl-C or SIGTERM); this request was not finished",
                         "server_error")


def stream_completion(answer: dict[str, Any], body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    head = {k: answer[k] for k in ("id", "object", "created", "model")}
    for choice in answer["choices"]:
        yield {**head, "choices": [{**choice, "finish_reason": None}]}
        yield {**head, "choices": [{"index": choice["index"], "text": "", "logprobs": None, "finish_reason": choice["finish_reason"]}]}
    if (body.get("stream_options") or {}).get("include_usage"):
        yield {**head, "choices": [], "usage": answer["usage"]}


def stream_chat(answer: dict[str, Any], body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    head = {**{k: answer[k] for k in ("id", "created", "model")}, "object": "chat.completion.chunk"}
    for choice in answer["choices"]:
        index = choice["index"]
        yield {**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        yield {**head, "choices": [{"index": index, "delta": {"content": choice["message"]["content"]}, "finish_reason": None}]}
        yield {**head, "choices": [{"index": index, "delta": {}, "finish_reason": choice["finish_reason"]}]}
    if (body.get("stream_options") or {}).get("include_usage"):
        yield {**head, "choices": [], "usage": answer["usage"]}


def request_fields(body: dict[str, Any], default_max_tokens: int | None) -> dict[str, Any]:
    """The GenerationRequest fields of an OpenAI request (OpenAI's defaults: temperature 1, top_p 1, n 1)."""
    def given(key: str, default: Any) -> Any:
        return default if body.get(key) is None else body[key]

    stop = given("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    try:
        max_tokens = given("max_tokens", default_max_tokens)
        fields = {
            "max_new_tokens": None if max_tokens is None else int(max_tokens),
            "temperature": float(given("temperature", 1.0)),
            "top_p": float(given("top_p", 1.0)),
            "n": int(given("n", 1)),
            "seed": int(given("seed", int.from_bytes(uuid.uuid4().bytes[:6], "big"))),
            "stop": [str(s) for s in stop],
        }
    except (TypeError, ValueError):
        raise RequestError(400, "max_tokens, temperature, top_p, n and seed must be numbers") from None
    if fields["n"] < 1 or (fields["max_new_tokens"] is not None and fields["max_new_tokens"] < 0):
        raise RequestError(400, "n must be at least 1 and max_tokens at least 0")
    return fields


def request_prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, or a list of those lists."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [prompt]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return list(prompt)
    raise RequestError(400, "prompt must be a string, a list of strings, or token ids")


def request_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages with text content (a list of text parts is joined)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list of {role, content}")
    out = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise RequestError(400, "each message needs a role and content")
        content = message.get("content") or ""
        if isinstance(content, list):
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise RequestError(400, "only text content parts are supported")
            content = "".join(p.get("text", "") for p in content)
        out.append({"role": str(message["role"]), "content": str(content)})
    return out


def cumulative_offsets(tokenizer: Any, ids: list[int]) -> list[int]:
    """Character offsets of token-id prompts: where each token's text starts in the decoded prompt."""
    offsets, position = [], 0
    for token in ids:
        offsets.append(position)
        position += len(tokenizer.decode([token]))
    return offsets
