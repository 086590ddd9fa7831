"""The `openai:` backend against servers that fail: down, a wrong URL, malformed answers, a 5xx storm, a slow one,
and a 429 it recovers from. Every failure ends in one clear line after the retries, and a run that fails midway
keeps what it wrote and resumes. The faulty servers are small scripted HTTP servers on 127.0.0.1 (a test double
for a broken remote server, which cannot be had on demand); the healthy one is our own `nsa-eval serve`."""

import json
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner
from interop_helpers import POLL_S, serving, write_lm_eval_tasks

from nsa_eval.cli import main
from nsa_eval.model_adapters.base import GenerationRequest, LoglikelihoodRequest
from nsa_eval.model_adapters.hf import HFModel
from nsa_eval.models import load_model

FAST = "retries=2&backoff=0.01"  # 3 tries, milliseconds apart
MODELS = {"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": 512}]}


class ScriptedServer(ThreadingHTTPServer):
    """Answers GET /v1/models with `models` and each POST with `answer(number_of_the_post, path, body)`, which
    returns (status, headers, body bytes). Counts the POSTs it saw."""

    daemon_threads = True

    def __init__(self, answer, models=MODELS):
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.answer, self.models, self.posts = answer, models, 0
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": POLL_S}, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def close(self):
        self.shutdown()
        self.server_close()


class _ScriptedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        self._send(200, {}, json.dumps(self.server.models).encode())

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.posts += 1
            number = self.server.posts
        self._send(*self.server.answer(number, self.path, body))

    def _send(self, status, headers, body):
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        try:
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on this answer (an error status it had read enough of): a real server moves on

    def log_message(self, *args):
        pass


def storm(status=503):
    return lambda number, path, body: (status, {}, json.dumps({"error": {"message": "overloaded"}}).encode())


def forward_to(url, path, body):
    request = urllib.request.Request(url + path.removeprefix("/v1"), body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return 200, {}, response.read()


def one_line_error(error: Exception) -> str:
    text = str(error)
    assert "\n" not in text
    return text


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return HFModel.from_pretrained(str(tiny_llama_dir), name="tiny", device="cpu")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_server_that_is_down(tmp_path):
    spec = f"openai:http://127.0.0.1:{free_port()}/v1?{FAST}#m"
    with pytest.raises(ValueError) as error:
        load_model(spec)
    message = one_line_error(error.value)
    assert "connection refused" in message and "failed 3 times" in message and "is the server running" in message
    # on the command line: that line, exit code 1, no traceback
    result = CliRunner().invoke(main, ["run", "--model", spec, "--tasks", "niah", "--output", str(tmp_path / "run")])
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert last.startswith("Error: openai:http://127.0.0.1:") and "connection refused" in last


def test_a_wrong_url_or_model_name(tiny):
    with serving(tiny) as server:
        with pytest.raises(ValueError) as error:
            load_model(f"openai:{server.url.replace('/v1', '/v2')}?{FAST}#tiny")
        message = one_line_error(error.value)
        assert "answered 404" in message and "check the URL" in message
        with pytest.raises(ValueError, match=r"does not serve 'gpt-4'; it serves: tiny"):
            load_model(f"openai:{server.url}#gpt-4")
    with pytest.raises(ValueError, match="give the server's URL"):
        load_model("openai:localhost:8000#tiny")
    with pytest.raises(ValueError, match="names no model"):
        load_model("openai:http://127.0.0.1:8000/v1")
    with pytest.raises(ValueError, match="unknown option retry"):
        load_model("openai:http://127.0.0.1:8000/v1?retry=3#m")


@pytest.mark.parametrize("answer, expected", [
    (lambda n, path, body: (200, {}, b"<html>proxy error</html>"), "malformed answer"),
    (lambda n, path, body: (200, {}, json.dumps({"choices": []}).encode()), "malformed answer"),
    (storm(503), "HTTP 503: overloaded"),
    (storm(429), "HTTP 429: overloaded"),
])
def test_malformed_answers_and_5xx_storms_end_after_the_retries(answer, expected):
    server = ScriptedServer(answer)
    try:
        model = load_model(f"openai:{server.url}?{FAST}#m")
        with pytest.raises(ValueError) as error:
            model.generate([GenerationRequest("hello", max_new_tokens=4)])
        message = one_line_error(error.value)
        assert expected in message and "failed 3 times" in message and server.posts == 3
    finally:
        server.close()


def test_a_slow_server_times_out():
    server = ScriptedServer(lambda n, path, body: (time.sleep(1.0), (200, {}, b"{}"))[1])
    try:
        model = load_model(f"openai:{server.url}?timeout=0.2&retries=1&backoff=0.01#m")
        with pytest.raises(ValueError, match=r"failed 2 times .*timed out"):
            model.generate([GenerationRequest("hello", max_new_tokens=4)])
    finally:
        server.close()


def test_a_429_with_retry_after_is_waited_out(tiny):
    with serving(tiny, served_name="m") as real:
        server = ScriptedServer(lambda n, path, body: (429, {"Retry-After": "0"}, b'{"error": "slow down"}') if n == 1
                                else forward_to(real.url, path, body))
        try:
            model = load_model(f"openai:{server.url}?retries=1&backoff=5#m")  # backoff 5 s: Retry-After 0 must win
            started = time.monotonic()
            answer = model.generate([GenerationRequest("hello", max_new_tokens=4)])[0]
            assert answer.texts == tiny.generate([GenerationRequest("hello", max_new_tokens=4)])[0].texts
            assert server.posts == 2 and time.monotonic() - started < 4
        finally:
            server.close()


@pytest.mark.slow
def test_a_run_that_fails_midway_keeps_what_it_wrote_and_resumes(tiny, tiny_llama_dir, tmp_path):
    tasks = write_lm_eval_tasks(tmp_path / "tasks")
    healthy = {"value": False}
    out = tmp_path / "run"
    with serving(tiny) as real:
        server = ScriptedServer(lambda n, path, body: forward_to(real.url, path, body) if n <= 3 or healthy["value"]
                                else storm(502)(n, path, body), models=real.models())
        try:
            spec = f"openai:{server.url}?tokenizer={tiny_llama_dir}&{FAST}#tiny"
            args = ["run", "--model", spec, "--tasks", "lm-eval:toy_gen", "--include-path", str(tasks),
                    "--output", str(out), "--quiet"]
            failed = CliRunner().invoke(main, args)
            assert failed.exit_code == 1
            lines = failed.output.strip().splitlines()
            assert lines[-1].startswith("Error: openai:") and "HTTP 502" in lines[-1] and "Traceback" not in failed.output
            written = (out / "samples" / "lm-eval_toy_gen.jsonl").read_text().splitlines()
            assert [json.loads(line)["id"] for line in written] == ["0", "1", "2"]

            healthy["value"] = True
            resumed = CliRunner().invoke(main, args)
            assert resumed.exit_code == 0, resumed.output
            final = (out / "samples" / "lm-eval_toy_gen.jsonl").read_text().splitlines()
            assert final[:3] == written and len(final) == 8  # the first three were kept, not asked again
            assert server.posts == 3 + 3 + 5
        finally:
            server.close()


def test_a_server_without_prompt_logprobs_cannot_score_loglikelihood():
    """OpenAI's own API ignores echo for logprobs: one clear line at once, no retries."""
    completion = {"choices": [{"index": 0, "text": " x", "logprobs": None, "finish_reason": "length"}],
                  "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    server = ScriptedServer(lambda n, path, body: (200, {}, json.dumps(completion).encode()))
    try:
        model = load_model(f"openai:{server.url}?{FAST}#m")
        with pytest.raises(ValueError, match="does not return the prompt's log-probabilities") as error:
            model.loglikelihood([LoglikelihoodRequest("The sky is", " blue")])
        one_line_error(error.value)
        assert server.posts == 1
        assert model.generate([GenerationRequest("hi", max_new_tokens=1)])[0].texts == [" x"]  # generation still works
    finally:
        server.close()
