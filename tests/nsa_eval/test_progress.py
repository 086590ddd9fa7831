"""Progress while a run generates: long generations are never silent (tokens generated, samples decoding, at least every
interval), and no ETA is projected from the first answer alone."""

import io
import os
import re
import subprocess
import sys
import time

import pytest

from nsa_eval.progress import PlainProgress, heartbeat


def test_the_first_answer_gives_no_eta_and_later_lines_a_measured_one():
    stream = io.StringIO()
    progress = PlainProgress(stream, interval=0)
    bar = progress.add_task("niah", total=10)
    progress.start(bar)
    progress.tokens(bar, 120, 4)
    progress.advance(bar, 1)
    progress.advance(bar, 4)
    progress.tokens(bar, 300, 2)
    progress.advance(bar, 5)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "niah: 10 of 10 samples to answer"
    assert re.fullmatch(r"niah: 0/10 samples, 120 tokens generated \([\d.]+ tokens/s\), 4 samples decoding", lines[1])
    assert lines[2].startswith("niah: 1/10 samples, first after 0:00:0") and "ETA" not in lines[2]
    assert re.match(r"niah: 5/10 samples, [\d.]+ samples/s, ETA \d:\d\d:\d\d", lines[3])
    assert re.fullmatch(r"niah: 5/10 samples, [\d.]+ samples/s, ETA \d:\d\d:\d\d, 300 tokens generated "
                        r"\([\d.]+ tokens/s\), 2 samples decoding", lines[4])  # a log's tokens line keeps the ETA
    assert re.fullmatch(r"niah: 10/10 samples, [\d.]+ samples/s, 0:00:0\d elapsed", lines[5])


@pytest.mark.slow
def test_a_long_generation_in_a_log_shows_tokens_at_least_every_interval(shared_data, tmp_path):
    interval = 2
    command = [sys.executable, "-m", "nsa_eval", "run", "--model", "smollm2", "--tasks", "aime", "--data",
               f"aime={shared_data / 'aime24' / 'test.jsonl'}", "--limit", "1", "--task-option", "aime.n_samples=2",
               "--max-new-tokens", "40", "--output", str(tmp_path / "run")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "NSA_EVAL_PROGRESS_INTERVAL": str(interval)})
    timed = [(time.monotonic(), line.rstrip("\n")) for line in process.stderr]
    assert process.wait() == 0, timed
    start = next(i for i, (_, line) in enumerate(timed) if line == "aime: 1 of 1 samples to answer")
    end = next(i for i, (_, line) in enumerate(timed) if line.startswith("aime: 1/1 samples"))
    ticks = timed[start:end + 1]
    assert len(ticks) >= 4, ticks  # the 2 x 40 tokens take several intervals on 2 shared cores
    for _, line in ticks[1:-1]:
        assert re.fullmatch(r"aime: 0/1 samples, \d+ tokens generated \([\d.]+ tokens/s\), [12] samples decoding", line)
    decoding = ticks[1:]  # from the first token on (the prompt's prefill before it reports no tokens)
    gaps = [later - earlier for (earlier, _), (later, _) in zip(decoding, decoding[1:])]
    assert max(gaps) <= interval + 5, gaps  # every interval, + the once-a-second report and one decode step (shared CPU)


def test_a_slow_step_before_the_first_sample_says_it_is_still_working():
    """A task building its samples (e.g. 74 token counts through a server without ?tokenizer=) prints a line every
    interval rather than nothing; a quick one prints nothing."""
    stream = io.StringIO()
    with heartbeat("niah: building its samples", stream=stream, interval=0.2):
        time.sleep(0.7)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 2 and all(re.fullmatch(r"niah: building its samples \(\d+ s so far\)", line) for line in lines)
    quiet = io.StringIO()
    with heartbeat("niah: building its samples", stream=quiet, interval=5):
        pass
    assert quiet.getvalue() == ""


def test_token_count_reports_tokens_and_rows_decoding_from_each_steps_updates():
    from nsa_eval.model_adapters.base import TokenUpdate
    from nsa_eval.runner import TokenCount

    reports = []
    count = TokenCount(lambda generated, rows: reports.append((generated, rows)))
    count.reported = 0.0  # long ago: the next step reports
    count.take([TokenUpdate(0, 0, [1], False), TokenUpdate(0, 1, [2], False)])
    count.take([TokenUpdate(0, 0, [1, 3], False)])  # within the second: counted, not reported
    count.reported = 0.0
    count.take([TokenUpdate(0, 0, [1, 3, 4], True), TokenUpdate(0, 1, [2, 5], False)])
    count.reported = 0.0
    count.take([TokenUpdate(0, 1, [2, 5, 6], True)])  # no row left decoding: the sample's own line says it
    assert reports == [(2, 2), (5, 1)]
