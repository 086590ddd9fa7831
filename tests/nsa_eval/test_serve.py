"""`nsa-eval serve` on loopback answers the official `openai` client and our `openai:` backend with exactly what
the served model answers directly."""

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from click.testing import CliRunner
from interop_helpers import serving

from nsa_eval.cli import main
from nsa_eval.model_adapters.base import GenerationRequest, LoglikelihoodRequest
from nsa_eval.model_adapters.hf import HFModel
from nsa_eval.model_adapters.openai_backend import OpenAIModel

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return HFModel.from_pretrained(str(tiny_llama_dir), name="tiny", device="cpu")


def direct(model, prompt, **settings):
    return model.generate([GenerationRequest(prompt=prompt, **settings)])[0]


def test_the_official_openai_client(tiny):
    with serving(tiny) as server:
        client = openai.OpenAI(base_url=server.url, api_key="not-needed", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]

        # completions: greedy n=2, usage counts, and the texts the model gives directly
        answer = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8, temperature=0, n=2)
        expected = direct(tiny, "The capital of France is", max_new_tokens=8)
        assert [c.text for c in answer.choices] == expected.texts * 2
        assert answer.usage.prompt_tokens == tiny.count_tokens("The capital of France is")
        assert answer.usage.completion_tokens == 2 * expected.new_tokens[0]
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

        # a stop sequence taken from that text cuts the completion before it
        stop = expected.texts[0][3:6]
        cut = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8, temperature=0, stop=[stop])
        assert cut.choices[0].text == expected.texts[0][: expected.texts[0].index(stop)]
        assert cut.choices[0].finish_reason == "stop"

        # sampling with a seed is reproducible, and is the model's own seeded sampling
        sampled = [client.completions.create(model="tiny", prompt="Once", max_tokens=6, temperature=1.0, seed=7).choices[0].text
                   for _ in range(2)]
        assert sampled[0] == sampled[1] == direct(tiny, "Once", max_new_tokens=6, temperature=1.0, seed=7).texts[0]

        # chat completions through the model's chat template, plain and streamed
        chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0)
        assert chat.choices[0].message.content == direct(tiny, CHAT, max_new_tokens=6).texts[0]
        assert chat.usage.prompt_tokens == tiny.count_tokens(CHAT)
        chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
        streamed = list(client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8,
                                                  temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in streamed) == expected.texts[0]

        # echo with logprobs: the prompt's tokens with their log-probabilities (what loglikelihood needs)
        echoed = client.completions.create(model="tiny", prompt="Paris is in France", max_tokens=0, echo=True, logprobs=1)
        logprobs = echoed.choices[0].logprobs
        assert echoed.choices[0].text == "Paris is in France" and "".join(logprobs.tokens) == "Paris is in France"
        assert logprobs.token_logprobs[0] is None and logprobs.text_offset[:2] == [0, len(logprobs.tokens[0])]
        whole = tiny.loglikelihood([LoglikelihoodRequest("Paris", " is in France")])[0]
        assert sum(logprobs.token_logprobs[1:]) == pytest.approx(whole.logprob, abs=1e-4)

        with pytest.raises(openai.NotFoundError, match="this server serves 'tiny'"):
            client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
        with pytest.raises(openai.BadRequestError, match="best_of"):
            client.completions.create(model="tiny", prompt="hi", max_tokens=1, best_of=3)
        with pytest.raises(openai.BadRequestError) as too_long:  # in the API's words, not the CLI's flags
            client.completions.create(model="tiny", prompt="hi", max_tokens=tiny.max_length)
        assert f"max_tokens {tiny.max_length} leaves no room for a prompt in this model's context of" in str(too_long.value)
        assert "--max-length" not in str(too_long.value)


def test_an_api_key_is_required_when_set(tiny):
    with serving(tiny, api_key="sekrit") as server:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(server.url + "/models", timeout=10)
        assert error.value.code == 401
        good = openai.OpenAI(base_url=server.url, api_key="sekrit", max_retries=0)
        assert good.models.list().data[0].max_model_len == tiny.max_length


@pytest.mark.parametrize("with_tokenizer", [pytest.param(True, marks=pytest.mark.slow), False])
def test_our_openai_backend_gives_what_the_served_model_gives(tiny, tiny_llama_dir, with_tokenizer):
    with serving(tiny) as server:
        query = f"?tokenizer={tiny_llama_dir}&concurrency=3" if with_tokenizer else "?concurrency=3"
        remote = OpenAIModel.from_spec(f"{server.url}{query}#tiny")
        assert remote.max_length == tiny.max_length and remote.chat and remote.name == "tiny"
        requests = [GenerationRequest(prompt=p, max_new_tokens=5, seed=i)
                    for i, p in enumerate(["One", "Two and", "Three", CHAT, "Five five"])]
        got, expected = remote.generate(requests), tiny.generate(requests)
        assert [g.texts for g in got] == [g.texts for g in expected]  # in order, though 3 ran at once
        assert [g.prompt_tokens for g in got] == [g.prompt_tokens for g in expected]
        assert [g.new_tokens for g in got] == [g.new_tokens for g in expected]
        assert all(g.prefill_ms > 0 for g in got)  # the server's own timings came through
        # and its decode cost (computed from the model's config, so equal to the model's own)
        assert [(g.decode_steps, g.kv_bytes_per_step, g.attended_share) for g in got] == [
            (g.decode_steps, g.kv_bytes_per_step, g.attended_share) for g in expected]
        assert any(g.kv_bytes_per_step for g in got)
        pairs = [LoglikelihoodRequest("Question: 2+2=?\nAnswer:", " 4"), LoglikelihoodRequest("The sky is ", "blue"),
                 LoglikelihoodRequest("Hello", " world, and more")]
        if with_tokenizer:
            pairs.append(LoglikelihoodRequest(CHAT, "Red"))
        for got_ll, want in zip(remote.loglikelihood(pairs), tiny.loglikelihood(pairs)):
            assert got_ll.logprob == pytest.approx(want.logprob, abs=1e-4)
            assert (got_ll.is_greedy, got_ll.continuation_tokens) == (want.is_greedy, want.continuation_tokens)
        assert remote.count_tokens("Hello there, world") == tiny.count_tokens("Hello there, world")
        assert remote.count_tokens(CHAT) == tiny.count_tokens(CHAT)


@pytest.mark.slow
def test_a_run_through_the_server_equals_a_direct_run(tiny, tiny_llama_dir, tmp_path):
    niah = ["--tasks", "niah", "--niah-lengths", "256", "--niah-depths", "0,100", "--quiet", "--seed", "3"]
    direct_run = CliRunner().invoke(main, ["run", "--model", f"hf:{tiny_llama_dir}", "--device", "cpu", *niah,
                                           "--output", str(tmp_path / "direct")], catch_exceptions=False)
    assert direct_run.exit_code == 0, direct_run.output
    with serving(tiny) as server:
        remote_run = CliRunner().invoke(main, ["run", "--model", f"openai:{server.url}?tokenizer={tiny_llama_dir}#tiny",
                                               *niah, "--output", str(tmp_path / "remote")], catch_exceptions=False)
    assert remote_run.exit_code == 0, remote_run.output
    read = lambda name: [json.loads(line) for line in (tmp_path / name / "samples" / "niah.jsonl").read_text().splitlines()]  # noqa: E731
    for remote, local in zip(read("remote"), read("direct"), strict=True):
        assert (remote["id"], remote["prompt_hash"], remote["responses"], remote["prompt_tokens"], remote["scores"]) == \
               (local["id"], local["prompt_hash"], local["responses"], local["prompt_tokens"], local["scores"])


@pytest.mark.slow
def test_the_serve_command_listens_on_loopback(tiny_llama_dir):
    process = subprocess.Popen(
        [sys.executable, "-m", "nsa_eval", "serve", "--model", f"hf:{tiny_llama_dir}", "--port", "0", "--device", "cpu",
         "--served-model-name", "tiny", "--quiet"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        for line in process.stderr:
            if line.startswith("serving"):
                break
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        with urllib.request.urlopen(url + "/models", timeout=30) as response:
            assert json.load(response)["data"][0]["id"] == "tiny"
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


def test_a_client_that_hangs_up_leaves_no_traceback(tiny, capsys):
    """socketserver calls handle_error inside the handler's except block: a hung-up client is quiet, other errors
    keep their traceback."""
    from nsa_eval.serve import OpenAIServer

    server = OpenAIServer(tiny, "tiny", quiet=True)
    try:
        for error in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset"), RuntimeError("bug")):
            try:
                raise error
            except Exception:  # noqa: BLE001 - as socketserver's process_request_thread
                server.handle_error(None, ("127.0.0.1", 1))
    finally:
        server.server_close()
    printed = capsys.readouterr().err
    assert printed.count("Traceback") == 1 and "RuntimeError: bug" in printed and "Broken pipe" not in printed
