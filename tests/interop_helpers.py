"""Helpers shared by the interop tests: a local lm-eval task folder and our server on loopback."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# serve_forever's default poll of 0.5 s is how long shutdown() can wait for the loop to notice: half a second per
# server a test starts and stops
POLL_S = 0.05

# Eight arithmetic questions with four choices each; `answer` indexes the correct one.
TOY_ROWS = [
    {"question": f"What is {a} plus {b}?", "choices": [str(a + b + d) for d in shift], "answer": shift.index(0),
     "target": str(a + b)}
    for (a, b), shift in zip(
        [(1, 2), (2, 3), (4, 5), (7, 1), (3, 3), (6, 2), (5, 5), (8, 1)],
        [(0, 1, 2, 3), (1, 0, 2, 3), (2, 1, 0, 3), (3, 2, 1, 0), (0, 2, 1, 3), (1, 3, 0, 2), (2, 0, 3, 1), (3, 1, 2, 0)],
    )
]

TOY_MC = """task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
num_fewshot: 1
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""

TOY_GEN = """task: toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: target
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
filter_list:
  - name: first-number
    filter:
      - function: regex
        regex_pattern: "(\\\\d+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
"""


def write_lm_eval_tasks(folder: Path) -> Path:
    """toy_mc (multiple choice, 1-shot, acc and acc_norm) and toy_gen (greedy generation, regex filter,
    exact_match) as lm-eval YAML files over a local jsonl file in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in TOY_ROWS))
    (folder / "toy_mc.yaml").write_text(TOY_MC.format(data=data))
    (folder / "toy_gen.yaml").write_text(TOY_GEN.format(data=data))
    return folder


@contextmanager
def serving(model, served_name: str = "tiny", **options) -> Iterator:
    """Our OpenAI-compatible server for `model` on 127.0.0.1 (a free port), in a thread, for the `with` block."""
    from nsa_eval.serve import OpenAIServer

    server = OpenAIServer(model, served_name, "127.0.0.1", 0, quiet=True, **options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": POLL_S}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
