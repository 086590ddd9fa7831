"""The Task base class's defaults: what the runner and the CLI get from a task that implements only config, samples
and score."""

import pytest

from nsa_eval.tasks.base import Sample, Task, aggregate_scores


class Plain(Task):
    name, version, headline, breakdown_keys = "plain", "1", "ok", ("kind",)

    def config(self):
        return {}

    def samples(self, ctx):
        return [Sample("a", "prompt", target=None, breakdown={"kind": "x"})]

    def score(self, sample, output):
        return {"ok": 1.0}


def test_the_defaults():
    task = Plain()
    sample = task.samples(None)[0]
    assert task.prepare() is None and task.check_length(16, None) is None
    assert task.details(sample, ["text"]) is None  # the runner stores no "details" for it
    assert (task.notices, task.limit_unit, Plain.limit_unit) == ((), None, None)
    records = [{"id": "a", "breakdown": {"kind": "x"}, "scores": {"ok": 1.0}},
               {"id": "b", "breakdown": {"kind": "y"}, "scores": {"ok": 0.0}}]
    assert task.aggregate(records) == aggregate_scores(records, ("kind",))


def test_a_task_without_score_is_refused_when_made():
    with pytest.raises(TypeError, match="score"):
        type("Half", (Task,), {"config": lambda self: {}, "samples": lambda self, ctx: []})()
