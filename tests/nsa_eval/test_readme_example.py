"""The README's "Adding a task" example works as written: one module plus one registration line."""

import json
import re
import types

from click.testing import CliRunner

from nsa_eval import registry
from nsa_eval.cli import main
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_readme_task_example_runs_end_to_end(tiny_llama_dir, tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(# tasks/capitals.py\n.*?)```", readme, re.S).group(1)
    module = types.ModuleType("capitals")
    exec(compile(code, "README.md", "exec"), module.__dict__)
    monkeypatch.setitem(registry.TASKS, "capitals", module.Capitals)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "--model", f"hf:{tiny_llama_dir}", "--tasks", "capitals",
                                       "--output", str(out), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())["tasks"]["capitals"]
    assert metrics["n"] == 3 and "exact_match" in metrics["metrics"]
    sample = module.Capitals().samples(types.SimpleNamespace(chat=False, limit=None))[0]
    assert module.Capitals().score(sample, ["It is Paris."]) == {"exact_match": 1.0}
    assert module.Capitals().score(sample, ["Lyon"]) == {"exact_match": 0.0}
