"""The repository's top-level folders never shadow an installed package (DESIGN.md, "Layout").

Python started from the checkout's root puts the root first on sys.path (`python -c`, `python -m pytest`, torchrun's
workers, a notebook opened there). transformers (5.25 and later) imports Hugging Face's `kernels` package whenever it
is installed, so a `kernels/__init__.py` at the root broke `from transformers import LlamaConfig` there. These tests
run Python in a subprocess exactly so and fail when any top-level folder of ours hides a package of the same name.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib.metadata, importlib.util, json, os, sys
root = os.path.realpath(os.getcwd())
names = sorted(p for p in os.listdir(root) if os.path.isdir(p) and p.isidentifier())
installed = importlib.metadata.packages_distributions()
found = {}
for name in names:
    spec = importlib.util.find_spec(name)
    origin = None if spec is None else (spec.origin or list(spec.submodule_search_locations or [None])[0])
    found[name] = {"origin": origin and os.path.realpath(origin), "distributions": installed.get(name, []),
                   "regular_package_here": os.path.isfile(os.path.join(root, name, "__init__.py"))}
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # imports `kernels`
import nsa_eval, nsa_eval.cli, nsa_eval.kernels.nsa, nsa_eval.model_adapters.runtime.model, nsa_eval.tasks.gsm8k
print(json.dumps({"path0": sys.path[0], "root": root, "found": found,
                  "nsa_eval": os.path.realpath(nsa_eval.__file__),
                  "nsa_eval.kernels": [os.path.realpath(p) for p in nsa_eval.kernels.__path__]}))
"""


def probe_from_root() -> dict:
    """Run PROBE with the checkout's root as the working directory and as sys.path[0] (`python -c`)."""
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_top_level_folders_shadow_no_installed_package():
    result = probe_from_root()
    assert result["path0"] in ("", result["root"])
    assert {"kernels", "tasks", "model_adapters", "nsa_eval"} <= set(result["found"])
    for name, seen in result["found"].items():
        if name == "nsa_eval":
            continue
        assert not seen["regular_package_here"], (
            f"{name}/__init__.py makes the folder an importable package `{name}` from the root")
        if seen["distributions"]:  # an installed distribution provides `name`: it must win
            ours = f"{result['root']}/{name}"
            assert seen["origin"] and seen["origin"] != ours and not seen["origin"].startswith(ours + "/"), (name, seen)
    # the project itself is the checkout's, with its subpackages from the folders beside nsa_eval/
    assert result["nsa_eval"] == str(ROOT / "nsa_eval" / "__init__.py")
    assert result["nsa_eval.kernels"] == [str(ROOT / "kernels")]


def test_huggingface_kernels_is_what_import_kernels_finds_when_installed():
    result = probe_from_root()
    kernels = result["found"]["kernels"]
    if not kernels["distributions"]:  # transformers >= 5.25 depends on it; the lock installs it
        import pytest

        pytest.skip("no installed distribution provides `kernels`")
    assert "site-packages" in kernels["origin"] and not kernels["origin"].startswith(result["root"] + "/kernels"), kernels
