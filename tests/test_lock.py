"""scripts/setup.sh installs the exact versions of constraints/cpu.txt (the lock the test suite passed with)."""

import importlib.metadata
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints" / "cpu.txt"


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def test_lock_pins_torch_to_the_cpu_build_and_every_line_is_exact():
    pins = locked_versions()
    assert pins["torch"].startswith("2.13.0"), pins["torch"]
    assert {"transformers", "triton", "tokenizers", "kernels", "lm-eval", "pytest"} <= set(pins)


@pytest.mark.skipif(os.environ.get("NSA_EVAL_LOCK_REFRESH") == "1", reason="scripts/lock.sh tests the newest releases")
@pytest.mark.skipif(Path(sys.prefix).resolve() != ROOT / ".venv", reason="not the environment scripts/setup.sh made")
def test_installed_versions_equal_the_lock():
    """What `pip freeze` shows after scripts/setup.sh --dev: every locked name at its locked version."""
    installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version for d in importlib.metadata.distributions()}
    differ = {name: (version, installed.get(name)) for name, version in locked_versions().items()
              if installed.get(name) != version}
    assert not differ, f"installed versions differ from constraints/cpu.txt (locked, installed): {differ}"
