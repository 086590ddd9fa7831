"""`nsa-eval serve` on the native engine: streaming sends the text token by token while the completion is still being
generated, and concurrent clients decode in one batch, each getting what it gets alone (the real `openai` client on
loopback)."""

import threading

import pytest
from interop_helpers import serving

from nsa_eval.model_adapters.base import GenerationRequest
from nsa_eval.model_adapters.native import load_native

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return load_native(tiny_llama_dir, device="cpu", batch_size=4, name="tiny", max_length=512)


def alone(engine, prompt, **settings):
    return engine.generate([GenerationRequest(prompt=prompt, **settings)])[0]


def test_streamed_pieces_arrive_while_generating_and_add_up(engine):
    expected = alone(engine, "The capital of France is", max_new_tokens=40)
    with serving(engine) as server:
        client = openai.OpenAI(base_url=server.url, api_key="not-needed", max_retries=0)
        before = engine.stats.decode_tokens
        pieces, tokens_at_first_piece = [], None
        for chunk in client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=40,
                                               temperature=0, stream=True):
            text = chunk.choices[0].text if chunk.choices else ""
            if text and tokens_at_first_piece is None:
                tokens_at_first_piece = engine.stats.decode_tokens - before
            pieces.append((text, chunk.choices[0].finish_reason if chunk.choices else None))
        generated = engine.stats.decode_tokens - before
    assert "".join(text for text, _ in pieces) == expected.texts[0]
    assert pieces[-1][1] == expected.finish_reasons[0]
    assert len([text for text, _ in pieces if text]) > 5  # piece by piece, not one event at the end
    assert tokens_at_first_piece is not None and tokens_at_first_piece < generated  # before the last token


def test_a_stop_sequence_is_never_streamed(engine):
    expected = alone(engine, "Once upon", max_new_tokens=30)
    stop = expected.texts[0][10:14]
    with serving(engine) as server:
        client = openai.OpenAI(base_url=server.url, api_key="not-needed", max_retries=0)
        chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=30, temperature=0, stream=True, stop=[stop]))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=30, temperature=0, stop=[stop])
    assert streamed == plain.choices[0].message.content and stop not in streamed


def test_concurrent_clients_share_decode_steps(engine):
    prompts = ["One two three", "A long time ago in a galaxy", "def main():", "The weather today"]
    expected = [alone(engine, p, max_new_tokens=48).texts[0] for p in prompts]
    answers: dict[int, str] = {}
    with serving(engine) as server:
        client = openai.OpenAI(base_url=server.url, api_key="not-needed", max_retries=0)
        start = threading.Barrier(len(prompts))
        before = (engine.stats.decode_steps, engine.stats.decode_tokens)

        def ask(i: int) -> None:
            start.wait()
            answers[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=48,
                                                   temperature=0).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        steps, tokens = engine.stats.decode_steps - before[0], engine.stats.decode_tokens - before[1]
    assert [answers[i] for i in range(len(prompts))] == expected
    assert tokens > steps  # some decode steps carried several clients' rows
