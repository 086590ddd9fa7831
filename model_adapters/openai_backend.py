"""`openai:URL#MODEL`: any OpenAI-compatible server (`vllm serve`, SGLang, `nsa-eval serve`) as a LanguageModel.

Spec: `openai:http://127.0.0.1:8000/v1#MODEL` with options as a query before the `#`:
`openai:http://127.0.0.1:8000/v1?tokenizer=/ckpt&concurrency=16#MODEL`.

- tokenizer=PATH   the served model's tokenizer (a local folder): count_tokens, middle truncation and the
                   context/continuation split of loglikelihood then match the model exactly. Without it, token
                   counts come from the server (`usage.prompt_tokens` of a 1-token completion) and loglikelihood
                   splits the echoed tokens at the context's character offset.
- concurrency=N    requests in flight at once (default 8); the runner's --batch-size is what it can overlap.
- timeout=S        seconds one HTTP request may take (default 600).
- retries=N        further tries after a connection error, a timeout, HTTP 429 or 5xx, or a malformed answer
                   (default 5), waiting backoff=S (default 1 s) doubled each time, at most 30 s, or Retry-After.
- max_length=N     prompt + generation budget; default: the server's `max_model_len` from /v1/models.
- chat=0|1         whether tasks send chat messages (/v1/chat/completions); default: what the tokenizer or
                   the server says, else 1.
- api_key_env=NAME environment variable holding the API key (default OPENAI_API_KEY; none needed on loopback).

Generation goes to /v1/completions (text prompts) or /v1/chat/completions (chat messages). Loglikelihood goes to
/v1/completions with `echo` and `logprobs` (vLLM and `nsa-eval serve` support it; OpenAI's own API does not, which
ends in a clear error). When every try fails the request raises OpenAIServerError: one line naming the server,
what happened and what to check. Samples the runner already wrote stay written; rerunning resumes.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from nsa_eval.model_adapters.base import (Generation, GenerationRequest, LanguageModel, Loglikelihood,
                                          LoglikelihoodRequest, ModelLoadError, Prompt)
from nsa_eval.model_adapters.prompts import first_line, loglikelihood_tokens, truncate_middle

OPTIONS = ("tokenizer", "concurrency", "timeout", "retries", "backoff", "max_length", "chat", "api_key_env")
MAX_BACKOFF_S = 30.0


class OpenAIServerError(ValueError):
    """A server that cannot answer after the retries, or refuses a request; the message is one line."""


class _Malformed(Exception):
    """An answer that is not the JSON the OpenAI API describes (retried like a server error)."""


class OpenAIModel(LanguageModel):
    """A model served over the OpenAI API. See the module docstring for the options."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        tokenizer: Any = None,
        concurrency: int = 8,
        timeout: float = 600.0,
        retries: int = 5,
        backoff: float = 1.0,
        max_length: int | None = None,
        chat: bool | None = None,
        api_key: str | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.served_model = model
        self.name = model
        self.tokenizer = tokenizer
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff = backoff
        self.api_key = api_key
        self._abort = threading.Event()  # set when one request of a batch failed for good: the others stop retrying
        entry = self._model_entry()
        self.max_length = max_length or entry.get("max_model_len")
        if not self.max_length:
            raise ModelLoadError(
                f"{self.label} does not report max_model_len for '{model}'; give the budget in the spec: "
                f"openai:{self.base_url}?max_length=4096#{model}"
            )
        if chat is None:
            chat = getattr(tokenizer, "chat_template", None) is not None if tokenizer is not None else entry.get("chat", True)
        self.chat = bool(chat)

    @classmethod
    def from_spec(cls, target: str, max_length: int | None = None) -> "OpenAIModel":
        """`URL[?options]#MODEL` (the part after `openai:`, read by parse_spec) -> a connected model.
        max_length: the run's --max-length, which wins over the spec's option and the server's max_model_len."""
        base_url, model, options = parse_spec(target)
        tokenizer = None
        if "tokenizer" in options:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(options["tokenizer"])
            except Exception as error:  # transformers raises many types; the user needs one line
                raise ModelLoadError(f"could not load a tokenizer from {options['tokenizer']}: {first_line(error)}") from None
        return cls(base_url, model, tokenizer=tokenizer, concurrency=options.get("concurrency", 8),
                   timeout=options.get("timeout", 600.0), retries=options.get("retries", 5),
                   backoff=options.get("backoff", 1.0), max_length=max_length or options.get("max_length"),
                   chat=options.get("chat"), api_key=os.environ.get(options.get("api_key_env", "OPENAI_API_KEY")) or None)

    @property
    def label(self) -> str:
        return f"openai:{self.base_url}"

    # ---- the LanguageModel interface ----------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        return self._each(self._generate_one, requests)

    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[Loglikelihood]:
        return self._each(self._loglikelihood_one, requests)

    def count_tokens(self, text: Prompt) -> int:
        """With a tokenizer: counted locally (chat template applied to messages). Without: the server's count."""
        if self.tokenizer is not None:
            if isinstance(text, str):
                return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])
            rendered = self.tokenizer.apply_chat_template(text, add_generation_prompt=True, tokenize=False)
            return len(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        path, payload = self._generation_payload(GenerationRequest(prompt=text, max_new_tokens=1))
        return self._request("POST", path, payload, lambda answer: int(answer["usage"]["prompt_tokens"]))

    # ---- requests -----------------------------------------------------------------------------------------

    def _generation_payload(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        payload: dict[str, Any] = {
            "model": self.served_model,
            "max_tokens": request.max_new_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "n": request.n,
            "seed": request.seed,
        }
        if request.stop:
            payload["stop"] = list(request.stop)
        if isinstance(request.prompt, str):
            return "/completions", {**payload, "prompt": request.prompt}
        return "/chat/completions", {**payload, "messages": request.prompt}

    def _generate_one(self, request: GenerationRequest) -> Generation:
        path, payload = self._generation_payload(request)
        truncated = False
        if self.tokenizer is not None and isinstance(request.prompt, str):
            budget = self.max_length - request.max_new_tokens
            if budget < 1:
                raise ValueError(
                    f"max_new_tokens {request.max_new_tokens} leaves no room for a prompt in --max-length {self.max_length}"
                )
            ids, truncated = truncate_middle(self.tokenizer(request.prompt, add_special_tokens=True)["input_ids"], budget)
            if truncated:
                payload["prompt"] = ids
        started = time.perf_counter()
        chat = path == "/chat/completions"
        answer = self._request("POST", path, payload, lambda a: _parse_generation(a, request.n, chat))
        elapsed = time.perf_counter() - started
        texts, finish, usage, timings = answer
        # tokens per completion: exact from `nsa-eval serve` or when n=1; else re-tokenised, or the average
        new_tokens = timings.get("new_tokens") or ([usage["completion_tokens"]] if request.n == 1 else None)
        if new_tokens is None and self.tokenizer is not None:
            new_tokens = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        if new_tokens is None:
            new_tokens = [usage["completion_tokens"] // request.n] * request.n
        return Generation(
            texts=texts,
            new_tokens=new_tokens,
            finish_reasons=finish,
            prompt_tokens=usage["prompt_tokens"],
            truncated=truncated or bool(timings.get("truncated")),
            prefill_ms=float(timings.get("prefill_ms", 0.0)),
            decode_tokens_per_s=float(
                timings.get("decode_tokens_per_s", usage["completion_tokens"] / elapsed if elapsed > 0 else 0.0)
            ),
            # `nsa-eval serve` sends its engine's decode cost; other servers send none
            decode_steps=int(timings.get("decode_steps") or 0),
            **{key: float(timings[key]) if isinstance(timings.get(key), (int, float)) else None
               for key in ("decode_ms_per_token", "kv_bytes_per_step", "attended_share")},
        )

    def _loglikelihood_one(self, request: LoglikelihoodRequest) -> Loglikelihood:
        context = request.context
        if not isinstance(context, str):
            if self.tokenizer is None:
                raise ValueError(
                    f"{self.label}: the loglikelihood of a chat prompt needs the model's chat template; "
                    f"add ?tokenizer=PATH to the spec or use --no-chat-template"
                )
            context = self.tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
        payload = {"model": self.served_model, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 1}
        truncated = False
        if self.tokenizer is not None:
            ids, n_cont = loglikelihood_tokens(self.tokenizer, context, request.continuation, isinstance(request.context, str))
            truncated = len(ids) > self.max_length
            ids = ids[-self.max_length :]
            payload["prompt"] = ids
            pick = lambda logprobs: list(range(len(ids) - n_cont, len(ids)))  # noqa: E731
        else:
            payload["prompt"] = context + request.continuation
            pick = lambda logprobs: _continuation_positions(logprobs, len(context), len(request.continuation))  # noqa: E731
        logprob, greedy, count = self._request("POST", "/completions", payload, lambda a: self._parse_echo(a, pick))
        return Loglikelihood(logprob, greedy, count, truncated)

    def _parse_echo(self, answer: dict, pick: Callable[[dict], list[int]]) -> tuple[float, bool, int]:
        logprobs = answer["choices"][0].get("logprobs")
        if not logprobs or not logprobs.get("token_logprobs") or logprobs["token_logprobs"][0] is not None:
            raise OpenAIServerError(
                f"{self.label} does not return the prompt's log-probabilities (echo with logprobs), which "
                "loglikelihood needs; serve the model with vLLM or `nsa-eval serve`, or run generative tasks only"
            )
        token_logprobs, top = logprobs["token_logprobs"], logprobs.get("top_logprobs") or []
        positions = pick(logprobs)
        if not positions or positions[0] < 1 or positions[-1] >= len(token_logprobs):
            raise _Malformed(f"echoed {len(token_logprobs)} tokens, fewer than the prompt holds")
        total, greedy = 0.0, True
        for i in positions:
            value = float(token_logprobs[i])
            total += value
            best = max((float(v) for v in (top[i] or {}).values()), default=None) if i < len(top) else None
            greedy = greedy and best is not None and value >= best - 1e-6
        return total, greedy, len(positions)

    # ---- HTTP -----------------------------------------------------------------------------------------------

    def _each(self, one: Callable[[Any], Any], requests: list) -> list:
        """`one` over the requests, at most `concurrency` at a time, results in order; the first failure is raised
        once the requests in flight have stopped (they stop retrying as soon as one has failed for good)."""
        if len(requests) <= 1 or self.concurrency == 1:
            return [one(r) for r in requests]
        self._abort.clear()
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            futures = [pool.submit(one, r) for r in requests]
            try:
                return [f.result() for f in futures]
            except BaseException:
                self._abort.set()
                for future in futures:
                    future.cancel()
                raise

    def _model_entry(self) -> dict[str, Any]:
        """The served model's entry in GET /models (checks the server is up and serves `model`)."""
        listing = self._request("GET", "/models", None, lambda a: {m["id"]: m for m in a["data"]})
        if self.served_model not in listing:
            raise ModelLoadError(
                f"{self.label} does not serve '{self.served_model}'; it serves: {', '.join(listing) or 'nothing'}. "
                f"Name one after '#'"
            )
        return listing[self.served_model]

    def _request(self, method: str, path: str, payload: dict | None, parse: Callable[[dict], Any]) -> Any:
        """One API call with retries on connection errors, timeouts, 429, 5xx and malformed answers."""
        url = self.base_url + path
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if payload is None else json.dumps(payload).encode()
        started, failure, kind, retry_after, tries = time.monotonic(), "", "", None, 0
        for attempt in range(self.retries + 1):
            if attempt:
                if self._abort.is_set():
                    break
                backoff = min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF_S) * (0.5 + random.random() / 2)
                time.sleep(min(retry_after, MAX_BACKOFF_S) if retry_after is not None else backoff)
            retry_after, tries = None, tries + 1
            try:
                with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=self.timeout) as response:
                    body = response.read()
            except urllib.error.HTTPError as error:
                body, status = _read(error), error.code
                message = _error_message(body)
                if status == 429 or status >= 500:
                    failure, kind = f"HTTP {status}: {message}", "server"
                    retry_after = _seconds(error.headers.get("Retry-After"))
                    continue
                raise OpenAIServerError(self._refusal(method, url, status, message)) from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
                failure, kind = _describe_connection_error(error), "connection"
                continue
            try:
                return parse(json.loads(body))
            except OpenAIServerError:
                raise
            except (_Malformed, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
                failure, kind = f"malformed answer: {_short(error) or 'unexpected JSON'}; body {_short(body)}", "malformed"
        seconds = time.monotonic() - started
        hint = {
            "connection": f"is the server running and is {self.base_url} its address?",
            "server": "the server keeps failing; see its log",
            "malformed": f"is {self.base_url} an OpenAI-compatible API (it usually ends in /v1)?",
        }[kind]
        raise OpenAIServerError(
            f"{self.label}: {method} {path} failed {tries} time{'s' * (tries > 1)} in {seconds:.1f} s ({failure}); {hint}"
        )

    def _refusal(self, method: str, url: str, status: int, message: str) -> str:
        if status == 404:
            return (f"{self.label}: {method} {url} answered 404 ({message}); check the URL "
                    "(OpenAI-compatible servers answer under /v1) and the model name after '#'")
        if status in (401, 403):
            return f"{self.label} refused the API key (HTTP {status}: {message}); set OPENAI_API_KEY or ?api_key_env=NAME"
        return f"{self.label}: {method} {url} answered HTTP {status}: {message}"


def _parse_generation(answer: dict, n: int, chat: bool) -> tuple[list[str], list[str], dict, dict]:
    choices = sorted(answer["choices"], key=lambda c: c.get("index", 0))
    if len(choices) != n:
        raise _Malformed(f"{len(choices)} choices for n={n}")
    texts = [c["message"]["content"] if chat else c["text"] for c in choices]
    if not all(isinstance(t, str) for t in texts):
        raise _Malformed("a choice without text")
    finish = [c.get("finish_reason") or "stop" for c in choices]
    usage = {"prompt_tokens": int(answer["usage"]["prompt_tokens"]), "completion_tokens": int(answer["usage"]["completion_tokens"])}
    return texts, finish, usage, answer.get("nsa_eval") or {}


def _continuation_positions(logprobs: dict, context_chars: int, continuation_chars: int) -> list[int]:
    """Indices of the echoed tokens that cover the continuation's characters (a token straddling the boundary
    counts as the continuation's; tokens the server generated after the prompt do not count)."""
    offsets = logprobs["text_offset"]
    end = context_chars + continuation_chars
    first = next((i for i, o in enumerate(offsets) if o >= context_chars), len(offsets))
    if first > 0 and (first == len(offsets) or offsets[first] > context_chars) and offsets[first - 1] < context_chars:
        first -= 1
    last = next((i for i, o in enumerate(offsets) if o >= end), len(offsets))
    return list(range(max(first, 1), last))


def parse_spec(target: str) -> tuple[str, str, dict[str, Any]]:
    """`URL[?options]#MODEL` (the part after `openai:`) -> (the base URL, the served model, the options given, typed),
    each checked in one ValueError line: an http(s) URL, a model, known options, numbers that are numbers, a local
    tokenizer folder that exists. Nothing is connected or loaded."""
    parts = urlsplit(target)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"model spec 'openai:{target}': give the server's URL, e.g. "
                         "openai:http://127.0.0.1:8000/v1#MODEL")
    if not parts.fragment:
        raise ValueError(f"model spec 'openai:{target}' names no model; add '#MODEL' (what /v1/models lists)")
    options: dict[str, Any] = dict(parse_qsl(parts.query))
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"model spec 'openai:{target}': unknown option {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    for key, kind in (("concurrency", int), ("timeout", float), ("retries", int), ("backoff", float),
                      ("max_length", int)):
        if key in options:
            try:
                options[key] = kind(options[key])
            except ValueError:
                raise ValueError(f"openai: option {key}={options[key]} is not a {kind.__name__}") from None
    if "chat" in options:
        options["chat"] = options["chat"] not in ("0", "false", "no")
    tokenizer = options.get("tokenizer")
    folder = Path(tokenizer or "").expanduser()
    if tokenizer and (tokenizer.startswith(("/", "./", "../", "~")) or folder.exists()) and not folder.is_dir():
        raise ValueError(f"model spec 'openai:{target}': tokenizer folder {tokenizer} does not exist; give the served "
                         "model's tokenizer folder (or a hub id) after ?tokenizer=")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), parts.fragment, options


def _read(error: urllib.error.HTTPError) -> bytes:
    try:
        return error.read()
    except (OSError, http.client.HTTPException):
        return b""


def _error_message(body: bytes) -> str:
    """The `error.message` of an OpenAI-style error body, else the body's start."""
    try:
        error = json.loads(body)["error"]
        return _short(error["message"] if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return _short(body) or "no body"


def _describe_connection_error(error: BaseException) -> str:
    reason = getattr(error, "reason", error)
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return "unknown host"
    return _short(reason) or type(reason).__name__


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _short(value: Any, limit: int = 120) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
