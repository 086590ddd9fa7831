"""Our attention inside transformers models (model_adapters/hf_attention.py): full attention equals transformers'
sdpa, and the training-free sparse mode (budget covering the prompt = full; cache = recompute; the kept blocks)."""

import pytest
import torch
from click.testing import CliRunner

from nsa_eval.model_adapters import hf_attention
from nsa_eval.model_adapters.runtime import sparse
from nsa_eval.model_adapters.hf_attention import SPARSE_ATTENTION, TRITON_ATTENTION, SparseSettings


def tiny_llama(seed=0, head_dim=16, dtype=torch.float32, device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=4 * head_dim, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def logits(model, implementation, ids, mask, settings=None):
    hf_attention.register()
    model.set_attn_implementation(implementation)
    model.config.nsa_eval_sparse = settings
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def padded_batch(T=300, pad=37, device="cpu"):
    ids = torch.randint(0, 300, (2, T), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


def close_on_tokens(ours, reference, pad, **tolerance):
    torch.testing.assert_close(ours[0], reference[0], **tolerance)
    torch.testing.assert_close(ours[1, pad:], reference[1, pad:], **tolerance)


def test_full_attention_equals_transformers_sdpa():
    model = tiny_llama()
    ids, mask = padded_batch()
    reference = logits(model, "sdpa", ids, mask)
    close_on_tokens(logits(model, TRITON_ATTENTION, ids, mask), reference, 37, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_triton_path_equals_transformers_sdpa(monkeypatch):
    """Our Triton kernels (interpreter on the CPU), prefill with padding and a decode step over the cache."""
    from nsa_eval.kernels.attention import decode, parallel

    monkeypatch.setattr(hf_attention, "attention", parallel.attention)
    monkeypatch.setattr(hf_attention, "attention_decode", decode.attention_decode)
    model = tiny_llama()
    ids, mask = padded_batch(T=40, pad=9)
    reference = logits(model, "sdpa", ids, mask)
    close_on_tokens(logits(model, TRITON_ATTENTION, ids, mask), reference, 9, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # a decode step over the cache of the first 39 tokens
        out = model(input_ids=ids[:, :39], attention_mask=mask[:, :39], use_cache=True)
        step = model(input_ids=ids[:, 39:], attention_mask=mask, cache=out.past_key_values).logits[:, 0]
    torch.testing.assert_close(step, reference[:, 39], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_sparse_with_a_budget_covering_the_prompt_equals_full_attention():
    model = tiny_llama()
    ids, mask = padded_batch()
    reference = logits(model, "sdpa", ids, mask)
    covering = SparseSettings(budget=320, leading=16, local=48, block=16)  # 20 blocks of 16 >= 300 tokens
    close_on_tokens(logits(model, SPARSE_ATTENTION, ids, mask, covering), reference, 37, rtol=1e-5, atol=1e-5)
    small = SparseSettings(budget=96, leading=16, local=33, block=16)  # 6 blocks of 16 of the up to 19
    assert (logits(model, SPARSE_ATTENTION, ids, mask, small) - reference)[0].abs().max() > 1e-2


def test_sparse_decode_over_the_cache_equals_the_prompt_pass():
    """Queries after cached tokens (the reference with query positions) choose as the prompt pass (the kernels)."""
    model = tiny_llama()
    ids, _ = padded_batch()
    settings = SparseSettings(budget=96, leading=16, local=33, block=16)
    whole = logits(model, SPARSE_ATTENTION, ids[:1], None, settings)
    with torch.no_grad():
        out = model(input_ids=ids[:1, :290], use_cache=True)
        cache = out.past_key_values
        for t in range(290, 300):
            out = model(input_ids=ids[:1, t:t + 1], cache=cache)
            cache = out.past_key_values
            torch.testing.assert_close(out.logits[0, -1], whole[0, t], rtol=1e-5, atol=1e-5)


def test_sparse_triton_path_equals_the_reference_path(monkeypatch):
    """A prompt slice and decode steps after cached tokens on the Triton NSA kernels (interpreter on the CPU, the
    queries offset into the cache) choose and attend as the reference path, which equals the one-pass prompt."""
    import nsa_eval.kernels.nsa
    from nsa_eval.kernels.nsa import compression, selected

    model = tiny_llama()
    ids, _ = padded_batch(T=60)
    settings = SparseSettings(budget=40, leading=8, local=9, block=8)  # 5 of up to 8 blocks of 8 tokens
    whole = logits(model, SPARSE_ATTENTION, ids[:1], None, settings)[0, 40:58]

    def cached_passes():
        with torch.no_grad():
            out = model(input_ids=ids[:1, :40], use_cache=True)
            out = model(input_ids=ids[:1, 40:56], cache=out.past_key_values)  # a 16-token slice after 40 tokens
            rows = [out.logits[0]]
            for t in range(56, 58):
                out = model(input_ids=ids[:1, t:t + 1], cache=out.past_key_values)
                rows.append(out.logits[0])
        return torch.cat(rows)

    reference = cached_passes()
    torch.testing.assert_close(reference, whole, rtol=1e-5, atol=1e-5)
    # the sparse rule (runtime/sparse.py) calls the NSA package's dispatchers: point them at the Triton kernels
    monkeypatch.setattr(nsa_eval.kernels.nsa, "compressed_attention", compression.compressed_attention)
    monkeypatch.setattr(nsa_eval.kernels.nsa, "selected_attention", selected.selected_attention)
    launches = []
    triton_fwd = selected.selected_fwd
    monkeypatch.setattr(selected, "selected_fwd", lambda *a, **kw: launches.append(1) or triton_fwd(*a, **kw))
    torch.testing.assert_close(cached_passes(), reference, rtol=1e-4, atol=1e-4)
    assert len(launches) == 4 * 2  # the prompt, the slice and 2 decode steps in each of the 2 layers: Triton ran


@pytest.mark.slow
def test_sparse_generation_with_a_sliced_prompt_equals_one_pass(tiny_llama_dir):
    """--attention sparse with --prefill-chunk: HFModel's loop prefills 7-token slices over the cache (left-padded
    batch) and generates what one pass does."""
    from nsa_eval.model_adapters.base import GenerationRequest
    from nsa_eval.models import LoadOptions, load_model

    settings = SparseSettings(budget=40, leading=8, local=9, block=8)  # 5 blocks of 8: fewer than the prompt's
    requests = [GenerationRequest(" ".join(str(i) for i in range(40)), max_new_tokens=6),
                GenerationRequest("a b c", max_new_tokens=6)]
    texts = {}
    for chunk in (None, 7):
        lm = load_model(f"hf:{tiny_llama_dir}", LoadOptions(device="cpu", attention="sparse", sparse=settings,
                                                            batch_size=2, prefill_chunk=chunk))
        texts[chunk] = [g.texts for g in lm.generate(requests)]
    assert texts[7] == texts[None]


def test_sparse_select_keeps_leading_local_then_most_important():
    """sparse_select (one ranking with the sparse rule's forced blocks) keeps, per query, the same blocks as the
    rule stated two-step: NSA's selection, then the leading and local blocks forced in (oracle below)."""
    from nsa_eval.kernels.nsa import reference
    from nsa_eval.kernels.nsa.layout import NSALayout
    from nsa_eval.kernels.nsa.utils import mean_pool

    torch.manual_seed(0)
    settings = SparseSettings(budget=64, leading=8, local=20, block=8)  # 8 blocks: 1 leading, up to 4 local
    B, S, T, HQ, H, D = 2, 150, 40, 4, 2, 16
    q, k = torch.randn(B, T, HQ, D), torch.randn(B, S, H, D)
    k_mean = mean_pool(k, 8)
    layout = NSALayout(8, 8, 8, num_selected=8, window=0)
    _, lse = reference.compressed_attention(q, k_mean, k_mean, layout=layout, seq_len=S, scale=D ** -0.5)
    got = sparse.sparse_select(q, k_mean, lse, S, settings, D ** -0.5, max_scores=300)  # sliced over queries
    nsa = reference.select_blocks(q, k_mean, lse, layout=layout, seq_len=S, scale=D ** -0.5)
    want = _keep_leading_and_local(nsa, torch.arange(S - T, S).expand(B, T), settings)
    as_sets = lambda x: [sorted(i for i in row if i >= 0) for row in x.reshape(-1, 8).tolist()]  # noqa: E731
    assert as_sets(got) == as_sets(want)
    positions = torch.arange(S - T, S).expand(B, T)  # and exactly the reference's ranking with the forced blocks
    assert torch.equal(got, reference._select(q, k_mean, lse, positions, S, layout, D ** -0.5, 1, 20))
    first = got[..., :3].reshape(-1, 3).tolist()  # forced blocks rank first: block 0 in every row
    assert all(0 in row for row in first)


def _keep_leading_and_local(indices: torch.Tensor, positions: torch.Tensor, settings: SparseSettings) -> torch.Tensor:
    """The n = budget / block blocks each query keeps: the leading blocks and the blocks covering its last `local`
    tokens (never after its own block), then the most important others in the order of `indices`.

    indices [B, T, H, n] int32 from select_blocks (most important first, -1 unused; its forced blocks 0, current and
    current - 1 are among ours); positions [B, T] of the queries. Returns int32 [B, T, H, n], -1 padded.
    """
    block, n = settings.block, indices.shape[-1]
    pos = positions.long()[:, :, None, None]  # [B, T, 1, 1]
    current = pos // block
    first_local = (pos - settings.local + 1).clamp(min=0) // block
    lead = settings.leading_blocks
    leading = torch.arange(lead, device=indices.device)
    local = first_local + torch.arange(settings.local_blocks, device=indices.device)
    forced = torch.cat([torch.where(leading <= current, leading, -1),
                        torch.where((local <= current) & (local >= lead), local, -1)], dim=-1)
    forced = forced.expand(*indices.shape[:3], forced.shape[-1])
    chosen = indices.long()
    is_forced = (chosen < lead) | ((chosen >= first_local) & (chosen <= current))
    others = (chosen >= 0) & ~is_forced
    room = n - (forced >= 0).sum(-1, keepdim=True)
    taken = torch.where(others & (others.cumsum(-1) <= room), chosen, -1)
    merged = torch.cat([forced, taken], dim=-1)
    order = torch.sort((merged < 0).to(torch.int8), dim=-1, stable=True).indices
    return merged.gather(-1, order)[..., :n].to(torch.int32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(budget=256, local=64, block=64), "--sparse-local 64 must exceed --sparse-block 64"),
    (dict(budget=256), r"--sparse-budget 256 tokens hold 4 blocks of 64 tokens, fewer than the 11 blocks \(704 tokens\)"),
    (dict(block=0), "--sparse-block must be a positive integer"),
])
def test_sparse_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseSettings(**kwargs)


@pytest.mark.slow
def test_cli_sparse_run_on_a_tiny_llama(tiny_llama_dir, tmp_path):
    import json

    from nsa_eval.cli import main

    out = tmp_path / "run"
    args = ["run", "--model", f"hf:{tiny_llama_dir}", "--tasks", "niah", "--niah-lengths", "512", "--niah-depths", "50",
            "--quiet", "--attention", "sparse", "--sparse-budget", "256", "--sparse-leading", "16", "--sparse-local",
            "48", "--sparse-block", "16", "--output", str(out)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["name"].endswith("+sparse256")
    assert run["attention"] == "sparse" and run["sparse"] == {"budget": 256, "leading": 16, "local": 48, "block": 16}
    bad = CliRunner().invoke(main, args[:-2] + ["--sparse-budget", "32", "--output", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and bad.output.strip().splitlines()[-1].startswith("Error: --sparse-budget 32")


# ---- GPU (bfloat16) -------------------------------------------------------------------------------------------

gpu = pytest.mark.gpu  # skipped where torch sees no CUDA device (tests/conftest.py)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@gpu
def test_gpu_triton_attention_matches_sdpa_in_bf16():
    model = tiny_llama(head_dim=64, dtype=torch.bfloat16, device="cuda")
    ids, mask = padded_batch(T=2000, pad=300, device="cuda")
    reference = logits(model, "sdpa", ids, mask)
    ours = logits(model, TRITON_ATTENTION, ids, mask)
    assert rel_err(ours[0], reference[0]) < 2e-2 and rel_err(ours[1, 300:], reference[1, 300:]) < 2e-2
    covering = SparseSettings(budget=2048, leading=64, local=128, block=64)
    sparse = logits(model, SPARSE_ATTENTION, ids, mask, covering)
    assert rel_err(sparse[0], ours[0]) < 2e-2 and rel_err(sparse[1, 300:], ours[1, 300:]) < 2e-2
