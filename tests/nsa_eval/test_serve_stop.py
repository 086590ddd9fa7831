"""`nsa-eval serve` stopped by Ctrl-C or SIGTERM while a request is being answered: the client gets an error, the
engine stops, the process exits 130 / 143 without an abort; bad serve input is one line before any model loads."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from cli_checks import assert_one_line_error, invoke

PROMPT = "Count from 1 to 2000, separated by commas: 1, 2, 3, 4,"


def start_server():
    process = subprocess.Popen([sys.executable, "-m", "nsa_eval", "serve", "--model", "smollm2", "--port", "0",
                                "--device", "cpu"], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stderr:
        if line.startswith("serving"):
            return process, line.split(" at ")[1].split()[0]
    raise AssertionError(f"the server did not start (exit {process.wait()})")


def post(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("stop, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_a_request_ends_it_with_an_error_and_exits_cleanly(stop, code):
    process, url = start_server()
    try:
        got = {}

        def ask_plain():  # a non-streaming client waits for its whole answer
            try:
                post(url + "/completions", {"model": "smollm2", "prompt": PROMPT, "max_tokens": 3000})
                got["plain"] = "answered"
            except urllib.error.HTTPError as error:
                got["plain"] = (error.code, json.load(error)["error"]["message"])

        plain = threading.Thread(target=ask_plain)
        plain.start()
        stream = post(url + "/completions", {"model": "smollm2", "prompt": PROMPT, "max_tokens": 3000, "stream": True})
        first = stream.readline()
        assert first.startswith(b"data: {")  # tokens are coming: both requests are in flight
        time.sleep(0.5)
        process.send_signal(stop)
        events = [line for line in stream.read().decode().splitlines() if line.startswith("data: ")]
        plain.join(timeout=60)
        assert process.wait(timeout=60) == code
    finally:
        if process.poll() is None:
            process.kill()
    errors = [json.loads(line[6:])["error"] for line in events if line.startswith("data: {") and '"error"' in line]
    assert errors and "the server is shutting down" in errors[0]["message"] and events[-1] == "data: [DONE]"
    assert got["plain"][0] == 503 and "the server is shutting down" in got["plain"][1]
    rest = process.stderr.read()
    assert "terminate called" not in rest and "Traceback" not in rest, rest
    assert "stopped: 2 requests in flight got an error" in rest


def test_serve_checks_its_model_spec_and_port_before_loading(tmp_path):
    assert_one_line_error(invoke("serve", "--model", "gpt5"), "unknown model spec 'gpt5'", alone=True)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        result = invoke("serve", "--model", "smollm2", "--port", port)
        assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}", "choose another --port", alone=True)
    finally:
        taken.close()
