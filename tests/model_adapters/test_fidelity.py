"""Selection fidelity (model_adapters/runtime/fidelity.py): recall of dense attention's top-n blocks and the dense mass
share, by hand on hand-made q/k, on a tiny random NSA model (reference and Triton kernels), and on the embedded
SmolLM2 with training-free sparse attention over a NIAH prompt (its dense mass is transformers' own attention)."""

import math

import pytest
import torch

from nsa_eval.model_adapters.runtime.config import ModelConfig, SparseSettings
from nsa_eval.model_adapters.runtime.fidelity import (Selection, dense_mass, inspect_prompt, query_positions,
                                                      selection_fidelity)
from nsa_eval.model_adapters.runtime.model import Transformer

# Hand-made case: 8 tokens, blocks of 2 (4 blocks), one KV head with two query heads, one-hot keys and scale 1, so
# the score of key s is log(weight s): each head's dense attention at t = 7 is its weights over their sum.
HEAD_0 = [1, 1, 4, 4, 0.5, 0.5, 2, 2]  # sum 15: block masses 2/15, 8/15, 1/15, 4/15
HEAD_1 = [5, 1, 1, 1, 2, 2, 1, 1]  # sum 14: block masses 6/14, 2/14, 4/14, 2/14
# summed over the group (eq. 10): block 0 0.562, block 1 0.676, block 2 0.352, block 3 0.410 -> top 2 = {1, 0}


def hand_made(weights_0=HEAD_0, weights_1=HEAD_1):
    q = torch.tensor([[math.log(w) for w in weights_0], [math.log(w) for w in weights_1]])[None]  # [1, HQ=2, D=8]
    k = torch.eye(8)[:, None, :]  # [S=8, H=1, D=8]
    return q, k


def fidelity(q, k, indices, position, selection):
    recall, share = selection_fidelity(q, k, torch.tensor([[indices]]), torch.tensor([position]), selection, scale=1.0)
    return recall.item(), share.item()


def test_recall_and_mass_share_by_hand():
    q, k = hand_made()
    two = Selection("sparse", block=2, num_selected=2)
    # blocks 3 and 1: one of the dense top 2 ({1, 0}); mass (12/15 + 4/14) / 2
    recall, share = fidelity(q, k, [3, 1], 7, two)
    assert recall == 0.5
    assert share == pytest.approx((12 / 15 + 4 / 14) / 2, abs=1e-6)
    # the dense top 2 itself, in either order
    recall, share = fidelity(q, k, [1, 0], 7, two)
    assert recall == 1.0
    assert share == pytest.approx((10 / 15 + 8 / 14) / 2, abs=1e-6)
    # neither of the top 2
    assert fidelity(q, k, [2, 3], 7, two)[0] == 0.0
    # top 3 = {1, 0, 3}: blocks 3, 2, 1 hold two of them
    assert fidelity(q, k, [3, 2, 1], 7, Selection("sparse", 2, 3))[0] == pytest.approx(2 / 3)
    # NSA's window of the last 3 tokens joins the selected blocks 3 and 1: tokens {2, 3, 5, 6, 7}
    recall, share = fidelity(q, k, [3, 1], 7, Selection("nsa", block=2, num_selected=2, window=3))
    assert recall == 0.5
    assert share == pytest.approx((12.5 / 15 + 6 / 14) / 2, abs=1e-6)


def test_the_dense_mass_is_each_heads_softmax_summed_over_the_group():
    q, k = hand_made()
    mass = dense_mass(q, k, torch.tensor([7]), scale=1.0)[0, 0]
    expected = torch.tensor(HEAD_0) / 15 + torch.tensor(HEAD_1) / 14
    torch.testing.assert_close(mass, expected)
    early = dense_mass(q, k, torch.tensor([3]), scale=1.0)[0, 0]  # tokens 0..3 only
    torch.testing.assert_close(early, torch.tensor([1 / 10, 1 / 10, 4 / 10, 4 / 10, 0, 0, 0, 0]) +
                               torch.tensor([5 / 8, 1 / 8, 1 / 8, 1 / 8, 0, 0, 0, 0]))


def test_n_is_capped_by_the_visible_blocks_and_ties_count_for_the_selection():
    q, k = hand_made()
    three = Selection("sparse", block=2, num_selected=3)
    # at t = 3 two blocks exist: n = 2, both selected (a -1 slot unused) -> everything attended
    recall, share = fidelity(q, k, [0, 1, -1], 3, three)
    assert recall == 1.0 and share == pytest.approx(1.0, abs=1e-6)
    # at t = 2 the query's own block holds token 2 only: selecting block 1 attends token 2, not 3
    recall, share = fidelity(q, k, [1, -1, -1], 2, three)
    assert recall == 0.5  # n = 2 visible blocks, one selected
    weights = torch.tensor([[1.0, 1, 4], [5, 1, 1]])
    assert share == pytest.approx(float((weights[:, 2] / weights.sum(1)).mean()), abs=1e-6)
    # equal weights: every block ties, so any 2 selected blocks are a top 2
    flat_q, flat_k = hand_made([1] * 8, [1] * 8)
    assert fidelity(flat_q, flat_k, [2, 3], 7, Selection("sparse", 2, 2)) == (1.0, pytest.approx(0.5, abs=1e-6))


def test_query_positions_end_at_the_last_token():
    assert query_positions(100, 4) == [24, 49, 74, 99]
    assert query_positions(5, 8) == [0, 1, 2, 3, 4]
    assert query_positions(1000, 1) == [999]


def test_full_attention_has_no_selection():
    fields = dict(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, v_head_dim=16, intermediate_size=48, max_position_embeddings=512)
    with pytest.raises(ValueError, match="no block selection"):
        Selection.of(ModelConfig(**fields, attention="full"))
    sparse = Selection.of(ModelConfig(**fields, attention="sparse", sparse=SparseSettings(192, 32, 64, 32)))
    assert sparse == Selection("sparse", 32, 6, 0)
    assert Selection.of(ModelConfig(**fields, attention="nsa")) == Selection("nsa", 64, 16, 512)


def tiny_nsa(layers=2, **overrides) -> Transformer:
    fields = dict(vocab_size=97, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, v_head_dim=16, intermediate_size=48, max_position_embeddings=512,
                  attention="nsa", block_len=16, block_stride=16, select_len=16, num_selected=3, window=16,
                  compression="mean", shared_kv=True)
    return Transformer(ModelConfig(**{**fields, **overrides})).init_weights(std=0.3, seed=0).eval()


def test_a_tiny_nsa_model_in_slices_and_whole():
    """Every layer reports every position; recall 1 while the n blocks cover the context (t < 48), a prefill in
    slices gives what one pass gives, and the capture leaves the model as it was."""
    model = tiny_nsa()
    ids = torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(3))
    positions = [10, 47, 48, 90, 149]
    recall, share = inspect_prompt(model, ids, positions)
    assert recall.shape == share.shape == (2, 5, 2)
    assert bool((recall[:, :2] == 1).all()) and torch.allclose(share[:, :2], torch.ones(2, 2, 2))
    assert bool((recall >= 0).all() and (recall <= 1).all() and (share <= 1 + 1e-6).all())
    assert float(recall[:, 2:].mean()) < 1  # 4+ blocks, 3 selected: random weights choose some other block
    model.prefill_chunk = 40
    sliced = inspect_prompt(model, ids, positions)
    torch.testing.assert_close(sliced[0], recall)
    torch.testing.assert_close(sliced[1], share, rtol=1e-5, atol=1e-5)
    assert all(layer.attn.observe is None for layer in model.layers)


@pytest.mark.slow
def test_triton_kernels_select_what_the_reference_selects():
    """The NSA prefill on our Triton kernels (the interpreter on the CPU; on CUDA where present) and on the reference
    give the same recall and mass share."""
    model = tiny_nsa(layers=1)
    ids = torch.randint(0, 97, (80,), generator=torch.Generator().manual_seed(4))
    positions = [15, 50, 79]
    model.kernel_choice = "reference"
    reference = inspect_prompt(model, ids, positions)
    model.kernel_choice = "triton"
    if torch.cuda.is_available():
        model.cuda()
    triton = inspect_prompt(model, ids, positions)
    torch.testing.assert_close(triton[0], reference[0])
    torch.testing.assert_close(triton[1], reference[1], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_recall_on_the_embedded_model_with_sparse_attention(monkeypatch):
    """SmolLM2 with training-free sparse attention on a tiny NIAH prompt (about 200 tokens, blocks of 16): a budget
    that covers the context gives recall and mass share 1 at every layer, head and position, with dense attention
    equal to transformers' own (eager) attention weights; a budget of 5 blocks (1 leading + 3 local forced, 1 chosen)
    keeps recall 1 where at most 5 blocks exist and lowers recall and mass share beyond."""
    from transformers import AutoModelForCausalLM

    from nsa_eval.model_adapters.runtime import fidelity
    from nsa_eval.model_adapters.runtime.checkpoint import from_pretrained
    from nsa_eval.model_adapters.smollm2 import plain_checkpoint
    from nsa_eval.models import LoadOptions, load_model
    from nsa_eval.registry import task_factory
    from nsa_eval.runner import generation_request
    from nsa_eval.tasks.base import TaskContext

    covering = SparseSettings(budget=256, leading=16, local=32, block=16)
    engine = load_model("smollm2", LoadOptions(device="cpu", attention="sparse", sparse=covering, engine="native",
                                               batch_size=1))
    ctx = TaskContext(count_tokens=engine.count_tokens, chat=engine.chat, max_length=engine.max_length)
    sample = task_factory("niah")(lengths=[200], depths=[50]).samples(ctx)[0]
    ids = torch.tensor(engine.prompt_ids(generation_request(sample, 0))[0])
    assert 150 < len(ids) <= 200
    positions = query_positions(len(ids), 8)

    seen = []  # what each layer's observer compared: (q, k) of the model's own prefill
    original = fidelity.selection_fidelity
    monkeypatch.setattr(fidelity, "selection_fidelity",
                        lambda q, k, *rest, **kw: seen.append((q, k)) or original(q, k, *rest, **kw))
    recall, share = inspect_prompt(engine.model, ids, positions)
    assert bool((recall == 1).all())
    torch.testing.assert_close(share, torch.ones_like(share), rtol=0, atol=1e-5)

    hf = AutoModelForCausalLM.from_pretrained(str(plain_checkpoint()), attn_implementation="eager")
    with torch.no_grad():
        attentions = hf(ids[None], output_attentions=True).attentions  # per layer [1, HQ, T, T]
    at = torch.tensor(positions)
    groups = engine.model.config.num_attention_heads // engine.model.config.num_key_value_heads
    assert len(seen) == 30
    for number in (0, 15, 29):
        q, k = seen[number]
        ours = dense_mass(q, k, at, 1 / math.sqrt(q.shape[-1]))
        theirs = attentions[number][0][:, at].unflatten(0, (-1, groups)).sum(1).transpose(0, 1)  # [P, H, T]
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)

    small = from_pretrained(plain_checkpoint(), attention="sparse",
                            sparse=SparseSettings(budget=80, leading=16, local=32, block=16)).eval()
    recall, share = inspect_prompt(small, ids, positions)
    covered = [p // 16 + 1 <= 5 for p in positions]
    assert any(covered) and not all(covered)
    for i, inside in enumerate(covered):
        if inside:
            assert bool((recall[:, i] == 1).all())
            torch.testing.assert_close(share[:, i], torch.ones_like(share[:, i]), rtol=0, atol=1e-5)
    beyond = torch.tensor([not inside for inside in covered])
    assert float(recall[:, beyond].mean()) < 0.95
    assert float(share[:, beyond].mean()) < 0.99
    assert bool((recall[:, beyond] < 1).any(dim=0).all())  # at every position beyond, some layer and head miss
