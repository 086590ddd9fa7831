"""`nsa-eval retrofit` on the CPU (model_adapters/retrofit.py, nsa_eval/retrofit.py): a tiny Llama with SmolLM2's
real tokenizer retrofitted for a few steps on real text; the loss falls, the state resumes into the same run, the
shipped file rebuilds the model it came from, and bad input is one line. The GPU twin (our kernels' gradients
against the reference's) is test_retrofit_gpu.py."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nsa_eval.model_adapters.retrofit import (Progress, Recipe, batch_at, distill_kl, fit_gates, load_state,
                                              student_from_base, train, trained_tensors)
from nsa_eval.model_adapters.retrofit_file import build_model, probe_logits, read_delta, save_delta
from nsa_eval.model_adapters.retrofit_corpus import build_corpus, read_corpus
from nsa_eval.model_adapters.runtime.checkpoint import from_pretrained

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nsa_eval"))
from cli_checks import assert_one_line_error, invoke  # noqa: E402

SMALL = dict(block=16, selected=4, window=32, lora_rank=4, seq_len=192, probes=32)
CLI_SMALL = ["--block", 16, "--selected", 4, "--window", 32, "--lora-rank", 4, "--seq-len", 192, "--probes", 32,
             "--device", "cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, smollm2_dir):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("corpus") / "corpus.bin"
    build_corpus(AutoTokenizer.from_pretrained(smollm2_dir), path, max_tokens=6000)
    return path


def test_corpus_is_real_text_with_its_hash_checked(corpus, smollm2_dir):
    from transformers import AutoTokenizer

    data = read_corpus(corpus)
    assert data.header["tokens"] == 6000 == data.ids.size and data.header["python"]
    text = AutoTokenizer.from_pretrained(smollm2_dir).decode(data.ids[:200].tolist())
    assert "import" in text or "def " in text or '"""' in text
    body = corpus.read_bytes()
    corpus.with_name("edited.bin").write_bytes(body[:-4] + b"\x01\x00\x00\x00")
    with pytest.raises(ValueError, match="do not match"):
        read_corpus(corpus.with_name("edited.bin"))


def test_fitted_gates_start_smollm2_near_its_teacher(smollm2_dir, corpus):
    """SmolLM2 with NSA at 192 tokens (window 32, 4 of 11 blocks): zero gates (0.5 each) scale attention by 1.5 and
    start far from the teacher; gates fitted on another window sum to ~1 and start several times closer."""
    ids = read_corpus(corpus).ids
    student = student_from_base(from_pretrained(smollm2_dir, dtype=torch.float32), Recipe(**SMALL))
    measured, _ = batch_at(ids, student.recipe, 0)
    other, _ = batch_at(ids, student.recipe, 1)

    def kl() -> float:
        with torch.no_grad():
            teacher, _ = student(measured, student=False)
            logits, _ = student(measured, student=True)
        return distill_kl(logits, teacher).item()

    zero_gates = kl()
    sums = fit_gates(student, other, (0.02, 0.49, 0.49))
    assert all(abs(s - 1.0) < 0.1 for s in sums), sums
    assert kl() < zero_gates / 3, (kl(), zero_gates)


def test_loss_falls_and_resume_continues_the_same_run(tiny_llama_dir, corpus, tmp_path):
    ids = read_corpus(corpus).ids
    base = from_pretrained(tiny_llama_dir)
    recipe = Recipe(base="tiny", warmup_steps=3, steps=9, lr=5e-3, gate_lr=2e-3, **SMALL)
    one_window = ids[:recipe.seq_len + 1]  # every step trains on the same window: `fixed`
    fixed, probes = batch_at(one_window, recipe, 0)

    def loss_on_fixed(student):
        with torch.no_grad():
            teacher, _ = student(fixed, student=False)
            logits, mass = student(fixed, student=True, probes=probes)
        return distill_kl(logits, teacher).item() + mass.item()

    learner = student_from_base(base, recipe)
    before = loss_on_fixed(learner)
    train(learner, one_window, tmp_path / "one.pt", Progress(), lambda r: None, save_every=100)
    assert loss_on_fixed(learner) < 0.5 * before

    whole = student_from_base(base, recipe)
    train(whole, ids, tmp_path / "whole.pt", Progress(), lambda r: None, save_every=100)

    class Stop(Exception):
        pass

    def stop_after_7(record):
        if record["step"] == 7:
            raise Stop

    cut = student_from_base(base, recipe)
    with pytest.raises(Stop):
        train(cut, ids, tmp_path / "cut.pt", Progress(), stop_after_7, save_every=5)
    resumed = student_from_base(base, recipe)
    progress, optimizer_state = load_state(resumed, tmp_path / "cut.pt")
    assert progress.step == 5
    train(resumed, ids, tmp_path / "cut.pt", progress, lambda r: None, save_every=5, optimizer_state=optimizer_state)
    expected, got = trained_tensors(whole), trained_tensors(resumed)
    assert progress.step == 12 and all(torch.equal(expected[k], got[k]) for k in expected)
    with pytest.raises(ValueError, match="other settings"):
        load_state(student_from_base(base, Recipe(base="tiny", seed=1, **SMALL)), tmp_path / "cut.pt")


def test_shipped_file_rebuilds_the_model_it_came_from(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    base = from_pretrained(tiny_llama_dir)
    student = student_from_base(base, Recipe(base="tiny", **SMALL))
    with torch.no_grad():  # trained-looking tensors, rounded to float16 as the file stores them
        generator = torch.Generator().manual_seed(0)
        for p in student.parameters():
            if p.requires_grad:
                p.copy_((torch.randn(p.shape, generator=generator) * 0.05).half().float())
    from nsa_eval.model_adapters.retrofit_file import base_fingerprint

    record = {"recipe": {**Recipe(base="tiny", **SMALL).__dict__}, "base_fingerprint": base_fingerprint(base.state_dict())}
    save_delta(student, tmp_path / "r.safetensors", record)
    rebuilt = build_model(base, *read_delta(tmp_path / "r.safetensors"))
    ids = torch.tensor([AutoTokenizer.from_pretrained(tiny_llama_dir)("def f(x):\n    return x + 1\n" * 30)["input_ids"]])
    with torch.no_grad():
        expected, _ = student(ids, student=True)
        got = rebuilt(ids).logits
    assert rebuilt.config.attention == "nsa" and rebuilt.config.shared_kv and rebuilt.config.compression == "mean"
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    other = from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        other.embed.weight[0, 0] += 1
    with pytest.raises(ValueError, match="not those the retrofit was trained on"):
        build_model(other, *read_delta(tmp_path / "r.safetensors"))


@pytest.mark.slow
def test_cli_retrofit_writes_a_loadable_nsa_checkpoint_and_resumes(tiny_llama_dir, corpus, tmp_path):
    out = tmp_path / "out"
    args = ["retrofit", "--base", f"hf:{tiny_llama_dir}", "--out", out, "--corpus", corpus, "--warmup-steps", 2,
            "--steps", 2, "--save-every", 2, *CLI_SMALL]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "step 4/4" in result.output and "ETA" in result.output
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and [r["stage"] for r in log] == [1, 1, 2, 2]
    tensors, record = read_delta(out / "retrofit.safetensors")
    assert record["corpus"]["sha256"] == read_corpus(corpus).sha256 and record["recipe"]["seed"] == 0
    assert record["git_sha"] and record["versions"]["torch"] and record["steps"] == 4
    model = from_pretrained(out / "checkpoint")
    assert model.config.attention == "nsa" and (out / "checkpoint" / "tokenizer.json").is_file()
    from transformers import AutoTokenizer

    probe = probe_logits(model, AutoTokenizer.from_pretrained(out / "checkpoint"))
    assert [i for i, _ in probe["top8"]] == [i for i, _ in record["probe"]["top8"]]
    assert np.allclose([v for _, v in probe["top8"]], [v for _, v in record["probe"]["top8"]], rtol=1e-4, atol=1e-4)
    again = invoke(*args)  # the same command again: already done, nothing retrained
    assert again.exit_code == 0 and "resuming at step 4 of 4" in again.output
    assert len((out / "log.jsonl").read_text().splitlines()) == 4


def test_cli_bad_input_is_one_line(tiny_llama_dir, tmp_path):
    assert_one_line_error(invoke("retrofit", "--base", "hf:/nonexistent/base", "--out", tmp_path / "o"),
                          "/nonexistent/base", "config.json")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    assert_one_line_error(invoke("retrofit", "--base", f"hf:{gpt2}", "--out", tmp_path / "o"), "gpt2", "Llama-family")
    assert_one_line_error(invoke("retrofit", "--base", "nsa:x", "--out", tmp_path / "o"), "smollm2 or hf:PATH")
    assert_one_line_error(invoke("retrofit", "--base", f"hf:{tiny_llama_dir}", "--out", tmp_path / "o",
                                 "--lora-rank", 4096, "--max-file-mb", 1), "MB", "--lora-rank")
    assert_one_line_error(invoke("retrofit", "--base", f"hf:{tiny_llama_dir}", "--out", tmp_path / "o",
                                 "--seq-len", 100000), "--seq-len 100000", "4096 positions")
    assert_one_line_error(invoke("retrofit", "--base", f"hf:{tiny_llama_dir}", "--out", tmp_path / "o",
                                 "--seq-len", 64), "--seq-len 64")
    for bad in ("0.5,0.5", "0,1,0", "a,b,c"):  # two gates; gates must lie strictly inside (0, 1); not numbers
        assert_one_line_error(invoke("retrofit", "--base", f"hf:{tiny_llama_dir}", "--out", tmp_path / "o",
                                     "--gate-init", bad), f"--gate-init '{bad}'", "compressed,selected,window")
    (tmp_path / "junk.bin").write_bytes(b"not a corpus\n")
    assert_one_line_error(invoke("retrofit", "--base", f"hf:{tiny_llama_dir}", "--out", tmp_path / "o",
                                 "--corpus", tmp_path / "junk.bin", *CLI_SMALL), "junk.bin", "not a retrofit corpus")
    assert not (tmp_path / "o" / "state.pt").exists()


@pytest.mark.slow
def test_smollm2_nsa_rebuilds_the_model_its_retrofit_made(smollm2_dir, tmp_path, monkeypatch):
    """The shipped file (model_adapters/smollm2_nsa.safetensors) built onto smollm2 gives the probe logits the
    retrofit recorded from the model it made, and `--model smollm2-nsa` loads it as an NSA model."""
    from transformers import AutoTokenizer

    from nsa_eval.model_adapters.smollm2 import SHIPPED_NSA, nsa_checkpoint
    from nsa_eval.models import MODEL_KINDS

    monkeypatch.setenv("NSA_EVAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("nsa_eval.model_adapters.smollm2.plain_checkpoint", lambda: Path(smollm2_dir))
    assert SHIPPED_NSA.stat().st_size <= 10e6 and "smollm2-nsa" in MODEL_KINDS
    _, record = read_delta(SHIPPED_NSA)
    folder = nsa_checkpoint()
    assert folder.parent == tmp_path / "cache" and nsa_checkpoint() == folder  # built once, then reused
    model = from_pretrained(folder)
    assert model.config.attention == "nsa" and model.config.num_selected == record["recipe"]["selected"]
    probe = probe_logits(model, AutoTokenizer.from_pretrained(folder))
    assert [i for i, _ in probe["top8"]] == [i for i, _ in record["probe"]["top8"]]
    assert np.allclose([v for _, v in probe["top8"]], [v for _, v in record["probe"]["top8"]], rtol=1e-3, atol=1e-3)
