"""RunConfig: one configuration from the command line. The NIAH flags are aliases of --task-option niah.* (same
tasks, same run.json settings, so a run resumes whichever spelling the rerun uses); run.json's settings keep the
form older runs recorded; settings that do nothing are refused."""

import pytest

from nsa_eval.model_adapters.runtime.config import SparseSettings
from nsa_eval.run_config import RunConfig


def config(**given):
    """RunConfig.from_cli as `nsa-eval run` calls it: every flag present, None where the user gave none."""
    flags = dict(model_spec="smollm2", attention="full", sparse_budget=None, sparse_leading=None, sparse_local=None,
                 sparse_block=None, sparse_selection=None, task_list="niah", data_pairs=(), task_options=(), niah_lengths=None,
                 niah_depths=None, niah_samples=None, haystack=None, include_path=None, allow_code_execution=False)
    return RunConfig.from_cli(**{**flags, **given})


def test_niah_flags_are_aliases_of_task_options(tmp_path):
    (tmp_path / "essay.txt").write_text("One sentence here. Another one there. And a third.")
    flags = config(niah_lengths="256,1k", niah_depths="0,50", niah_samples=2, haystack=tmp_path)
    options = config(task_options=("niah.lengths=256,1024", "niah.depths=0,50", "niah.samples_per_cell=2",
                                   f"niah.haystack_dir={tmp_path}"))
    assert flags.settings() == options.settings()
    assert flags.build_tasks()["niah"].config() == options.build_tasks()["niah"].config()
    task = flags.build_tasks()["niah"]
    assert (task.lengths, task.depths, task.samples_per_cell) == ([256, 1024], [0, 50], 2)


def test_settings_keep_the_form_older_runs_recorded():
    """A run made before RunConfig resumes: the NIAH grid under its flags, defaults included, other options as text."""
    assert config(task_list="niah,gsm8k", task_options=("gsm8k.num_fewshot=0",), limit=2, seed=3).settings() == {
        "--model": "smollm2", "--tasks": ["niah", "gsm8k"], "--attention": "full", "--limit": 2, "--max-new-tokens": None,
        "--seed": 3, "--max-length": None, "--device": "auto", "--dtype": "auto", "--chat-template": None,
        "--niah-lengths": [1024, 2048, 4096], "--niah-depths": [0, 25, 50, 75, 100], "--niah-samples": 1,
        "--haystack": None, "--task-option gsm8k.num_fewshot": "0"}


def test_sparse_settings_take_the_defaults_of_the_flags_left_out():
    sparse = config(attention="sparse", sparse_budget=384, sparse_local=128, sparse_block=32)
    assert sparse.sparse == SparseSettings(budget=384, leading=128, local=128, block=32)
    assert sparse.settings()["--sparse-leading"] == 128
    assert config().sparse is None and "--sparse-budget" not in config().settings()


@pytest.mark.parametrize("given, message", [
    (dict(task_list="gsm8k", niah_lengths="1k"), "--niah-lengths applies to the niah task, which is not among --tasks"),
    (dict(niah_depths="0", task_options=("niah.depths=50",)), "--niah-depths and --task-option niah.depths both set"),
    (dict(sparse_budget=384), "--sparse-budget applies only with --attention sparse"),
    (dict(task_list="gsm8k", allow_code_execution=True), "--allow-code-execution applies to humaneval"),
    (dict(attention="sparse", sparse_budget=64), "--sparse-budget 64 tokens hold 1 block of 64 tokens"),
    (dict(task_list=" , "), "--tasks is empty"),
])
def test_settings_that_do_nothing_or_conflict_are_refused(given, message):
    with pytest.raises(ValueError, match=message):
        config(**given)
