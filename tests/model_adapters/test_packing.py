"""Packed (varlen) forwards of the native engine, CPU float32: several whole prompts packed along T in one pass
(runtime/model.py `prefill_packed`, `score_positions`; runtime/attention.py `Pack`) give each prompt what it gets
alone, for full attention (with and without a sliding window), NSA (the paper's layout and fla's) and training-free
sparse attention (per query and per tile): logits, every cache tensor a later decode step reads, and the decode
steps after. Then the engine: log-likelihoods scored in packed forwards equal one request at a time and the padded
path (ForwardScoring) on the real SmolLM2; greedy generations with packed prefills equal one prompt at a time, on
SmolLM2 and on tiny random full / NSA / sparse models; rolling log-likelihoods packed equal one window at a time."""

import math
import types

import pytest
import torch

from nsa_eval.model_adapters.base import GenerationRequest, LoglikelihoodRequest, RollingLoglikelihoodRequest
from nsa_eval.model_adapters.native import load_native
from nsa_eval.model_adapters.runtime.config import ModelConfig, SparseSettings
from nsa_eval.model_adapters.runtime.engine import Engine
from nsa_eval.model_adapters.runtime.model import Transformer
from nsa_eval.model_adapters.scoring import ForwardScoring, token_packs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB = 97
PAPER = dict(attention="nsa", block_len=8, block_stride=4, select_len=8, num_selected=3, window=16,
             compression="mlp", compress_hidden_size=16, shared_kv=False)
FLA = dict(attention="nsa", block_len=8, block_stride=8, select_len=8, num_selected=3, window=0, compression="mean",
           shared_kv=True)
SHARED_KV_WINDOW = {**FLA, "window": 16, "block_stride": 4, "select_len": 16}
SPARSE = dict(attention="sparse", sparse=SparseSettings(budget=40, leading=8, local=16, block=8))
SPARSE_TILES = dict(attention="sparse", sparse=SparseSettings(budget=40, leading=8, local=16, block=8,
                                                              selection="tile"))
KINDS = {"full": dict(attention="full"), "full-window": dict(attention="full", sliding_window=6), "paper": PAPER,
         "fla": FLA, "shared-kv-window": SHARED_KV_WINDOW, "sparse": SPARSE, "sparse-tiles": SPARSE_TILES}
# shorter than a block, exactly one, blocks and selection past the budget, and past the window
LENGTHS = [3, 8, 21, 47, 1]


def tiny(kind: str, vocab: int = VOCAB, layers: int = 2, **extra) -> Transformer:
    """A tiny random model of the kind, float32 on the CPU (std 0.3: peaked logits, a stable argmax)."""
    shape = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, v_head_dim=16, intermediate_size=48, max_position_embeddings=512)
    config = ModelConfig(**{**shape, **KINDS[kind], **extra})
    return Transformer(config).init_weights(std=0.3, seed=0).eval()


def prompts_of(lengths, seed=1, vocab=VOCAB):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator) for n in lengths]


def greedy_steps(model, cache, rows: list[int], first: list[int], steps: int) -> list[list[int]]:
    """Greedy decode of every row of the cache from its first token: each row's tokens (decode over all rows)."""
    tokens = [[t] for t in first]
    for r, t in zip(rows, first):
        cache.ids[r] = t
    for _ in range(steps):
        new = model.decode(cache, cache.slots).argmax(-1)
        cache.ids.copy_(new)
        for out, r in zip(tokens, rows):
            out.append(int(new[r]))
    return tokens


def cached_prefix(cache, row: int, n: int, config: ModelConfig) -> dict[str, torch.Tensor]:
    """What a later step reads of row `row` after an n-token prompt: keys/values [:n], complete blocks, rings."""
    out = {}
    for i, layer in enumerate(cache.layers):
        out[f"{i}.k"], out[f"{i}.v"] = layer["k"][row, :n], layer["v"][row, :n]
        if config.compressed:
            blocks = 0 if n < config.block_len else (n - config.block_len) // config.block_stride + 1
            out[f"{i}.k_cmp"], out[f"{i}.v_cmp"] = layer["k_cmp"][row, :blocks], layer["v_cmp"][row, :blocks]
            kept = torch.arange(max(0, n - config.block_len), n) % config.block_len
            out[f"{i}.k_ring"], out[f"{i}.v_ring"] = layer["k_ring"][row, kept], layer["v_ring"][row, kept]
            if "k_win" in layer:
                kept = torch.arange(max(0, n - config.window), n) % config.window
                out[f"{i}.k_win"], out[f"{i}.v_win"] = layer["k_win"][row, kept], layer["v_win"][row, kept]
    return out


# ---- the packed forward --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "paper", "sparse-tiles",
                                  *(pytest.param(k, marks=pytest.mark.slow)
                                    for k in ("full-window", "fla", "shared-kv-window", "sparse"))])
def test_packed_prefill_equals_each_prompt_alone(kind):
    """Five prompts (1 to 47 tokens) packed into rows 4, 0, 2, 5, 1 of a cache: each one's last logits, every cache
    tensor a decode step reads, and 12 greedy decode steps after, equal the prompt prefilled alone into its row."""
    model = tiny(kind)
    prompts = prompts_of(LENGTHS)
    rows = [4, 0, 2, 5, 1]
    alone, packed = model.new_cache(6, 96), model.new_cache(6, 96)
    want = torch.stack([model.prefill(ids, alone, row) for ids, row in zip(prompts, rows)])
    with torch.no_grad():
        got = model.prefill_packed(prompts, packed, rows)
    # float32 rounding only (the GEMMs see a T of 80 instead of each prompt's own)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert packed.host_lengths == alone.host_lengths and torch.equal(packed.lengths, alone.lengths)
    assert packed.host_active == alone.host_active and torch.equal(packed.active, alone.active)
    for ids, row in zip(prompts, rows):
        torch.testing.assert_close(cached_prefix(packed, row, len(ids), model.config),
                                   cached_prefix(alone, row, len(ids), model.config), rtol=1e-5, atol=1e-5)
    first = want.argmax(-1).tolist()
    steps = 12  # crosses compressed, selection and window boundaries of every row
    assert greedy_steps(model, packed, rows, first, steps) == greedy_steps(model, alone, rows, first, steps)


def test_cpu_attention_over_packed_sequences_equals_the_reference():
    """The runtime's CPU full attention (SDPA per packed sequence) against the PyTorch reference's cu_seqlens path:
    causal and with a sliding window, GQA 2, an empty sequence among them."""
    from nsa_eval.kernels.attention.reference import attention
    from nsa_eval.model_adapters.runtime.ops import cpu_attention

    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 40, heads, 16, generator=generator) for heads in (4, 2, 2))
    cu_seqlens = torch.tensor([0, 7, 7, 30, 40], dtype=torch.int32)
    for window in (None, 5):
        want = attention(q, k, v, causal=True, window=window, cu_seqlens=cu_seqlens)
        torch.testing.assert_close(cpu_attention(q, k, v, window=window, cu_seqlens=cu_seqlens), want,
                                   rtol=1e-5, atol=1e-5)
        assert not torch.allclose(cpu_attention(q, k, v, window=window), want, atol=1e-3)  # the packing matters


def test_packed_prefill_on_the_sdpa_baseline():
    """`bench model`'s SDPA baseline (values zero-padded to the key width in the cache) prefills a pack sequence by
    sequence: each prompt as alone, and as our kernel's full attention."""
    model = tiny("full", v_head_dim=8)
    prompts = prompts_of([11, 4, 26])
    ours = model.prefill_packed(prompts, model.new_cache(3, 48), [0, 1, 2])
    model.sdpa_backend = "math"
    cache = model.new_cache(3, 48)
    assert cache.layers[0]["v"].shape[-1] in (8, 16)
    packed = model.prefill_packed(prompts, cache, [0, 1, 2])
    alone = torch.stack([model.prefill(ids, model.new_cache(1, 48), 0) for ids in prompts])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "paper", "sparse"])
def test_packed_prefill_on_triton_kernels_equals_the_reference(kind):
    """The NSA kernels' cu_seqlens path (Triton in the interpreter) inside the model's packed pass."""
    model = tiny(kind, layers=1)
    prompts = prompts_of([9, 3, 26])
    want = model.prefill_packed(prompts, model.new_cache(3, 32), [0, 1, 2])
    model.kernel_choice = "triton"
    torch.testing.assert_close(model.prefill_packed(prompts, model.new_cache(3, 32), [0, 1, 2]), want,
                               rtol=1e-4, atol=1e-4)


def test_score_positions_packed_equals_alone():
    """Log-probabilities and argmax flags at chosen positions (one repeated) of three sequences in one pass equal each
    sequence's own, and the LM head's slices of `rows` positions give the same numbers."""
    model = tiny("paper")
    sequences = prompts_of([12, 5, 30])
    picks = [[11, 3, 3], [0, 4], [29, 28, 9]]
    targets = [torch.tensor(t) for t in ([5, 6, 7], [1, 2], [3, 4, 90])]
    alone = [model.score_positions([seq], torch.tensor(p), t) for seq, p, t in zip(sequences, picks, targets)]
    offsets = [0, 12, 17]
    positions = torch.tensor([o + p for o, pick in zip(offsets, picks) for p in pick])
    for rows in (1024, 2):
        logprobs, greedy = model.score_positions(sequences, positions, torch.cat(targets), rows=rows)
        torch.testing.assert_close(logprobs, torch.cat([a[0] for a in alone]), rtol=1e-5, atol=1e-5)
        assert torch.equal(greedy, torch.cat([a[1] for a in alone]))
    with torch.no_grad():
        logits = model(sequences[2][None]).logits[0].float().log_softmax(-1)
    torch.testing.assert_close(alone[2][0], logits[[29, 28, 9], [3, 4, 90]], rtol=1e-5, atol=1e-5)
    assert alone[2][1].tolist() == (logits[[29, 28, 9]].argmax(-1) == torch.tensor([3, 4, 90])).tolist()


def test_a_pack_refuses_what_it_cannot_hold():
    model = tiny("full")
    cache = model.new_cache(2, 16)
    with pytest.raises(ValueError, match="own row"):
        model.prefill_packed(prompts_of([3, 4]), cache, [1, 1])
    with pytest.raises(ValueError, match="does not fit"):
        model.prefill_packed(prompts_of([3, cache.capacity]), cache, [0, 1])


def test_token_packs():
    assert token_packs([], 8) == []
    assert token_packs([5, 3, 2, 9, 1, 1], 8) == [[0, 1], [2], [3], [4, 5]]
    assert token_packs([4, 4, 4], 1) == [[0], [1], [2]]


# ---- the engine: log-likelihoods -----------------------------------------------------------------------------

MMLU_LIKE = ("The following are multiple choice questions (with answers) about astronomy.\n\nWhich planet is the "
             "largest?\nA. Mars\nB. Jupiter\nC. Venus\nD. Mercury\nAnswer:")
LL_REQUESTS = [
    *(LoglikelihoodRequest(MMLU_LIKE, f" {letter}") for letter in "ABCD"),  # one context, one-token continuations
    LoglikelihoodRequest("The capital of France is", " Paris"),
    LoglikelihoodRequest("The capital of France is", " a city in Europe"),  # several tokens
    LoglikelihoodRequest("1, 2, 3,", " 4, 5"),
    LoglikelihoodRequest("Hello ", "world"),  # the context's trailing space moves to the continuation
    LoglikelihoodRequest([{"role": "user", "content": "Say yes."}], "Yes"),  # chat messages
]


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_dir):
    return load_native(smollm2_dir, device="cpu", batch_size=4, name="smollm2")


def count_passes(monkeypatch, model) -> list[int]:
    """Record the sequences of every score_positions call."""
    calls: list[int] = []
    score = model.score_positions
    monkeypatch.setattr(model, "score_positions",
                        lambda sequences, *args, **kw: calls.append(len(sequences)) or score(sequences, *args, **kw))
    return calls


def padded_path(lm, monkeypatch) -> None:
    """The engine's log-likelihoods as before packing: ForwardScoring's padded batches through model.forward."""
    monkeypatch.setattr(lm, "_continuation_scores", types.MethodType(ForwardScoring._continuation_scores, lm))


def test_batched_loglikelihood_equals_one_at_a_time_on_smollm2(smollm2_engine, smollm2, monkeypatch):
    """Packed, one request at a time, the padded path of before, and transformers' SmolLM2 (HFModel) all agree."""
    lm = smollm2_engine
    calls = count_passes(monkeypatch, lm.model)
    with monkeypatch.context() as patch:
        padded_path(lm, patch)
        padded = lm.loglikelihood(LL_REQUESTS)  # every position's logits, through model.forward
    assert calls == []
    transformers = smollm2.loglikelihood(LL_REQUESTS)
    batched = lm.loglikelihood(LL_REQUESTS)
    # the four letters after one prompt share one sequence; every distinct sequence in one pass
    assert calls == [len(LL_REQUESTS) - 3]
    calls.clear()
    one_by_one = [lm.loglikelihood([request])[0] for request in LL_REQUESTS]
    assert calls == [1] * len(LL_REQUESTS)
    for got, alone, want, theirs in zip(batched, one_by_one, padded, transformers):
        for other in (alone, want, theirs):
            # float32 rounding only (other GEMM shapes)
            assert got.logprob == pytest.approx(other.logprob, rel=1e-5, abs=1e-5)
            assert (got.is_greedy, got.continuation_tokens, got.truncated) == \
                (other.is_greedy, other.continuation_tokens, other.truncated)
    assert len({round(g.logprob, 3) for g in batched}) == len(LL_REQUESTS)
    assert any(g.is_greedy for g in batched) and not all(g.is_greedy for g in batched)
    assert [g.continuation_tokens for g in batched][4:7] == [1, 4, 5]

    calls.clear()
    lm.max_batch_tokens = 64  # the MMLU-like prompt (~40 tokens) fills most of a pack: several passes
    try:
        small_packs = lm.loglikelihood(LL_REQUESTS)
    finally:
        lm.max_batch_tokens = None
    assert len(calls) > 1 and sum(calls) == len(LL_REQUESTS) - 3
    assert [g.logprob for g in small_packs] == pytest.approx([g.logprob for g in batched], rel=1e-5, abs=1e-5)


def test_loglikelihood_of_truncated_inputs_and_empty_context(smollm2_engine, monkeypatch):
    lm = smollm2_engine
    engine = Engine(lm.model, lm.tokenizer, "smollm2", max_length=12, batch_size=4)
    requests = [LoglikelihoodRequest(MMLU_LIKE, " B"), LoglikelihoodRequest("Hello", " world")]
    got = engine.loglikelihood(requests)
    with monkeypatch.context() as patch:
        padded_path(engine, patch)
        want = engine.loglikelihood(requests)
    assert [g.truncated for g in got] == [True, False]
    assert [g.logprob for g in got] == pytest.approx([w.logprob for w in want], rel=1e-5, abs=1e-5)
    with pytest.raises(ValueError, match="empty context") as error:
        engine.loglikelihood([LoglikelihoodRequest("", "Hello")])
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="as long as --max-length"):  # 13 continuation tokens in 12
        engine.loglikelihood([LoglikelihoodRequest("Count:", " one two three four five six seven eight nine ten eleven "
                                                             "twelve thirteen")])


def test_packed_rolling_loglikelihood_equals_one_window_at_a_time(smollm2_engine):
    """Short documents (one window each) and a long one (windows of 24, disjoint and sliding): packed together, and
    one window at a time."""
    lm = smollm2_engine
    engine = Engine(lm.model, lm.tokenizer, "smollm2", max_length=24, batch_size=4)
    texts = ["The quick brown fox jumps over the lazy dog.", "Hello world.",
             "Once upon a time, in a land far away, there lived a king who had three daughters. The eldest was proud, "
             "the second was clever, and the youngest was kind to every creature of the forest."]
    requests = [RollingLoglikelihoodRequest(t) for t in texts] + [RollingLoglikelihoodRequest(texts[2], stride=8)]
    batched = engine.loglikelihood_rolling(requests)
    engine.max_batch_tokens = 1
    one_by_one = engine.loglikelihood_rolling(requests)
    assert [r.windows for r in batched] == [1, 1, 2, 4]  # the long one: disjoint windows, and strides of 8
    for got, want in zip(batched, one_by_one):
        assert got.positions == want.positions
        assert got.logprobs == pytest.approx(want.logprobs, rel=1e-5, abs=1e-5)
        assert math.isfinite(got.logprob)


# ---- the engine: generation ----------------------------------------------------------------------------------

GEN_PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a king who had",
               "1, 2, 3, 4,", "def fibonacci(n):\n    if n < 2:\n        return n\n    return", "Hello",
               "Roses are red, violets are"]
GEN_BUDGETS = [9, 6, 12, 4, 1, 7]  # rows finish on different steps; one on its first token


def count_prefills(monkeypatch, model) -> list[int]:
    """Record the prompts of every prefill: 1 for `prefill`, N for a packed one."""
    calls: list[int] = []
    single, packed = model.prefill, model.prefill_packed
    monkeypatch.setattr(model, "prefill", lambda *args: calls.append(1) or single(*args))
    monkeypatch.setattr(model, "prefill_packed",
                        lambda prompts, *args: calls.append(len(prompts)) or packed(prompts, *args))
    return calls


def generations_both_ways(lm, monkeypatch, requests):
    calls = count_prefills(monkeypatch, lm.model)
    batched = lm.generate(requests)
    packed_calls = list(calls)
    calls.clear()
    lm.max_batch_tokens = 1
    try:
        one_by_one = lm.generate(requests)
    finally:
        lm.max_batch_tokens = None
    assert calls == [1] * len(requests)
    return batched, one_by_one, packed_calls


def test_greedy_generation_with_packed_prefills_equals_one_prompt_at_a_time_on_smollm2(smollm2_engine, monkeypatch):
    lm = smollm2_engine
    requests = [GenerationRequest(p, max_new_tokens=k) for p, k in zip(GEN_PROMPTS, GEN_BUDGETS)]
    batched, one_by_one, calls = generations_both_ways(lm, monkeypatch, requests)
    # four free rows take the four longest prompts in one pass, the others come as rows free up
    assert calls[0] == 4 and sum(calls) == len(requests)
    for got, want in zip(batched, one_by_one):
        assert (got.texts, got.new_tokens, got.finish_reasons, got.prompt_tokens) == \
            (want.texts, want.new_tokens, want.finish_reasons, want.prompt_tokens)
    assert [g.new_tokens for g in batched] == [[k] for k in GEN_BUDGETS]  # SmolLM2 runs to each budget here
    assert len({g.texts[0] for g in batched}) == len(requests)
    # a packed prompt's prefill_ms is its share of its pack's wall time, by tokens
    lengths = sorted(g.prompt_tokens for g in batched)
    assert len(set(lengths)) == len(lengths)  # no tie: the first pack is the four longest
    packed = [g for g in batched if g.prompt_tokens in lengths[-4:]]
    shares = [g.prefill_ms / g.prompt_tokens for g in packed]
    assert max(shares) == pytest.approx(min(shares), rel=1e-9) and all(g.prefill_ms > 0 for g in batched)


@pytest.mark.parametrize("kind", ["full", "paper", "sparse",
                                  *(pytest.param(k, marks=pytest.mark.slow)
                                    for k in ("fla", "shared-kv-window", "sparse-tiles"))])
def test_greedy_generation_with_packed_prefills_on_tiny_models(kind, tokenizer, monkeypatch):
    """Tiny random models of every attention kind with SmolLM2's tokenizer: packed prefills, then decode steps that
    complete compressed blocks, give the texts of one prompt at a time; 3 rows for 6 requests."""
    model = tiny(kind, vocab=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id)
    lm = Engine(model, tokenizer, f"tiny-{kind}", max_length=96, batch_size=3)
    requests = [GenerationRequest(p, max_new_tokens=k + 10) for p, k in zip(GEN_PROMPTS, GEN_BUDGETS)]
    batched, one_by_one, calls = generations_both_ways(lm, monkeypatch, requests)
    assert calls[0] == 3 and sum(calls) == len(requests)
    assert [g.texts for g in batched] == [g.texts for g in one_by_one]
    assert len({g.texts[0] for g in batched}) == len(requests)  # not degenerate


@pytest.mark.parametrize("kind", ["paper", "sparse"])
def test_a_packed_prefill_shows_inspect_each_prompt_as_alone(kind):
    """Attention.observe (nsa-eval inspect) sees each packed prompt's queries, keys and block indices as alone."""
    model = tiny(kind, layers=1)
    prompts = prompts_of([19, 4, 33])
    seen: list[tuple[torch.Tensor, ...]] = []
    model.layers[0].attn.observe = lambda q, k, indices: seen.append((q, k, indices))
    for i, ids in enumerate(prompts):
        model.prefill(ids, model.new_cache(3, 48), i)
    alone = list(seen)
    seen.clear()
    model.prefill_packed(prompts, model.new_cache(3, 48), [0, 1, 2])
    assert len(seen) == len(alone) == 3
    for got, want in zip(seen, alone):
        assert [t.shape for t in got] == [t.shape for t in want]
        torch.testing.assert_close(got[:2], want[:2], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[2], want[2])


# ---- the runner ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_runner_hands_the_engine_log_likelihoods_in_batches(smollm2_engine, shared_data, tmp_path, monkeypatch):
    """Real MMLU rows (0-shot, the first question of each STEM subject) through the runner: one loglikelihood call
    for all of them though --batch-size is 4, their distinct prompts (one per question: four letters each) in packed
    passes."""
    from nsa_eval.run_config import RunConfig
    from nsa_eval.runner import answer_batches, evaluate
    from nsa_eval.store import RunStore
    from nsa_eval.tasks.base import Sample, TaskContext
    from nsa_eval.tasks.mmlu import MMLU

    lm = smollm2_engine
    requests: list[int] = []
    score = lm.loglikelihood
    monkeypatch.setattr(lm, "loglikelihood", lambda batch: requests.append(len(batch)) or score(batch))
    passes = count_passes(monkeypatch, lm.model)
    task = MMLU(data_path=str(shared_data / "mmlu_stem" / "test.jsonl"), num_fewshot=0)
    task.prepare()
    store = RunStore(tmp_path / "run")
    metrics = evaluate(lm, {"mmlu": task}, store, RunConfig(model_spec="smollm2", tasks=("mmlu",), limit=1,
                                                            batch_size=4), show_progress=False)
    subjects = metrics["tasks"]["mmlu"]["n"]
    assert lm.batch_size == 4 and 8 < subjects <= lm.scoring_batch
    assert requests == [4 * subjects] and sum(passes) == subjects  # one sequence per question
    assert len(passes) < subjects / 4  # packs of 1024 tokens on the CPU
    records = store.records("mmlu")
    assert len(records) == subjects and all(len(r.answer["loglikelihoods"]) == 4 for r in records)
    # the batches themselves: scored samples `scoring_batch` at a time, the others by --batch-size
    items = task.samples(TaskContext(count_tokens=len, chat=False, max_length=4096, seed=0, limit=None))[:10]
    generative = [Sample("g", "x", target=None, max_new_tokens=2)] * 5
    batches = answer_batches(generative + items, 2, 4)
    assert [len(b) for b in batches] == [2, 2, 1, 4, 4, 2]
    assert [len(b) for b in answer_batches(items, 3, None)] == [3, 3, 3, 1]
