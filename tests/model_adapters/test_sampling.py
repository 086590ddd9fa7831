"""The engine's counter-based token sampler: greedy, batch invariance, distribution, nucleus, CUDA graphs."""

import math

import pytest
import torch

from nsa_eval.model_adapters.runtime.sampling import _uniforms, row_seed, sample_tokens



def _sample(logits, temperature, top_p, seeds, steps):
    """sample_tokens with per-row values given as Python numbers or lists (broadcast to the batch)."""
    b = logits.shape[0]

    def col(v, dtype):
        t = torch.as_tensor(v, dtype=dtype, device=logits.device)
        return t.expand(b).contiguous() if t.dim() == 0 else t

    return sample_tokens(
        logits,
        col(temperature, torch.float32),
        col(top_p, torch.float32),
        col(seeds, torch.int64),
        col(steps, torch.int64),
    )


def _assert_frequencies(tokens, probs, n_se=4.0):
    """Each token's empirical frequency within n_se standard errors of its probability."""
    n = tokens.numel()
    freq = torch.bincount(tokens, minlength=probs.numel()).double() / n
    se = (probs.double() * (1 - probs.double()) / n).sqrt().clamp_min(1e-12)
    z = (freq - probs.double()).abs() / se
    assert (z <= n_se).all(), f"frequencies {freq.tolist()} vs probabilities {probs.tolist()} (z = {z.tolist()})"


def _random_rows(b, v, gen):
    logits = torch.randn(b, v, generator=gen) * 2
    temperature = torch.rand(b, generator=gen) * 1.5 + 0.3
    top_p = torch.where(torch.rand(b, generator=gen) < 0.5, torch.ones(b), torch.rand(b, generator=gen) * 0.8 + 0.2)
    seeds = torch.randint(0, 2**62, (b,), generator=gen)
    steps = torch.randint(0, 5000, (b,), generator=gen)
    return logits, temperature, top_p, seeds, steps


# --- greedy ---------------------------------------------------------------------------------------------------------


def test_greedy_equals_argmax_with_ties_and_any_dtype():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (32, 50), generator=gen).float()  # integer logits: many tied maxima
    logits[0] = 0.0
    logits[1, [7, 20, 41]] = 9.0
    seeds = torch.randint(0, 2**62, (32,), generator=gen)
    steps = torch.randint(0, 100, (32,), generator=gen)
    for temperature in (0.0, -1.0):
        tokens = _sample(logits, temperature, 0.5, seeds, steps)
        assert tokens.dtype == torch.int64 and tokens.shape == (32,)
        assert torch.equal(tokens, logits.argmax(-1))
        assert tokens[0] == 0 and tokens[1] == 7  # first index among the tied maxima
    half = logits.to(torch.bfloat16)
    assert torch.equal(_sample(half, 0.0, 1.0, seeds, steps), half.argmax(-1))


def test_mixed_greedy_and_sampled_rows():
    gen = torch.Generator().manual_seed(1)
    logits, temperature, top_p, seeds, steps = _random_rows(16, 300, gen)
    greedy = torch.arange(16) % 3 == 0
    mixed_t = torch.where(greedy, torch.zeros(16), temperature)
    mixed = sample_tokens(logits, mixed_t, top_p, seeds, steps)
    all_sampled = sample_tokens(logits, temperature, top_p, seeds, steps)
    assert torch.equal(mixed[greedy], logits.argmax(-1)[greedy])
    assert torch.equal(mixed[~greedy], all_sampled[~greedy])
    assert not torch.equal(all_sampled, logits.argmax(-1))  # the sampled rows really sample


# --- reproducibility per request ------------------------------------------------------------------------------------


def test_row_choice_independent_of_batch_size_order_and_neighbours():
    gen = torch.Generator().manual_seed(2)
    rows = _random_rows(12, 400, gen)
    tokens = sample_tokens(*rows)
    assert len(set(tokens.tolist())) > 6  # a real spread of choices, not one token everywhere
    assert torch.equal(sample_tokens(*rows), tokens)  # deterministic

    perm = torch.randperm(12, generator=gen)
    assert torch.equal(sample_tokens(*(x[perm] for x in rows)), tokens[perm])

    for i in (0, 5, 11):
        alone = sample_tokens(*(x[i : i + 1] for x in rows))
        assert alone.tolist() == [tokens[i].item()]

    others = _random_rows(8, 400, gen)
    at = 3
    embedded = [torch.cat([o[:at], x[7:8], o[at:]]) for o, x in zip(others, rows)]
    assert sample_tokens(*embedded)[at] == tokens[7]
    # the same row's seed/step in a neighbour changes nothing either
    embedded[3][0], embedded[4][0] = rows[3][7], rows[4][7]
    assert sample_tokens(*embedded)[at] == tokens[7]


def test_different_steps_and_seeds_give_different_draws():
    v, n = 1000, 400
    logits = torch.zeros(n, v)  # uniform over 1000 tokens: draws of a good sampler rarely repeat
    steps = torch.arange(n)
    by_step = _sample(logits, 1.0, 1.0, 12345, steps)
    by_seed = _sample(logits, 1.0, 1.0, torch.arange(n) * 7919 + 3, 17)
    other_seed = _sample(logits, 1.0, 1.0, 54321, steps)
    # expected distinct values among 400 uniform draws from 1000: about 330
    for draws in (by_step, by_seed, other_seed):
        assert len(set(draws.tolist())) > 290
    # two seeds' step sequences agree about 0.4 times in 400 by chance; a shared stream would agree everywhere
    assert (by_step == other_seed).sum() < 5
    assert (by_step[1:] == by_step[:-1]).sum() < 5
    # seed and step are not interchangeable in the hash
    swapped = _sample(logits[:50], 1.0, 1.0, torch.arange(50), 3)
    assert (swapped != _sample(logits[:50], 1.0, 1.0, 3, torch.arange(50))).sum() > 40


def test_large_seeds_and_steps():
    logits = torch.zeros(4, 100)
    seeds = torch.tensor([2**62 - 1, 2**62 - 1, 0, 2**32])
    steps = torch.tensor([0, 2**40, 2**33, 0])
    tokens = sample_tokens(logits, torch.ones(4), torch.ones(4), seeds, steps)
    assert ((tokens >= 0) & (tokens < 100)).all()
    assert torch.equal(tokens, sample_tokens(logits, torch.ones(4), torch.ones(4), seeds, steps))
    # the high 32 bits of seed and step count: seed 2**32 is not seed 0, over many steps
    many = torch.zeros(200, 100)
    a = _sample(many, 1.0, 1.0, 0, torch.arange(200))
    b = _sample(many, 1.0, 1.0, 2**32, torch.arange(200))
    c = _sample(many, 1.0, 1.0, 0, torch.arange(200) + 2**32)
    assert (a == b).sum() < 15 and (a == c).sum() < 15


# --- distribution ---------------------------------------------------------------------------------------------------

SMALL_LOGITS = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
N = 20000


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_distribution_over_seeds_matches_softmax(temperature):
    logits = SMALL_LOGITS.expand(N, 5)
    tokens = _sample(logits, temperature, 1.0, torch.arange(N) * 1_000_003 + 11, 0)
    _assert_frequencies(tokens, torch.softmax(SMALL_LOGITS / temperature, -1))


def test_distribution_over_steps_matches_softmax_and_successive_steps_are_independent():
    logits = SMALL_LOGITS.expand(N, 5)
    tokens = _sample(logits, 1.0, 1.0, 987654321, torch.arange(N))
    probs = torch.softmax(SMALL_LOGITS, -1)
    _assert_frequencies(tokens, probs)
    # the pairs (step t, step t+1): joint frequencies match the product of the marginals (chi-square, 16 dof)
    pairs = tokens[:-1] * 5 + tokens[1:]
    observed = torch.bincount(pairs, minlength=25).double()
    expected = (probs[:, None] * probs[None, :]).flatten().double() * (N - 1)
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 45.0  # p ~ 2e-4 for 16 degrees of freedom


def test_flat_logits_pick_every_token_equally_often():
    v = 50
    tokens = _sample(torch.zeros(N, v), 1.0, 1.0, 31337, torch.arange(N))
    _assert_frequencies(tokens, torch.full((v,), 1.0 / v))


def test_uniforms_are_uniform_and_uncorrelated():
    v = 100_000
    seeds = torch.tensor([5, 5, 4, 2**40 + 5])  # the same seed at steps 0 and 1, seeds one bit apart
    steps = torch.tensor([0, 1, 0, 0])
    u = _uniforms(seeds, steps, v).double()
    assert u.dtype == torch.float64 and (u > 0).all() and (u < 1).all()
    se_mean = 1 / math.sqrt(12 * v)
    assert ((u.mean(1) - 0.5).abs() < 4 * se_mean).all()
    for row in u:  # 20-bin histogram, chi-square with 19 dof (p ~ 1e-4 at 50)
        counts = torch.bincount((row * 20).long(), minlength=20).double()
        assert (((counts - v / 20) ** 2) / (v / 20)).sum() < 50
    z = (u - 0.5) * math.sqrt(12)
    bound = 4 / math.sqrt(v)
    assert ((z[:, 1:] * z[:, :-1]).mean(1).abs() < bound).all()  # neighbouring tokens
    for a, b in ((0, 1), (0, 2), (0, 3)):  # neighbouring steps, neighbouring seeds, high seed bits
        assert (z[a] * z[b]).mean().abs() < bound


def test_temperature_changes_the_spread():
    logits = SMALL_LOGITS.expand(N, 5)
    seeds = torch.arange(N)

    def entropy(temperature):
        freq = torch.bincount(_sample(logits, temperature, 1.0, seeds, 0), minlength=5).double() / N
        return -(freq[freq > 0] * freq[freq > 0].log()).sum().item()

    cold, warm, hot = entropy(0.25), entropy(1.0), entropy(4.0)
    assert cold < warm - 0.3 and warm < hot - 0.1
    assert hot > 0.95 * math.log(5)


# --- nucleus (top_p) ------------------------------------------------------------------------------------------------

# probabilities in a shuffled vocabulary order; descending: 0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005
NUCLEUS_PROBS = torch.tensor([0.05, 0.25, 0.005, 0.4, 0.1, 0.015, 0.15, 0.03])


def _pick_rule_nucleus(logits, temperature, top_p):
    """The kept tokens as `hf._pick` computes them (its own lines, on one row)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
    return set(order[keep].tolist())


def test_top_p_keeps_exactly_the_nucleus_with_its_relative_odds():
    logits = NUCLEUS_PROBS.log()
    # cumulative probability before each (descending): 0, 0.4, 0.65, 0.8 -> top_p 0.7 keeps 0.4, 0.25, 0.15
    nucleus = {3, 1, 6}
    assert _pick_rule_nucleus(logits, 1.0, 0.7) == nucleus
    tokens = _sample(logits.expand(N, 8), 1.0, 0.7, torch.arange(N) + 5, 2)
    assert set(tokens.tolist()) == nucleus
    inside = torch.zeros(8)
    inside[list(nucleus)] = NUCLEUS_PROBS[list(nucleus)] / NUCLEUS_PROBS[list(nucleus)].sum()
    _assert_frequencies(tokens, inside)
    # top_p 1 keeps every token; a top_p below the top probability keeps only the most likely token
    assert set(_sample(logits.expand(N, 8), 1.0, 1.0, torch.arange(N), 2).tolist()) == set(range(8))
    assert set(_sample(logits.expand(500, 8), 1.0, 0.01, torch.arange(500), 2).tolist()) == {3}


def test_top_p_boundary_excludes_the_token_whose_preceding_mass_equals_top_p():
    logits = NUCLEUS_PROBS.log()
    sorted_probs = torch.softmax(logits, -1).sort(descending=True).values
    top_p = (sorted_probs.cumsum(-1) - sorted_probs)[3].item()  # exactly the mass before the 4th token (~0.8)
    assert _pick_rule_nucleus(logits, 1.0, top_p) == {3, 1, 6}
    tokens = _sample(logits.expand(2000, 8), 1.0, top_p, torch.arange(2000), 0)
    assert set(tokens.tolist()) == {3, 1, 6}  # the 4th (p 0.1, ~200 draws if kept) is out


@pytest.mark.slow
def test_top_p_matches_the_cpu_sampler_rule_on_random_rows():
    gen = torch.Generator().manual_seed(3)
    b, v, draws = 24, 40, 300
    logits = torch.randn(b, v, generator=gen) * 2
    temperature = torch.rand(b, generator=gen) + 0.5
    top_p = torch.rand(b, generator=gen) * 0.9 + 0.05
    seen = [set() for _ in range(b)]
    for step in range(draws):
        tokens = sample_tokens(logits, temperature, top_p, torch.arange(b) * 31 + 1, torch.full((b,), step))
        for r, t in enumerate(tokens.tolist()):
            seen[r].add(t)
    for r in range(b):
        nucleus = _pick_rule_nucleus(logits[r], temperature[r].item(), top_p[r].item())
        assert seen[r] <= nucleus
    # over 300 draws most rows reach more than one token (the filter is not collapsing to greedy)
    assert sum(len(s) > 1 for s in seen) > b // 2


def test_top_p_rows_mixed_with_full_rows():
    logits = NUCLEUS_PROBS.log().expand(N, 8)
    top_p = torch.where(torch.arange(N) % 2 == 0, torch.tensor(0.7), torch.tensor(1.0))
    tokens = sample_tokens(logits, torch.ones(N), top_p, torch.arange(N), torch.zeros(N, dtype=torch.long))
    assert set(tokens[0::2].tolist()) == {3, 1, 6}
    assert set(tokens[1::2].tolist()) == set(range(8))


# --- row_seed -------------------------------------------------------------------------------------------------------


def test_row_seed_is_stable_and_distinct():
    assert row_seed(0, 0) == 3008887562355236763  # a change of the mix changes every sampled request: notice it
    assert row_seed(1234, 1) == 1201017538797595385
    values = [row_seed(42, j) for j in range(1000)]
    assert len(set(values)) == 1000
    assert all(0 <= s < 2**62 for s in values)
    assert values == [row_seed(42, j) for j in range(1000)]
    assert len({row_seed(s, 0) for s in range(1000)}) == 1000
    assert row_seed(1, 0) != row_seed(0, 1)
    # samples of one request draw differently
    logits = torch.zeros(300, 1000)
    a = _sample(logits, 1.0, 1.0, row_seed(7, 0), torch.arange(300))
    b = _sample(logits, 1.0, 1.0, row_seed(7, 1), torch.arange(300))
    assert (a == b).sum() < 5


# --- CUDA -----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype")
def test_cuda_matches_cpu_and_replays_in_a_cuda_graph():
    gen = torch.Generator().manual_seed(4)
    b, v = 64, 32000
    logits, temperature, top_p, seeds, steps = _random_rows(b, v, gen)
    temperature[::7] = 0.0
    dev = torch.device("cuda")
    gpu_rows = [x.to(dev) for x in (logits, temperature, top_p, seeds, steps)]
    assert torch.equal(sample_tokens(*gpu_rows).cpu(), sample_tokens(logits, temperature, top_p, seeds, steps))

    static = [x.clone() for x in gpu_rows]
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation inside the sampler raises
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            sample_tokens(*static)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = sample_tokens(*static)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    replayed = set()
    for k in range(1, 6):
        new_steps = steps + k
        static[4].copy_(new_steps.to(dev))
        graph.replay()
        expected = sample_tokens(logits, temperature, top_p, seeds, new_steps)
        assert torch.equal(out.cpu(), expected)
        replayed.add(tuple(out.cpu().tolist()))
    assert len(replayed) == 5  # new steps, new draws
