"""The native generation engine (model_adapters/runtime/engine.py) on the CPU, float32: token for token against
transformers (Llama, Qwen2, Qwen3, Mistral), seeded sampling independent of the batch, n samples from one prefill,
stop sequences and EOS, NSA decode through the cache (reference and Triton-interpreter kernels), training-free
sparse attention against transformers' sparse path, bad input, and the runner streaming from it.

Tiny random models (hidden 32-64, 1-2 layers) with SmolLM2's real tokenizer (vocab 49152; the sampling tests use a
BPE of about 200 tokens learnt here); weights drawn with a large std (0.3) so that logits are peaked and greedy text
does not collapse into one repeated token. About 35 s on 2 shared CPU cores."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from nsa_eval.model_adapters.base import GenerationRequest, LoglikelihoodRequest
from nsa_eval.model_adapters.hf import HFModel
from nsa_eval.model_adapters.native import load_native
from nsa_eval.model_adapters.runtime.config import ModelConfig, SparseSettings
from nsa_eval.model_adapters.runtime.sampling import row_seed, sample_tokens
from nsa_eval.tasks.base import Task

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a king who had three daughters and",
    "1, 2, 3, 4,",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Hello",
]
MAX_NEW = [12, 7, 15, 5, 10]  # different budgets: rows finish on different steps and free rows take new requests
LONG = ("Once upon a time, in a land far away, there lived a king who had three daughters. The eldest was proud, "
        "the second was clever, and the youngest was kind to every creature of the forest, the river and the hills. "
        "One morning a stranger came to the castle gate and asked for bread.")
SAMPLED = dict(temperature=0.8, top_p=0.9)


def randomize(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> None:
    """normal(0, std) for every matrix and bias; norm weights 1 + normal(0, 0.2) (so a swapped or dropped norm
    weight shows)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.2 * noise if "norm" in name else std * noise)


def greedy_reference(model, ids: list[int], steps: int) -> list[int]:
    """Greedy tokens, each from a full forward pass over the prompt and the tokens so far (no cache)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def sampled_reference(model, ids: list[int], steps: int, seed: int, sample: int, temperature: float,
                      top_p: float, eos: set[int] = frozenset()) -> list[int]:
    """Sample `sample` of a request, drawn alone: a full forward pass per token (its own prefill), the engine's
    sampler with the row's seed row_seed(seed, sample) and the row's step; up to an EOS id (not included)."""
    seq = list(ids)
    with torch.no_grad():
        for step in range(steps):
            logits = model(torch.tensor([seq])).logits[:, -1]
            token = int(sample_tokens(logits, torch.tensor([temperature]), torch.tensor([top_p]),
                                      torch.tensor([row_seed(seed, sample)]), torch.tensor([step]))[0])
            if token in eos:
                break
            seq.append(token)
    return seq[len(ids):]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---- transformers checkpoints ---------------------------------------------------------------------------------

TINY_HF = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 10000.0}  # wavelengths of 16..64 get smoothed
SLIDING_WINDOW = 8


def hf_classes(case: str):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    return {"llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True, rope_parameters=LLAMA3)),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v biases
            "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16)),  # qk_norm
            "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=SLIDING_WINDOW))}[case]


@pytest.fixture(scope="module")
def small_tokenizer():
    """A byte-level BPE tokenizer of about 200 tokens learnt from the prompts here (every token decodes to ASCII):
    for the sampling tests, whose sampler sorts and hashes the whole vocabulary every step."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([LONG, *PROMPTS], trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                                                  show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tokenizer, small_tokenizer):
    """(case, small) -> folder of a tiny random transformers checkpoint saved with SmolLM2's tokenizer (vocab
    49152), or with small_tokenizer (small=True); made on first use."""
    made = {}

    def get(case: str, small: bool = False) -> Path:
        if (case, small) not in made:
            tok = small_tokenizer if small else tokenizer
            config_cls, model_cls, extra = hf_classes(case)
            config = config_cls(**{**TINY_HF, "vocab_size": len(tok)}, **extra, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id)
            torch.manual_seed(0)
            model = model_cls(config)
            randomize(model)
            path = tmp_path_factory.mktemp(case)
            model.save_pretrained(path)
            tok.save_pretrained(path)
            made[case, small] = path
        return made[case, small]

    return get


def what_the_case_tests(case: str, config: ModelConfig) -> None:
    """The native model is built with the feature the case is about (else the comparison proves little)."""
    if case == "llama":
        assert config.tie_word_embeddings and config.rope_scaling["rope_type"] == "llama3"
    elif case == "qwen2":
        assert config.qkv_bias and not config.o_bias
    elif case == "qwen3":
        assert config.qk_norm
    else:
        assert config.sliding_window == SLIDING_WINDOW


@pytest.mark.parametrize("case", ["llama", *(pytest.param(case, marks=pytest.mark.slow)
                                              for case in ("qwen2", "qwen3", "mistral"))])
def test_native_greedy_equals_transformers(case, hf_dirs):
    folder = hf_dirs(case)
    ours = load_native(folder, device="cpu", batch_size=2)  # 2 rows for 5 requests: freed rows are refilled
    theirs = HFModel.from_pretrained(str(folder), device="cpu", batch_size=2)
    what_the_case_tests(case, ours.model.config)
    requests = [GenerationRequest(p, max_new_tokens=k) for p, k in zip(PROMPTS, MAX_NEW)]
    got, want = ours.generate(requests), theirs.generate(requests)
    assert [g.texts for g in got] == [g.texts for g in want]
    assert [g.new_tokens for g in got] == [g.new_tokens for g in want] == [[k] for k in MAX_NEW]
    assert [g.finish_reasons for g in got] == [g.finish_reasons for g in want]
    assert [g.prompt_tokens for g in got] == [g.prompt_tokens for g in want]
    assert len({g.texts[0] for g in got}) == len(PROMPTS) and len(set(got[2].texts[0].split())) > 5  # not degenerate
    assert max(g.prompt_tokens for g in got) > 2 * SLIDING_WINDOW  # the window cuts the prompt (mistral)
    # the prompt's logits (Transformer.forward, one pass) and a padded batch of them
    ids = torch.tensor([ours.encode(PROMPTS[1])])
    with torch.no_grad():
        torch.testing.assert_close(ours.model(ids).logits, theirs.model(ids).logits, rtol=1e-5, atol=1e-5)
    # log-likelihoods: padded batches of 2 on both
    lls = [LoglikelihoodRequest("The capital of France is", " Paris"), LoglikelihoodRequest(PROMPTS[1], " a son"),
           LoglikelihoodRequest("1, 2, 3,", " 4, 5"), LoglikelihoodRequest("Hello", " world")]
    got_ll, want_ll = ours.loglikelihood(lls), theirs.loglikelihood(lls)
    for a, b in zip(got_ll, want_ll):
        assert a.logprob == pytest.approx(b.logprob, rel=1e-5, abs=1e-4)
        assert (a.is_greedy, a.continuation_tokens, a.truncated) == (b.is_greedy, b.continuation_tokens, b.truncated)
    assert len({round(a.logprob, 3) for a in got_ll}) == len(lls)


# ---- sampling ---------------------------------------------------------------------------------------------------


def test_seeded_sampling_is_independent_of_batch_size_and_order(hf_dirs):
    lm = load_native(hf_dirs("llama", small=True), device="cpu", batch_size=1)
    requests = [GenerationRequest(p, max_new_tokens=k, n=3, seed=100 + i, **SAMPLED)
                for i, (p, k) in enumerate(zip(PROMPTS[:3], (6, 4, 5)))]
    requests.append(GenerationRequest(PROMPTS[3], max_new_tokens=5))  # a greedy row among the sampled ones
    texts = {}
    for batch_size in (1, 2, 4):  # the same engine, its batch raised after a run (the cache must follow)
        lm.batch_size = batch_size
        texts[batch_size] = [g.texts for g in lm.generate(requests)]
        texts[batch_size, "reversed"] = [g.texts for g in lm.generate(requests[::-1])][::-1]
    first = texts[1]
    assert all(t == first for t in texts.values()), texts
    assert all(len(set(t)) == 3 for t in first[:3])  # three different samples per request
    other_seeds = [GenerationRequest(r.prompt, max_new_tokens=r.max_new_tokens, n=3, seed=r.seed + 7, **SAMPLED)
                   for r in requests[:3]]
    assert all(a != b for a, b in zip([g.texts for g in lm.generate(other_seeds)], first[:3]))


def test_n_samples_from_one_prefill_equal_separate_runs(hf_dirs, monkeypatch):
    """A request's n samples share one prefill (the staging slot, copied into a slot per sample); each equals its
    sample drawn alone with its own prefill and no cache (sampled_reference)."""
    lm = load_native(hf_dirs("llama", small=True), device="cpu", batch_size=3)
    prefills = []
    prefill = lm.model.prefill
    monkeypatch.setattr(lm.model, "prefill", lambda ids, cache, row: prefills.append(row) or prefill(ids, cache, row))
    request = GenerationRequest(PROMPTS[1], max_new_tokens=8, n=3, seed=7, **SAMPLED)
    together = lm.generate([request])[0]  # three samples start at once from the staging slot
    assert prefills == [3]  # one prefill, into the staging slot (after the 3 decoding slots)
    lm.batch_size = 1  # one slot: each sample starts when the one before has finished, from the staging slot
    prefills.clear()
    one_by_one = lm.generate([request])[0]
    assert prefills == [1]
    assert together.texts == one_by_one.texts and len(set(together.texts)) == 3
    assert together.new_tokens == one_by_one.new_tokens
    assert together.finish_reasons == one_by_one.finish_reasons
    ids = lm.encode(request.prompt)
    for j, text in enumerate(together.texts):
        alone = sampled_reference(lm.model, ids, 8, request.seed, j, **SAMPLED, eos=lm.eos_ids)
        assert text == lm.tokenizer.decode(alone, skip_special_tokens=True), j
        assert together.new_tokens[j] == len(alone)
        assert together.finish_reasons[j] == ("length" if len(alone) == 8 else "stop")


# ---- stop sequences, EOS, max_new_tokens ------------------------------------------------------------------------


@pytest.mark.slow
def test_stop_sequences_eos_and_one_token(hf_dirs, tmp_path):
    folder = hf_dirs("llama")
    ours = load_native(folder, device="cpu", batch_size=2)
    theirs = HFModel.from_pretrained(str(folder), device="cpu")
    tok = ours.tokenizer
    ids = ours.encode(PROMPTS[0])
    tokens = greedy_reference(ours.model, ids, 12)
    text = tok.decode(tokens, skip_special_tokens=True)
    assert ours.generate([GenerationRequest(PROMPTS[0], max_new_tokens=12)])[0].texts == [text]

    # a stop string inside the 6th token's text: the text is cut before it, the 6 tokens are counted
    piece = tok.decode(tokens[5:6]).strip()
    stop = piece[1:3] if len(piece) > 2 else piece
    at = next(t for t in range(1, 13) if stop in tok.decode(tokens[:t], skip_special_tokens=True))
    assert at > 1
    requests = [GenerationRequest(PROMPTS[0], max_new_tokens=12, stop=["never there", stop]),
                GenerationRequest(PROMPTS[1], max_new_tokens=9),
                GenerationRequest(PROMPTS[0], max_new_tokens=12, stop=[tok.decode(tokens[:1])]),  # on the 1st token
                GenerationRequest(PROMPTS[2], max_new_tokens=1),
                GenerationRequest(PROMPTS[0], max_new_tokens=1, n=3, seed=1, **SAMPLED)]
    got, want = ours.generate(requests), theirs.generate(requests[:4])
    assert got[0].texts == [text[:text.index(stop)]] and got[0].finish_reasons == ["stop"]
    assert got[0].new_tokens == [at]
    assert (got[2].texts, got[2].new_tokens, got[2].finish_reasons) == ([""], [1], ["stop"])
    assert got[3].new_tokens == [1] and got[3].finish_reasons == ["length"]
    assert got[3].texts == [tok.decode(greedy_reference(ours.model, ours.encode(PROMPTS[2]), 1),
                                       skip_special_tokens=True)]
    for a, b in zip(got, want):
        assert (a.texts, a.new_tokens, a.finish_reasons) == (b.texts, b.new_tokens, b.finish_reasons)
    first = [tok.decode(sampled_reference(ours.model, ids, 1, 1, j, **SAMPLED)) for j in range(3)]
    assert got[4].texts == first and got[4].new_tokens == [1, 1, 1] and got[4].finish_reasons == ["length"] * 3

    # EOS: generation_config.json names the 4th greedy token as an end of sequence; the row ends before it
    eos_folder = tmp_path / "eos"
    shutil.copytree(folder, eos_folder)
    eos = tokens[3]
    (eos_folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, eos]}))
    ours, theirs = load_native(eos_folder, device="cpu", batch_size=2), HFModel.from_pretrained(str(eos_folder),
                                                                                                device="cpu")
    assert eos in ours.eos_ids and eos in theirs.eos_ids
    ends = tokens.index(eos)
    requests = [GenerationRequest(PROMPTS[0], max_new_tokens=12), GenerationRequest(PROMPTS[1], max_new_tokens=9),
                GenerationRequest(PROMPTS[4], max_new_tokens=10)]
    got, want = ours.generate(requests), theirs.generate(requests)
    assert got[0].texts == [tok.decode(tokens[:ends], skip_special_tokens=True)]
    assert got[0].new_tokens == [ends] and got[0].finish_reasons == ["stop"]
    for a, b in zip(got, want):
        assert (a.texts, a.new_tokens, a.finish_reasons) == (b.texts, b.new_tokens, b.finish_reasons)


# ---- NSA ------------------------------------------------------------------------------------------------------

PAPER = dict(block_len=8, block_stride=4, select_len=8, num_selected=4, window=16, compression="mlp",
             compress_hidden_size=16, shared_kv=False)
FLA = dict(block_len=8, block_stride=8, select_len=8, num_selected=4, window=0, compression="mean", shared_kv=True)


def nsa_model(tokenizer, layout, layers=2, hidden=64, heads=4, kv_heads=2):
    from nsa_eval.model_adapters.runtime.model import Transformer

    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16, v_head_dim=16,
                         intermediate_size=2 * hidden, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **layout)
    return Transformer(config).init_weights(std=0.3, seed=0).eval()


@pytest.mark.parametrize("layout", [pytest.param(PAPER, marks=pytest.mark.slow), FLA], ids=["paper", "fla"])
def test_nsa_engine_batches_as_alone_and_decodes_as_recomputing(layout, tokenizer, tmp_path):
    from nsa_eval.model_adapters.runtime.checkpoint import save_pretrained

    save_pretrained(nsa_model(tokenizer, layout), tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm = load_native(tmp_path, device="cpu", batch_size=2, max_length=64)  # a small cache: cheap decode steps
    new = 2 * layout["block_len"] + 3  # compressed blocks complete during decode (every 4 or 8 tokens)
    requests = [GenerationRequest(p, max_new_tokens=new) for p in PROMPTS[:4]]
    together = [g.texts for g in lm.generate(requests)]
    lm.batch_size = 1
    assert [lm.generate([r])[0].texts for r in requests] == together
    for i in (0, 1):  # 5 and 19 prompt tokens: blocks complete on different steps in the two rows
        tokens = greedy_reference(lm.model, lm.encode(PROMPTS[i]), new)
        assert together[i] == [lm.tokenizer.decode(tokens, skip_special_tokens=True)]
        assert len(set(tokens)) > new // 2  # no collapse into one repeated token


@pytest.mark.slow
def test_nsa_engine_on_triton_kernels_equals_the_reference(tokenizer):
    """Triton kernels in the interpreter (TRITON_INTERPRET=1, tests/conftest.py): prefill over selection blocks
    and decode steps of which one completes a compressed block."""
    from nsa_eval.model_adapters.runtime.engine import Engine

    model = nsa_model(tokenizer, {**PAPER, "num_selected": 2, "window": 8}, layers=1, hidden=32, heads=2, kv_heads=1)
    lm = Engine(model, tokenizer, "tiny-nsa", max_length=32, batch_size=2)  # a small cache: a cheap interpreter
    # 22 prompt tokens (more than the 2 selected blocks of 8) and 1: a block completes in one row, not the other
    requests = [GenerationRequest("1, 2, 3, 4, 5, 6, 7, 8", max_new_tokens=4),
                GenerationRequest("Hello", max_new_tokens=4)]
    prompt = len(lm.encode(requests[0].prompt))
    assert prompt > 16 and any((prompt + t - 8) % 4 == 0 for t in range(1, 4))
    reference = [g.texts for g in lm.generate(requests)]
    model.kernel_choice = "triton"
    assert [g.texts for g in lm.generate(requests)] == reference


# ---- training-free sparse attention --------------------------------------------------------------------------


@pytest.mark.slow
def test_sparse_native_equals_transformers_sparse(hf_dirs):
    from nsa_eval.model_adapters.hf_attention import attn_implementation, enable_sparse

    folder = hf_dirs("llama")
    settings = SparseSettings(budget=48, leading=8, local=16, block=8)
    ours = load_native(folder, device="cpu", batch_size=2, attention="sparse", sparse=settings, max_length=128)
    assert ours.model.config.attention == "sparse" and ours.name.endswith("+sparse48")
    theirs = HFModel.from_pretrained(str(folder), device="cpu",
                                     attn_implementation=attn_implementation("sparse", torch.device("cpu")))
    enable_sparse(theirs, settings)
    prompts = [LONG, PROMPTS[1]]
    lengths = [len(ours.encode(p)) for p in prompts]
    assert lengths[0] > settings.budget  # selection matters from the prompt on
    new = 20
    got = ours.generate([GenerationRequest(p, max_new_tokens=new) for p in prompts])
    for prompt, generation in zip(prompts, got):
        tokens = greedy_reference(theirs.model, ours.encode(prompt), new)
        assert generation.texts == [ours.tokenizer.decode(tokens, skip_special_tokens=True)]
    # and it is not full attention
    full = load_native(folder, device="cpu", batch_size=2)
    assert full.generate([GenerationRequest(LONG, max_new_tokens=new)])[0].texts != got[0].texts


# ---- bad input -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=256))
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_unsupported_architecture_on_the_native_engine(gpt2_dir, tmp_path):
    from nsa_eval.cli import main
    from nsa_eval.models import LoadOptions, load_model

    with pytest.raises(ValueError) as error:
        load_model(f"hf:{gpt2_dir}", LoadOptions(engine="native", device="cpu"))
    assert "--engine transformers" in str(error.value) and "\n" not in str(error.value)
    result = CliRunner().invoke(main, ["run", "--model", f"hf:{gpt2_dir}", "--engine", "native", "--tasks", "niah",
                                       "--niah-lengths", "256", "--niah-depths", "0", "--quiet", "--output",
                                       str(tmp_path / "run")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--engine transformers" in errors[0], result.output
    for engine in ("transformers", "auto"):
        assert isinstance(load_model(f"hf:{gpt2_dir}", LoadOptions(engine=engine, device="cpu")), HFModel)


# ---- the runner ------------------------------------------------------------------------------------------------


class TinyTask(Task):
    """Generative samples of different budgets (one sampled, n=2) and a log-likelihood sample."""

    name, version, headline, breakdown_keys = "tiny", "1", "nonempty", ("kind",)

    def config(self):
        return {}

    def samples(self, ctx):
        from nsa_eval.tasks.base import Sample

        items = [Sample(f"g{i}", p, target=None, breakdown={"kind": "gen"}, max_new_tokens=k)
                 for i, (p, k) in enumerate(zip(PROMPTS, MAX_NEW))]
        items.append(Sample("sampled", PROMPTS[1], target=None, breakdown={"kind": "gen"}, max_new_tokens=4, n=2,
                            **SAMPLED))
        items.append(Sample("ll", "The capital of France is", target=0, breakdown={"kind": "ll"},
                            continuations=[" Paris", " London"]))
        return items

    def score(self, sample, output):
        return {"nonempty": float(all(isinstance(x, tuple) or len(x) > 0 for x in output))}


def test_runner_streams_records_from_the_native_engine(hf_dirs, tmp_path):
    from nsa_eval.run_config import RunConfig
    from nsa_eval.runner import evaluate
    from nsa_eval.store import RunStore

    lm = load_native(hf_dirs("llama"), device="cpu", batch_size=2)
    lm.compile_s = 1.5  # as a warm-up on CUDA would leave it
    events = []
    step = lm.step

    def logged():
        out = step()
        events.extend(("finished", index) for index, _ in out.finished)
        return out

    lm.step = logged
    lm.generate = None  # generative samples must not go through generate()
    store = RunStore(tmp_path / "run")
    append = store.append
    store.append = lambda task, record: (events.append(("record", record.id)), append(task, record))[-1]
    metrics = evaluate(lm, {"tiny": TinyTask()}, store, RunConfig(model_spec="hf:tiny", tasks=("tiny",), seed=3),
                  show_progress=False)
    records = {r.id: r.to_json() for r in store.records("tiny")}
    assert sorted(records) == sorted(["g0", "g1", "g2", "g3", "g4", "sampled", "ll"])
    # each generation is written as soon as it finishes, before the next one finishes
    kinds = [kind for kind, _ in events]
    assert kinds == ["finished", "record"] * 6 + ["record"]
    assert [records[f"g{i}"]["new_tokens"] for i in range(5)] == [[k] for k in MAX_NEW]
    # each generation's decode cost (model_adapters/decode_cost.py; tests/model_adapters/test_decode_cost.py checks it)
    assert [records[f"g{i}"]["decode_steps"] for i in range(5)] == [k - 1 for k in MAX_NEW]
    assert all(records[f"g{i}"]["kv_bytes_per_step"] > 0 and records[f"g{i}"]["attended_share"] == 1.0
               for i in range(5))
    assert "kv_bytes_per_step" not in records["ll"]
    assert metrics["tasks"]["tiny"]["efficiency"]["kv_bytes_per_step_mean"] > 0
    assert len(records["sampled"]["responses"]) == 2 and len(records["ll"]["loglikelihoods"]) == 2
    run_info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_info["compile_s"] == 1.5 and run_info["engine"] == "Engine"
    assert metrics["tasks"]["tiny"]["n"] == 7
