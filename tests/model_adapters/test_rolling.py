"""Whole-document scoring (`loglikelihood_rolling`, the perplexity task's request) on the CPU, float32: lm-eval's
rolling windows; the embedded SmolLM2 on the native engine and on transformers equal transformers' own summed
log-probabilities over those windows; NSA's chunked prefill; sparse attention whose budget covers the window equals
full attention. About 20 s on 2 shared CPU cores."""

import math

import pytest
import torch

from nsa_eval.model_adapters.base import RollingLoglikelihoodRequest
from nsa_eval.model_adapters.native import load_native
from nsa_eval.model_adapters.prompts import rolling_tokens, rolling_windows
from nsa_eval.model_adapters.runtime.config import SparseSettings

lm_eval_utils = pytest.importorskip("lm_eval.utils")

SHORT = "The quick brown fox jumps over the lazy dog."
LONG = ("Once upon a time, in a land far away, there lived a king who had three daughters. The eldest was proud, "
        "the second was clever, and the youngest was kind to every creature of the forest, the river and the hills. "
        "One morning a stranger came to the castle gate and asked for bread.")
WINDOW = 24  # a small max length: LONG (62 tokens) takes three windows


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def lm_eval_windows(tokens, prefix, max_length, context_len=1):
    """lm-eval's own split: get_rolling_token_windows + make_disjoint_window, as (inputs, targets)."""
    pairs = map(lm_eval_utils.make_disjoint_window,
                lm_eval_utils.get_rolling_token_windows(tokens, prefix, max_length, context_len))
    return [((context + continuation)[:-1], continuation) for context, continuation in pairs]


@pytest.mark.parametrize("length", [1, 5, 16, 17, 40, 100])
@pytest.mark.parametrize("max_length, stride", [(16, None), (16, 16), (16, 4), (16, 1), (1, None)])
def test_rolling_windows_are_lm_evals(length, max_length, stride):
    tokens = list(range(100, 100 + length))
    ours = rolling_windows(tokens, 7, max_length, stride)
    context_len = 1 if stride is None else max_length - stride + 1
    assert ours == lm_eval_windows(tokens, 7, max_length, context_len)
    assert [t for _, targets in ours for t in targets] == tokens  # every token predicted once, in order
    for inputs, targets in ours:
        assert len(targets) <= len(inputs) <= max_length
    with pytest.raises(ValueError, match="stride"):
        rolling_windows(tokens, 7, max_length, max_length + 1)


@pytest.fixture(scope="module")
def transformers_model(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def transformers_logprobs(model, tokenizer, text, max_length, context_len=1):
    """Per-token log-probabilities of transformers' forward passes over lm-eval's windows: its float32 logits through
    a float32 log-softmax, as lm-eval's HFLM computes them (the sums are taken exactly, math.fsum)."""
    tokens, prefix = rolling_tokens(tokenizer, text)
    out = []
    with torch.no_grad():
        for inputs, targets in lm_eval_windows(tokens, prefix, max_length, context_len):
            logits = model(torch.tensor([inputs])).logits[0, -len(targets):]
            out += torch.log_softmax(logits, -1).gather(1, torch.tensor(targets)[:, None])[:, 0].tolist()
    return out


def test_rolling_loglikelihood_equals_transformers_summed_logprobs(smollm2_dir, transformers_model):
    """The native engine (our runtime's prefill) and the transformers backend, on a document within one window and
    one over several: the summed log-probability equals transformers' to 1e-4 nats, token by token too."""
    from nsa_eval.model_adapters.hf import HFModel

    engine = load_native(smollm2_dir, device="cpu", max_length=WINDOW, batch_size=1)
    backend = HFModel(transformers_model, engine.tokenizer, "smollm2-transformers", max_length=WINDOW)
    tokens = {text: rolling_tokens(engine.tokenizer, text)[0] for text in (SHORT, LONG)}
    assert len(tokens[SHORT]) < WINDOW < 2 * WINDOW < len(tokens[LONG])  # one window, and three
    for text in (SHORT, LONG):
        want = transformers_logprobs(transformers_model, engine.tokenizer, text, WINDOW)
        for lm in (engine, backend):
            got = lm.loglikelihood_rolling([RollingLoglikelihoodRequest(text)])[0]
            assert len(got.logprobs) == len(tokens[text]) == len(want)
            assert abs(got.logprob - math.fsum(want)) < 1e-4, (type(lm).__name__, got.logprob, math.fsum(want))
            assert max(abs(a - b) for a, b in zip(got.logprobs, want)) < 1e-4
            assert got.windows == -(-len(tokens[text]) // WINDOW)
            n = len(tokens[text])  # disjoint windows; the last, partial one is scored at the end of a full window
            assert got.positions == (list(range(n)) if n <= WINDOW else
                                     list(range(WINDOW)) * (n // WINDOW) + list(range(WINDOW - n % WINDOW, WINDOW)))
    # sliding windows: each window after the first predicts 8 new tokens after 16 of context
    got = engine.loglikelihood_rolling([RollingLoglikelihoodRequest(LONG, stride=8)])[0]
    want = transformers_logprobs(transformers_model, engine.tokenizer, LONG, WINDOW, context_len=WINDOW - 8 + 1)
    assert abs(got.logprob - math.fsum(want)) < 1e-4
    assert got.positions[:WINDOW] == list(range(WINDOW)) and set(got.positions[WINDOW:]) <= set(range(WINDOW - 8, WINDOW))
    assert got.logprob > engine.loglikelihood_rolling([RollingLoglikelihoodRequest(LONG)])[0].logprob  # more context


def test_nsa_rolling_windows_on_the_reference_kernels(tokenizer):
    """An NSA model (flash-linear-attention's layout, the CPU reference kernels): a window's log-probabilities equal
    the log-softmax of its forward pass, and slicing the window's prefill over its own cache changes nothing."""
    from test_engine import FLA, nsa_model

    from nsa_eval.model_adapters.runtime.engine import Engine

    model = nsa_model(tokenizer, FLA, layers=1, hidden=32, heads=2, kv_heads=1)
    lm = Engine(model, tokenizer, "tiny-nsa", max_length=WINDOW, batch_size=1)
    whole = lm.loglikelihood_rolling([RollingLoglikelihoodRequest(LONG)])[0]
    tokens, prefix = rolling_tokens(tokenizer, LONG)
    want = []
    for inputs, targets in rolling_windows(tokens, prefix, WINDOW):
        logits = model(torch.tensor([inputs])).logits[0, -len(targets):].float()
        want += torch.log_softmax(logits, -1).gather(1, torch.tensor(targets)[:, None])[:, 0].tolist()
    assert whole.windows > 2 and whole.logprobs == pytest.approx(want, abs=1e-5)
    model.prefill_chunk = 8  # four slices per window, over the cache the window makes for itself
    sliced = lm.loglikelihood_rolling([RollingLoglikelihoodRequest(LONG)])[0]
    assert sliced.logprobs == pytest.approx(whole.logprobs, abs=1e-4)


@pytest.mark.slow  # the quick subset's case of it: tests/nsa_eval/test_run_perplexity.py
def test_sparse_attention_covering_the_window_equals_full_attention(smollm2_dir):
    """Training-free sparse attention whose budget holds every token of the window scores each token as full
    attention does; a budget below the window does not."""
    full = load_native(smollm2_dir, device="cpu", max_length=48, batch_size=1)
    covering = load_native(smollm2_dir, device="cpu", max_length=48, batch_size=1, attention="sparse",
                           sparse=SparseSettings(budget=64, leading=8, local=24, block=8))
    short = load_native(smollm2_dir, device="cpu", max_length=48, batch_size=1, attention="sparse",
                        sparse=SparseSettings(budget=40, leading=8, local=24, block=8))
    request = [RollingLoglikelihoodRequest(LONG)]
    want = full.loglikelihood_rolling(request)[0]
    got = covering.loglikelihood_rolling(request)[0]
    assert got.positions == want.positions and got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert abs(got.logprob - want.logprob) < 1e-3
    assert max(abs(a - b) for a, b in zip(short.loglikelihood_rolling(request)[0].logprobs, want.logprobs)) > 1e-3


def test_a_backend_without_rolling_scores_is_one_line():
    """openai: and vllm: have no loglikelihood_rolling: a perplexity task on them ends in one line (the runner checks
    before it writes anything)."""
    from nsa_eval.model_adapters.base import LanguageModel

    class Served(LanguageModel):
        name, generate, loglikelihood, count_tokens = "served", None, None, None

    with pytest.raises(ValueError, match=r"served \(Served\) does not score whole documents .*on smollm2, hf:"):
        Served().loglikelihood_rolling([])
