"""nsa_eval/models.py: a spec parsed once, the load options checked once, each kind's check before anything loads
(nothing here loads a model)."""

import json

import pytest

from nsa_eval.models import KINDS, MODEL_KINDS, LoadOptions, ModelSpec, check_model


def test_a_spec_is_read_once_into_kind_and_target():
    assert ModelSpec.parse("hf:org/name") == ModelSpec("hf:org/name", "hf", "org/name")
    assert ModelSpec.parse("openai:http://h:1/v1#m").target == "http://h:1/v1#m"
    assert ModelSpec.parse("smollm2") == ModelSpec("smollm2", "smollm2")
    for bad, near in [("hff:x", "Did you mean 'hf'?"), ("smollm2:x", "Did you mean 'smollm2'?"), ("smollm2:", "")]:
        with pytest.raises(ValueError, match=f"unknown model spec '{bad}'") as error:
            ModelSpec.parse(bad)
        assert near in str(error.value) and str(error.value).endswith(f"Known specs: {', '.join(MODEL_KINDS)}.")
    assert list(MODEL_KINDS) == ["smollm2", "smollm2-nsa", "hf:PATH_OR_ID", "nsa:PATH", "openai:URL#MODEL", "vllm:PATH"]
    assert list(KINDS) == ["smollm2", "smollm2-nsa", "hf", "nsa", "openai", "vllm"]


@pytest.mark.parametrize("fields, message", [
    ({"engine": "fast"}, "--engine must be one of auto, native, transformers, got 'fast'"),
    ({"attention": "nsa"}, "--attention must be 'full' or 'sparse', got 'nsa'"),
    ({"prefill_chunk": -1}, "--prefill-chunk must be 0 (one pass) or a positive number of tokens, got -1"),
])
def test_option_values_are_checked_where_the_options_are_made(fields, message):
    with pytest.raises(ValueError) as error:
        LoadOptions(**fields)
    assert str(error.value) == message


def test_sparse_attention_gets_the_default_settings():
    assert LoadOptions(attention="sparse").sparse is not None and LoadOptions().sparse is None


@pytest.mark.parametrize("spec, fields, message", [
    ("openai:http://h:1/v1#m", {"engine": "native"},
     "--engine applies to smollm2, hf: and nsa: checkpoints, not to 'openai:http://h:1/v1#m'; leave it out"),
    ("smollm2-nsa", {"attention": "sparse"}, "--attention sparse applies to smollm2 and hf: checkpoints, not to 'smollm2-nsa'"),
    ("vllm:./x", {"prefill_chunk": 8},
     "--prefill-chunk applies to smollm2, hf: and nsa: checkpoints, not to 'vllm:./x'; leave it out"),
    ("smollm2-nsa", {"engine": "transformers"},
     "nsa: checkpoints run on the native engine only (transformers has no NSA attention); leave --engine out"),
    ("nsa:", {}, "model spec 'nsa:' needs a checkpoint folder, e.g. nsa:./my-checkpoint"),
    ("hf", {}, "model spec 'hf:' needs a checkpoint folder or hub id, e.g. hf:./my-checkpoint"),
    ("openai:localhost:8000", {}, "model spec 'openai:localhost:8000': give the server's URL, e.g. "
                                  "openai:http://127.0.0.1:8000/v1#MODEL"),
    ("openai:http://h:1/v1", {}, "model spec 'openai:http://h:1/v1' names no model; add '#MODEL' (what /v1/models lists)"),
    ("openai:http://h:1/v1?retry=3#m", {}, "model spec 'openai:http://h:1/v1?retry=3#m': unknown option retry; known: "
                                           "tokenizer, concurrency, timeout, retries, backoff, max_length, chat, api_key_env"),
    ("openai:http://h:1/v1?timeout=soon#m", {}, "openai: option timeout=soon is not a float"),
])
def test_each_kind_refuses_in_one_line_before_loading(spec, fields, message):
    with pytest.raises(ValueError) as error:
        check_model(spec, LoadOptions(**fields))
    assert str(error.value) == message


def test_local_folders_are_checked_and_vllm_needs_a_gpu(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert check_model(f"hf:{tmp_path}", LoadOptions()).kind == "hf"
    assert check_model(f"vllm:{tmp_path}", LoadOptions(device="cuda")).target == str(tmp_path)
    with pytest.raises(ValueError, match="vllm: runs on a CUDA GPU; use hf:PATH for --device cpu"):
        check_model(f"vllm:{tmp_path}", LoadOptions(device="cpu"))
    with pytest.raises(ValueError, match=f"'hf:{tmp_path}' is none of them: use --engine transformers"):
        check_model(f"hf:{tmp_path}", LoadOptions(engine="native"))
    with pytest.raises(ValueError, match=f"model folder {tmp_path / 'none'} does not exist"):
        check_model(f"nsa:{tmp_path / 'none'}", LoadOptions())
