"""`nsa-eval serve`: an OpenAI-compatible HTTP server for any of our backends (NSA checkpoints included, which
vLLM cannot serve), so any OpenAI-API client (lm-eval's local-completions, the `openai` package, our own
`openai:` backend) can evaluate them.

Endpoints: GET /v1/models; POST /v1/completions (text or token-id prompts, n, stop, seed, echo, logprobs,
streaming) and POST /v1/chat/completions (chat template applied by the backend, streaming). Every answer carries
`usage` token counts, and an `nsa_eval` field with the backend's own timings (prefill ms, decode tokens/s), which
our `openai:` backend reads. Loopback only by default; `--api-key` makes every request need
`Authorization: Bearer KEY`.

The standard library's ThreadingHTTPServer answers each connection in a thread. On the native engine (a model that
`streams`: its step() takes requests while others decode) one worker thread runs the engine: a request joins the
batch being decoded at the next step (continuous batching across clients), and streaming sends each new piece of text
as its token is generated (server-sent events; text that might begin a stop sequence is held back until it cannot).
Other backends answer one request at a time (a lock) and stream the whole completion in one event once it is
generated.

Ctrl-C (SIGINT) or SIGTERM while requests are in flight: the engine stops at its next step, each waiting client gets
a 503 error (a streaming client an error event), the answers are written, the engine thread ends, and the process exits
130 (SIGINT) or 143 (SIGTERM); with none cut off (none in flight, or their answers already written) it exits 0.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import click

from nsa_eval.model_adapters.base import Generation, GenerationRequest, LanguageModel
from nsa_eval.model_adapters.prompts import cut_at_stop
from nsa_eval.openai_schema import (UNSUPPORTED, RequestError, ShuttingDown, cumulative_offsets, request_messages,
                                   request_prompts, request_fields, stream_chat, stream_completion)
from nsa_eval.serve_engine import EngineWorker, Listener

LOOPBACK = ("127.0.0.1", "localhost", "::1")



class Terminated(Exception):
    """SIGTERM, raised in the main thread as KeyboardInterrupt is for SIGINT."""


class OpenAIServer(ThreadingHTTPServer):
    """Serves one LanguageModel under `served_name`. `url` is the API base (…/v1) once bound (port 0 picks one)."""

    daemon_threads = True

    def __init__(self, model: LanguageModel | None, served_name: str, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, quiet: bool = False):
        self.address_family = _family(host)
        super().__init__((host, port), _Handler)
        self.served_name, self.api_key, self.quiet = served_name, api_key, quiet
        self.model_lock = threading.Lock()
        self.model: Any = None
        self.worker: EngineWorker | None = None
        if model is not None:
            self.attach(model)
        self.created = int(time.time())
        self.in_flight = 0  # requests being answered (their HTTP threads)
        self.cut_off = 0  # requests answered with ShuttingDown (what a stop reports)
        self.in_flight_lock = threading.Lock()

    def attach(self, model: LanguageModel) -> None:
        """The model to serve (the socket can be bound before it loads)."""
        self.model = model
        self.worker = EngineWorker(model, self.model_lock) if model.streams else None

    def stop(self, timeout: float = 30.0) -> int:
        """After Ctrl-C / SIGTERM: the engine stops at its next step and its clients get ShuttingDown; waits (at most
        `timeout` s) until every answer is written and the engine is idle. Returns the requests it cut off (answered
        with ShuttingDown); one whose answer was already written, or that another backend finished, is not counted."""
        if self.worker is not None:
            self.worker.stop(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.in_flight_lock:
                if self.in_flight == 0:
                    break
            time.sleep(0.02)
        if self.worker is None and self.model_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self.model_lock.release()  # another backend's generate() has returned
        with self.in_flight_lock:
            return self.cut_off

    def count_cut_off(self, error: Exception) -> None:
        if isinstance(error, ShuttingDown):
            with self.in_flight_lock:
                self.cut_off += 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up before its answer was written is not an error of the server: no traceback for it
        (socketserver prints one to stderr); anything else is printed as socketserver does."""
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    # ---- endpoints (body in, JSON-able answer or an iterator of SSE events out) -------------------------

    def models(self) -> dict[str, Any]:
        entry = {"id": self.served_name, "object": "model", "created": self.created, "owned_by": "nsa-eval",
                 "max_model_len": self.model.max_length, "chat": bool(self.model.chat)}
        return {"object": "list", "data": [entry]}

    def completions(self, body: dict[str, Any]) -> dict[str, Any] | Iterator[dict[str, Any]]:
        self._check(body)
        prompts = request_prompts(body.get("prompt"))
        echo, logprobs = bool(body.get("echo", False)), body.get("logprobs")
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool) or not 0 <= logprobs <= 20):
            raise RequestError(400, "logprobs must be a whole number from 0 to 20")
        fields = request_fields(body, default_max_tokens=16)
        if body.get("stream") and self.worker is not None and not echo and logprobs is None:
            texts = [prompt if isinstance(prompt, str) else self._decode(prompt) for prompt in prompts]
            return self._stream_tokens("cmpl", "text_completion", texts, fields, body)
        choices, usage, timings = [], {"prompt_tokens": 0, "completion_tokens": 0}, []
        for prompt in prompts:
            text = prompt if isinstance(prompt, str) else self._decode(prompt)
            if fields["max_new_tokens"] == 0:  # echo only: the prompt's log-probabilities, nothing generated
                if not echo:
                    raise RequestError(400, "max_tokens 0 is only meaningful with echo; ask for at least 1 token")
                n = fields["n"]
                size = len(prompt) if isinstance(prompt, list) else self.model.count_tokens(prompt)
                generation = Generation([""] * n, [0] * n, ["length"] * n, prompt_tokens=size)
            else:
                generation = self._generate(text, fields)
            for j, completion in enumerate(generation.texts):
                choice = {"index": len(choices), "text": (text if echo else "") + completion, "logprobs": None,
                          "finish_reason": generation.finish_reasons[j]}
                if logprobs is not None:
                    choice["logprobs"] = self._logprobs(prompt, completion, logprobs, echo)
                choices.append(choice)
            usage["prompt_tokens"] += generation.prompt_tokens
            usage["completion_tokens"] += sum(generation.new_tokens)
            timings.append(generation)
        answer = self._answer("cmpl", "text_completion", choices, usage, timings)
        return stream_completion(answer, body) if body.get("stream") else answer

    def chat_completions(self, body: dict[str, Any]) -> dict[str, Any] | Iterator[dict[str, Any]]:
        self._check(body)
        messages = request_messages(body.get("messages"))
        if body.get("logprobs"):
            raise RequestError(400, "logprobs on chat completions are not supported; use /v1/completions with echo")
        if "max_completion_tokens" in body and "max_tokens" not in body:
            body = {**body, "max_tokens": body["max_completion_tokens"]}
        fields = request_fields(body, default_max_tokens=None)
        if body.get("stream") and self.worker is not None:
            return self._stream_tokens("chatcmpl", "chat.completion.chunk", [messages], fields, body)
        generation = self._generate(messages, fields)
        choices = [
            {"index": j, "message": {"role": "assistant", "content": text}, "logprobs": None,
             "finish_reason": generation.finish_reasons[j]}
            for j, text in enumerate(generation.texts)
        ]
        usage = {"prompt_tokens": generation.prompt_tokens, "completion_tokens": sum(generation.new_tokens)}
        answer = self._answer("chatcmpl", "chat.completion", choices, usage, [generation])
        return stream_chat(answer, body) if body.get("stream") else answer

    # ---- helpers ----------------------------------------------------------------------------------------------

    def _check(self, body: dict[str, Any]) -> None:
        if body.get("model") not in (None, self.served_name):
            raise RequestError(404, f"model '{body.get('model')}' is not served here; this server serves '{self.served_name}'",
                               "not_found_error")
        used = [key for key in UNSUPPORTED if body.get(key) not in (None, 0, 1, {}, [], "")]
        if used:
            raise RequestError(400, f"nsa-eval serve does not support {', '.join(used)}")

    def _request(self, prompt: Any, fields: dict[str, Any]) -> GenerationRequest:
        """The GenerationRequest of one prompt, refused here (one line) where the backend would refuse it."""
        if fields["max_new_tokens"] is None:  # chat without max_tokens: whatever the budget leaves
            fields = {**fields, "max_new_tokens": max(1, self.model.max_length - self.model.count_tokens(prompt) - 1)}
        if fields["max_new_tokens"] == 0:
            raise RequestError(400, "max_tokens must be at least 1")
        if fields["max_new_tokens"] >= self.model.max_length:  # the backend's own line speaks of CLI flags
            raise RequestError(400, f"max_tokens {fields['max_new_tokens']} leaves no room for a prompt in this model's "
                                    f"context of {self.model.max_length} tokens; ask for fewer tokens")
        self.model.count_tokens(prompt)  # a chat prompt without a chat template fails here, not in the worker
        return GenerationRequest(prompt=prompt, **fields)

    def _generate(self, prompt: Any, fields: dict[str, Any]) -> Generation:
        request = self._request(prompt, fields)
        if self.worker is not None:
            return self.worker.submit(request).result()
        with self.model_lock:
            return self.model.generate([request])[0]

    def _stream_tokens(self, prefix: str, kind: str, prompts: list[Any], fields: dict[str, Any],
                       body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Server-sent events of the completions of `prompts` on the engine worker, a piece of text per new token
        (choice index = prompt x n + sample), then each choice's finish reason and, if asked, the usage."""
        requests = [self._request(prompt, fields) for prompt in prompts]  # refusals before the stream starts
        listeners = [self.worker.submit(request) for request in requests]
        return self._token_events(prefix, kind, requests, listeners, body)

    def _token_events(self, prefix: str, kind: str, requests: list[GenerationRequest], listeners: list["Listener"],
                      body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        head = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
                "model": self.served_name}
        chat = kind == "chat.completion.chunk"
        tokenizer = self.model.tokenizer

        def piece(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
            if chat:
                delta = {"content": text} if text or finish is None else {}
                return {**head, "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
            return {**head, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}

        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        for p, (request, listener) in enumerate(zip(requests, listeners)):
            n = request.n
            if chat:
                for j in range(n):
                    yield {**head, "choices": [{"index": p * n + j, "delta": {"role": "assistant", "content": ""},
                                                "finish_reason": None}]}
            sent = [0] * n
            hold = max((len(s) for s in request.stop), default=1) - 1  # chars that could begin a stop sequence
            for event in listener.events():
                if isinstance(event, Generation):
                    for j, text in enumerate(event.texts):
                        if text[sent[j]:]:
                            yield piece(p * n + j, text[sent[j]:])
                        yield piece(p * n + j, "", event.finish_reasons[j])
                    usage["prompt_tokens"] += event.prompt_tokens
                    usage["completion_tokens"] += sum(event.new_tokens)
                    break
                sample, tokens = event
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                if request.stop and cut_at_stop(text, request.stop) is not None:
                    continue  # the final text (cut) comes with the Generation
                safe = len(text) - hold
                while safe > sent[sample] and text[safe - 1] == "\ufffd":  # an incomplete character
                    safe -= 1
                if safe > sent[sample]:
                    yield piece(p * n + sample, text[sent[sample]:safe])
                    sent[sample] = safe
        if (body.get("stream_options") or {}).get("include_usage"):
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            yield {**head, "choices": [], "usage": usage}

    def _tokenizer(self) -> Any:
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None or not hasattr(self.model, "token_logprobs"):
            raise RequestError(400, f"{self.model.name} gives no token log-probabilities or token ids (a remote backend); "
                                    "logprobs, echo of logprobs and token-id prompts need a local one (hf:, smollm2, nsa:)")
        return tokenizer

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer().decode(ids, skip_special_tokens=False)

    def _logprobs(self, prompt: str | list[int], completion: str, top: int, echo: bool) -> dict[str, Any]:
        """OpenAI's `logprobs` object for the prompt (when echoed) and the completion, from one forward pass."""
        tokenizer = self._tokenizer()
        if isinstance(prompt, str):
            encoded = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
            prompt_ids, prompt_offsets = encoded["input_ids"], [start for start, _ in encoded["offset_mapping"]]
            prompt_chars = len(prompt)
        else:
            prompt_ids, prompt_offsets, prompt_chars = prompt, cumulative_offsets(tokenizer, prompt), len(self._decode(prompt))
        encoded = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)
        ids = prompt_ids + encoded["input_ids"]
        offsets = prompt_offsets + [prompt_chars + start for start, _ in encoded["offset_mapping"]]
        if len(ids) > self.model.max_length:
            raise RequestError(400, f"the prompt and completion hold {len(ids)} tokens, more than this model's context of "
                                    f"{self.model.max_length} tokens; send a shorter prompt")
        with self.model_lock:
            scored = self.model.token_logprobs(ids, top=max(top, 1))
        tokens = [tokenizer.decode([i]) for i in ids]
        token_logprobs: list[float | None] = [None] + [lp for lp, _ in scored]
        top_logprobs: list[dict[str, float] | None] = [None]
        for i, (lp, best) in enumerate(scored, start=1):
            entry = {tokenizer.decode([t]): value for t, value in best[:top]}
            entry.setdefault(tokens[i], lp)
            top_logprobs.append(entry)
        keep = slice(0, len(ids)) if echo else slice(len(prompt_ids), len(ids))
        shift = 0 if echo else prompt_chars
        return {"tokens": tokens[keep], "token_logprobs": token_logprobs[keep], "top_logprobs": top_logprobs[keep],
                "text_offset": [o - shift for o in offsets[keep]]}

    def _answer(self, prefix: str, kind: str, choices: list, usage: dict, generations: list) -> dict[str, Any]:
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {
            "id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
            "model": self.served_name, "choices": choices, "usage": usage,
            "nsa_eval": {  # our backend's timings (ignored by other clients)
                "prefill_ms": sum(g.prefill_ms for g in generations) / len(generations),
                "decode_tokens_per_s": sum(g.decode_tokens_per_s for g in generations) / len(generations),
                "new_tokens": [n for g in generations for n in g.new_tokens],
                "truncated": any(g.truncated for g in generations),
                **decode_cost(generations),
            },
        }


def decode_cost(generations: list) -> dict[str, Any]:
    """The generations' decode steps and, weighted by them, their ms per step, KV bytes per step and share attended
    (Generation's fields; None where one generation with steps has none), for `openai:` clients of our server."""
    steps = sum(g.decode_steps for g in generations)
    out: dict[str, Any] = {"decode_steps": steps}
    for key in ("decode_ms_per_token", "kv_bytes_per_step", "attended_share"):
        pairs = [(getattr(g, key), g.decode_steps) for g in generations if g.decode_steps]
        known = steps and all(value is not None for value, _ in pairs)
        out[key] = sum(value * n for value, n in pairs) / steps if known else None
    return out


class _Handler(BaseHTTPRequestHandler):
    server: OpenAIServer
    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses its connection

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch({"/v1/models": lambda _: self.server.models(), "/health": lambda _: {"status": "ok"}}, body=False)

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch({"/v1/completions": self.server.completions, "/v1/chat/completions": self.server.chat_completions})

    def _dispatch(self, routes: dict[str, Any], body: bool = True) -> None:
        with self.server.in_flight_lock:
            self.server.in_flight += 1
        try:
            self._answer(routes, body)
        finally:
            with self.server.in_flight_lock:
                self.server.in_flight -= 1

    def _answer(self, routes: dict[str, Any], body: bool) -> None:
        try:
            request = self._body() if body else {}  # read before any answer, so the connection stays usable
            if self.server.api_key and self.headers.get("Authorization") != f"Bearer {self.server.api_key}":
                raise RequestError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
            route = routes.get(self.path.split("?")[0].rstrip("/"))
            if route is None:
                raise RequestError(404, f"no endpoint {self.command} {self.path}; this server has "
                                        "/v1/models, /v1/completions and /v1/chat/completions", "not_found_error")
            answer = route(request)
        except RequestError as error:
            self.server.count_cut_off(error)
            return self._json(error.status, {"error": {"message": str(error), "type": error.kind, "param": None, "code": None}})
        except ValueError as error:  # the backend's one-line refusals (prompt too long, no chat template, ...)
            return self._json(400, {"error": {"message": str(error), "type": "invalid_request_error", "param": None, "code": None}})
        except Exception as error:  # noqa: BLE001 - a server answers 500 and keeps serving
            traceback.print_exc(file=sys.stderr)
            return self._json(500, {"error": {"message": f"{type(error).__name__}: {error}", "type": "server_error",
                                              "param": None, "code": None}})
        if isinstance(answer, dict):
            self._json(200, answer)
        else:
            self._events(answer)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise RequestError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _events(self, events: Iterator[dict[str, Any]]) -> None:
        """Server-sent events, then `data: [DONE]`; the connection closes after them."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for event in events:
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
        except RequestError as error:  # ShuttingDown mid-stream: the client sees why its stream ends early
            self.server.count_cut_off(error)
            error_event = {"error": {"message": str(error), "type": error.kind, "param": None, "code": None}}
            self.wfile.write(f"data: {json.dumps(error_event)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


@click.command()
@click.option("--model", "model_spec", default="smollm2", show_default=True,
              help="What to serve: any model spec of `nsa-eval run` (`nsa-eval list models`).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port (0 picks a free one).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Loopback by default; another address exposes the model to the network.")
@click.option("--api-key", envvar="NSA_EVAL_API_KEY", help="Require `Authorization: Bearer KEY` (or set NSA_EVAL_API_KEY).")
@click.option("--served-model-name", help="The model id clients send (default: the --model spec).")
@click.option("--max-length", type=click.IntRange(min=16), help="Prompt + generation budget in tokens.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True)
@click.option("--quiet", is_flag=True, help="No line per request.")
def serve(model_spec: str, port: int, host: str, api_key: str | None, served_model_name: str | None,
          max_length: int | None, device: str, dtype: str, quiet: bool) -> None:
    """Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models) until Ctrl-C."""
    from nsa_eval.models import LoadOptions, check_model, load_model

    options = LoadOptions(device=device, dtype=dtype, max_length=max_length)
    spec = check_model(model_spec, options)  # an unknown spec or missing folder: one line, before loading
    if host not in LOOPBACK and not api_key:
        click.echo(f"warning: --host {host} without --api-key lets anyone who reaches this machine use the model", err=True)
    try:  # the port is taken before the model loads, so a port in use is one line at once
        server = OpenAIServer(None, served_model_name or model_spec, host, port, api_key, quiet)
    except OSError as error:
        raise ValueError(f"cannot listen on {host}:{port} ({error.strerror or error}); choose another --port (0 picks a free one)") from None
    try:
        click.echo(f"loading {model_spec} ...", err=True)
        server.attach(load_model(spec, options))
        click.echo(f"serving '{server.served_name}' at {server.url} (Ctrl-C stops)", err=True)
        code = 0
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            server.serve_forever()
        except (KeyboardInterrupt, Terminated) as stop:
            code = 143 if isinstance(stop, Terminated) else 130
        finally:
            signal.signal(signal.SIGTERM, previous)
        stopped = server.stop()
        if stopped:
            click.echo(f"stopped: {stopped} request{'s' if stopped > 1 else ''} in flight got an error", err=True)
            raise click.exceptions.Exit(code)
    finally:
        server.server_close()


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()
