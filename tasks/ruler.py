"""RULER (Hsieh et al. 2024): 13 synthetic long-context tasks (retrieval, multi-hop tracing, aggregation, QA) at 4K-128K.

Generated as NVIDIA/RULER's scripts/data/synthetic/*.py generate them, with RULER's templates, answer prefixes,
generation budgets and metrics (ruler_data.py holds its constants, ruler_generators.py the generators):

- niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue, niah_multiquery: needles "One of the special magic
  {numbers|uuids} for {key} is: {value}." (keys: adjective-noun words or UUIDs; values: 7-digit numbers or
  UUIDs) in a haystack of RULER's noise paragraph repeated line after line, essays (needles at sentence
  boundaries, depths drawn from RULER's 40), or other needles; the question asks for the values of 1 or 4 keys;
  the template's "Some ... are" becomes "A ... is" when one value is asked for, as in RULER.
- vt: variable tracking, one chain of 4 hops ("VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE ", ...) at random lines
  of the noise haystack, after RULER's one in-context example (a chain of 3-letter names in at most 500 tokens,
  its names and value redrawn for each sample); answer: the 5 names.
- cwe: a numbered list of words (wonderwords' nouns, adjectives and verbs) where 10 appear 30 times and the rest 3
  (6 and 1 below 4K), after one worked example of 40 words (20 below 4K); answer: the 10 common words.
- fwe: coded 6-letter words drawn from a zeta(2) distribution over a vocabulary of (length - 50) / 50 words, the
  most frequent replaced by "..."; answer: the next three.
- qa_1 (SQuAD v2) and qa_2 (HotpotQA): the question's gold paragraphs among distractor documents ("Document i:"),
  only when their data is given: `--data ruler=DIR`, a folder holding RULER's squad.json (SQuAD dev-v2.0.json)
  and/or hotpotqa.json (hotpot_dev_distractor_v1.json); sample i asks question i at every length, as RULER.

Prompts: plain text is the task template followed by the answer prefix (RULER's "base" model template); chat
models get the template as the user message. A sample's length is counted as RULER counts it, prompt tokens
(the model's own tokenizer, chat template included) plus the task's tokens to generate, and lands within 1%
below each asked length (at most the length itself). Scores (RULER's scripts/eval): the response stripped, control
characters made newlines, then string_match_all (the share of the answers found in it, case-insensitive) for the
NIAH tasks, vt, cwe and fwe, string_match_part (1 when any answer is found) for QA; breakdown task x length;
the report prints RULER's table (models x lengths, averages) from it.

Options: lengths (default: RULER's 4K, 8K, 16K, 32K, 64K, 128K, those that fit the model's max length), tasks
(default: the 11 synthetic ones, and qa_1/qa_2 when their data is given), samples per task and length (500, as
RULER; `--limit N` keeps the first N of each), essays (a folder of .txt essays or RULER's PaulGrahamEssays.json;
also found as essays/ or PaulGrahamEssays.json inside the --data folder), seed.

Where this differs from RULER, and why:
- The essays haystack (Paul Graham's essays, downloaded by RULER's script) cannot be fetched here: without
  `essays`, the essay tasks (niah_single_2/3, niah_multikey_1, niah_multivalue, niah_multiquery) use RULER's noise
  haystack, and the run's config says so (`haystack`).
- Essays are split into sentences after ".", "!" or "?" and whitespace; RULER uses nltk's punkt model (a download).
- RULER draws needle keys from the sorted list of all adjective-noun pairs (6.2M strings); here an adjective and a
  noun are drawn on their own (the same distribution up to the pairs' rare collisions), without the 6.2M list.
- When a cwe context needs more distinct words than wonderwords has (about 8.7k, near 128K), RULER turns to its
  randle english_words.json, not on PyPI; here the list goes on with adjective-noun pairs of wonderwords' words.
- RULER searches the haystack size once per task and length and steps down by 25-500 units per sample, so its
  samples sit up to a few percent under the length; here every sample gets its own search (seeded from the
  estimate of the one before), and where one haystack unit is over 1% of the length (a UUID needle line or a QA
  document at 4K) the sample's random draws are redrawn, up to 32 times, until it lands within 1%.
- Random draws come from one generator per sample, seeded by (seed, task, length, index, draw), instead of RULER's
  global seed 42; RULER's samples are not reproduced string for string, its distributions are.
"""

from __future__ import annotations

import random
import string
from pathlib import Path
from typing import Any, Callable

from nsa_eval.tasks.base import Sample, Task, TaskContext, Tokens, aggregate_scores, macro_average, token_count
from nsa_eval.tasks.ruler_data import QA_FILES, SUBTASKS, TEMPLATES, QAData, essay_words, read_qa
from nsa_eval.tasks.ruler_generators import Built, build_cwe, build_fwe, build_niah, build_qa, build_vt, fit, redraw_icl

DEFAULT_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
SYNTHETIC = tuple(name for name in SUBTASKS if not name.startswith("qa_"))
TOLERANCE = 0.01  # a sample's length lands in [(1 - TOLERANCE) * length, length]
MAX_DRAWS = 32
VT_ICL_TOKENS = 500  # variable_tracking.py builds its in-context example under max_seq_length=500


# ---------------------------------------------------------------------------------------------- scoring


def postprocess(prediction: str) -> str:
    """RULER's postprocess_pred: stripped, control characters made newlines, stripped again."""
    prediction = prediction.strip()
    return "".join("\n" if ord(c) < 0x20 else c for c in prediction).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """The share of the references found in the prediction, case-insensitive (RULER's string_match_all, per sample)."""
    return sum(r.lower() in prediction.lower() for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """1 when any reference is found in the prediction, case-insensitive (RULER's string_match_part, per sample)."""
    return max(float(r.lower() in prediction.lower()) for r in references)


# ---------------------------------------------------------------------------------------------- the task


class Ruler(Task):
    """options: lengths, tasks, samples (per task and length), essays, data_path (QA data folder), seed."""

    name = "ruler"
    version = "1"
    headline = "score"
    breakdown_keys = ("task", "length")

    def __init__(
        self,
        lengths: list[Tokens] | tuple[Tokens, ...] | Tokens | None = None,
        tasks: list[str] | str | None = None,
        samples: int = 500,
        essays: str | None = None,
        data_path: str | None = None,
        seed: int = 0,
    ):
        if isinstance(lengths, (int, str)):
            lengths = [lengths]
        self.lengths = sorted({token_count(n, "RULER length") for n in lengths}) if lengths is not None else None
        if self.lengths is not None and (not self.lengths or self.lengths[0] < 1024):
            raise ValueError(f"RULER lengths {lengths}: each length must be at least 1024 tokens")
        if isinstance(tasks, str):
            tasks = [t.strip() for t in tasks.split(",") if t.strip()]
        unknown = [t for t in tasks or [] if t not in SUBTASKS]
        if unknown:
            raise ValueError(f"RULER task '{unknown[0]}' is unknown; RULER's tasks: {', '.join(SUBTASKS)}")
        if samples < 1:
            raise ValueError(f"RULER samples {samples}: use at least 1 sample per task and length")
        self.data_path = data_path
        if data_path is not None and not Path(data_path).is_dir():
            raise ValueError(f"--data ruler={data_path} is not a folder; give a folder holding squad.json and/or "
                             "hotpotqa.json (RULER's QA files), and optionally essays/")
        if essays is None and data_path is not None:
            found = [p for p in (Path(data_path) / "essays", Path(data_path) / "PaulGrahamEssays.json") if p.exists()]
            essays = str(found[0]) if found else None
        self.essays = essays
        self._essay_words = essay_words(essays) if essays else None
        available = [t for t in ("qa_1", "qa_2") if self._qa_path(t) is not None]
        self.tasks = list(tasks) if tasks else [*SYNTHETIC, *available]
        missing = [t for t in ("qa_1", "qa_2") if t not in available]
        self.notices = [] if tasks or not missing else [  # what the CLI prints at the start: a partial set, said once
            f"ruler: {'/'.join(missing)} need{'s' if len(missing) == 1 else ''} --data ruler=DIR (RULER's "
            f"{', '.join(QA_FILES[SUBTASKS[t][1]['dataset']] for t in missing)}); running {len(self.tasks)} of "
            f"{len(SUBTASKS)} tasks"]
        for task in self.tasks:
            if task.startswith("qa_") and self._qa_path(task) is None:
                file = QA_FILES[SUBTASKS[task][1]["dataset"]]
                raise ValueError(f"RULER {task} needs {file} (RULER's json/download_qa_dataset.sh saves it): "
                                 f"give --data ruler=DIR with DIR/{file}")
        self.samples_per_task = samples
        self.seed = seed
        self._qa: dict[str, QAData] = {}
        self._icl: str | None = None
        self._meta: dict[str, dict[str, Any]] = {}
        self._used_lengths: list[int] | None = None

    def check_length(self, max_length: int, cap: int | None = None) -> None:
        """Each asked length (prompt and generated tokens) within max_length; the CLI calls it before the model loads
        when --max-length is given."""
        if self.lengths and self.lengths[-1] > max_length:
            raise ValueError(f"RULER length {self.lengths[-1]} does not fit --max-length {max_length} (a length counts "
                             "prompt and generated tokens); lower ruler.lengths or raise --max-length")

    def _qa_path(self, task: str) -> Path | None:
        if self.data_path is None:
            return None
        path = Path(self.data_path) / QA_FILES[SUBTASKS[task][1]["dataset"]]
        return path if path.is_file() else None

    def config(self) -> dict[str, Any]:
        return {
            "lengths": self._used_lengths or self.lengths or "RULER's 4K-128K up to the model's max length",
            "tasks": self.tasks,
            "samples": self.samples_per_task,
            "haystack": f"essays: {self.essays}" if self.essays else "noise (no essays given: RULER's noise haystack "
                                                                        "stands in for the essays)",
            "qa_data": str(self.data_path) if any(t.startswith("qa_") for t in self.tasks) else None,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------------------------------ samples

    def samples(self, ctx: TaskContext) -> list[Sample]:
        lengths = self.lengths or [n for n in DEFAULT_LENGTHS if n <= ctx.max_length]
        if not lengths:
            raise ValueError(f"RULER's shortest length 4096 does not fit the model's max length {ctx.max_length}; "
                             "give --task-option ruler.lengths=N with N at most the max length")
        self.check_length(ctx.max_length)
        self._used_lengths = lengths
        count = self.samples_per_task if ctx.limit is None else min(ctx.limit, self.samples_per_task)
        samples = []
        for task in self.tasks:
            for length in lengths:
                hint: dict[str, Any] = {}
                for index in range(count):
                    samples.append(self._sample(task, length, index, ctx, hint))
        return samples

    def generate(self, task: str, length: int, index: int, ctx: TaskContext,
                 hint: dict[str, Any] | None = None) -> tuple[Built, int]:
        """Sample `index` of a task at a length: (the generated sample, its length as RULER counts it). hint carries
        the haystack size and token rate from one sample to the next of the same task and length."""
        hint = {} if hint is None else hint
        base, args = SUBTASKS[task]
        budget = TEMPLATES[base]["tokens_to_generate"]
        build, low = self._builder(task, base, args, length, index, ctx)

        def measure(built: Built) -> int:
            return ctx.count_tokens(built.prompt(ctx.chat)) + budget

        best: tuple[int, Built] | None = None
        for draw in range(MAX_DRAWS):
            seed = f"{self.seed}:{task}:{length}:{index}:{draw}"
            try:
                n, built, tokens, rate = fit(lambda units: build(units, random.Random(seed)), measure, length, low,
                                             guess=hint.get("n"), rate=hint.get("rate"))
            except ValueError:
                raise ValueError(f"RULER {task}: length {length} is too short for its template and smallest haystack "
                                 f"({low} units); use longer ruler.lengths") from None
            hint.update(n=n, rate=rate)
            if best is None or tokens > best[0]:
                best = (tokens, built)
            if tokens >= (1 - TOLERANCE) * length:
                break
        return best[1], best[0]

    def _builder(self, task: str, base: str, args: Any, length: int, index: int,
                 ctx: TaskContext) -> tuple[Callable[[int, random.Random], Built], int]:
        if base == "niah":
            needles = max(args.num_needle_k, args.num_needle_q) * args.num_needle_v
            return (lambda n, rng: build_niah(n, rng, args, self._essay_words)), needles
        if base == "variable_tracking":
            icl = self._vt_example(ctx)
            return (lambda n, rng: build_vt(n, rng, redraw_icl(icl, rng))), 5
        if base == "common_words_extraction":
            return (lambda n, rng: build_cwe(n, rng, length)), 11
        if base == "freq_words_extraction":
            return (lambda n, rng: build_fwe(n, rng, length)), 64
        data = self._qa_data(task)
        question = index % len(data.questions)
        return (lambda n, rng: build_qa(n, rng, data, question)), len(data.questions[question]["context"])

    def _vt_example(self, ctx: TaskContext) -> str:
        """variable_tracking.py's in-context example: the most noise lines whose filled template and answer prefix
        fit in 500 tokens (plain text), then " " and its 5 names and a newline."""
        if self._icl is None:
            rng_seed = f"{self.seed}:vt:example"

            def measure(built: Built) -> int:
                return ctx.count_tokens(built.body + built.prefix)

            _, built, _, _ = fit(lambda n: build_vt(n, random.Random(rng_seed), None), measure, VT_ICL_TOKENS, 5)
            self._icl = built.body + built.prefix + " " + " ".join(built.answers) + "\n"
        return self._icl

    def _qa_data(self, task: str) -> QAData:
        if task not in self._qa:
            self._qa[task] = read_qa(SUBTASKS[task][1]["dataset"], self._qa_path(task))
        return self._qa[task]

    def _sample(self, task: str, length: int, index: int, ctx: TaskContext, hint: dict[str, Any]) -> Sample:
        built, tokens = self.generate(task, length, index, ctx, hint)
        sample_id = f"{task}/{length}/{index}"
        self._meta[sample_id] = {
            "length_tokens": tokens,
            "answer_depths": [round(100 * offset / max(1, len(built.body)), 1) for offset, _ in built.spans]
            if SUBTASKS[task][0] in ("niah", "variable_tracking", "qa") else None,
        }
        return Sample(
            id=sample_id,
            prompt=built.prompt(ctx.chat),
            target=built.answers,
            breakdown={"task": task, "length": length},
            max_new_tokens=TEMPLATES[SUBTASKS[task][0]]["tokens_to_generate"],
        )

    # ------------------------------------------------------------------------------------------ scoring

    def score(self, sample: Sample, output: list[str]) -> dict[str, float]:
        metric = string_match_part if sample.breakdown["task"].startswith("qa_") else string_match_all
        return {"score": metric(postprocess(output[0]), list(sample.target))}

    def details(self, sample: Sample, output: list[str]) -> dict[str, Any]:
        return dict(self._meta.get(sample.id, {}))

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        result = aggregate_scores(records, self.breakdown_keys)
        cells = result["breakdowns"].get("task x length")
        if cells:
            result["metrics"]["ruler_avg"] = macro_average(cells, "score")
        return result
