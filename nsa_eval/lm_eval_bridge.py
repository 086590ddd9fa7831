"""lm-evaluation-harness, both ways.

Our backends in lm-eval: `NSAEvalLM` is an `lm_eval.api.model.LM` registered as `nsa-eval` when this module is
imported. lm-eval 0.4.13 finds models only in its own registry (it has no plugin entry point for models), so
its CLI is run through ours, which imports this module first:

    nsa-eval lm-eval --model nsa-eval --model_args model=nsa:./ckpt,max_length=8192 --tasks hellaswag

and from Python: `import nsa_eval.lm_eval_bridge` then `lm_eval.simple_evaluate(model="nsa-eval", ...)`.
model_args: model (any spec of `nsa-eval run`), device, dtype, max_length, batch_size, seed.

lm-eval tasks in our runner: `nsa-eval run --tasks lm-eval:TASK [--include-path DIR]` builds `LmEvalTask`, which
takes lm-eval's own requests (its prompts, few-shot examples with lm-eval's default few-shot seed 1234, stop
sequences) as our Samples, and scores each sample with the task's own filters and process_results and the
task's own aggregation, so the numbers are lm-eval's. Chat: when the run sends chat messages (the model has a chat
template and --no-chat-template is not given) the task's messages go to the backend as messages, as lm-eval's
`--apply_chat_template --fewshot_as_multiturn` does. Perplexity tasks (loglikelihood_rolling, e.g. wikitext) are
scored by the backend's `loglikelihood_rolling` (lm-eval's disjoint windows of the backend's max length), both ways,
and lm-eval's own process_results and aggregation give its word and byte perplexities. Not supported, each with a
clear line: groups (name their tasks), tasks whose choices change the context (multiple inputs,
acc_mutual_info), assistant prefill (gen_prefix) with chat, multimodal tasks, and lm-eval's code-executing tasks
(they run model code without a sandbox: use our `humaneval`).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any

try:
    from lm_eval.api.instance import Instance
    from lm_eval.api.metrics import mean, stderr_for_metric
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:
    raise ValueError("lm-eval tasks and `nsa-eval lm-eval` need lm-evaluation-harness: pip install 'nsa-eval[lm-eval]'") from None

from nsa_eval.model_adapters.base import (GenerationRequest, LanguageModel, LoglikelihoodRequest, Prompt,
                                          RollingLoglikelihoodRequest)
from nsa_eval.util import did_you_mean
from nsa_eval.tasks.base import Sample, Task, TaskContext

LM_EVAL_VERSION = metadata.version("lm-eval")
FEWSHOT_SEED = 1234  # lm-eval's default few-shot seed (simple_evaluate's fewshot_random_seed)
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task's generation_kwargs give no max_gen_toks
CHAT_MARK = "\x00nsa-eval-chat:"  # chat messages travel through lm-eval's string contexts as CHAT_MARK + JSON
SMALL_BOOTSTRAP = ("bleu", "chrf", "chrf++", "ter")  # lm-eval bootstraps these with 100 draws, others with 100000


def chat_context(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """lm-eval's chat_template hook: keep the messages (the backend applies its own template)."""
    if not add_generation_prompt:
        raise ValueError("lm-eval tasks with an assistant prefill (gen_prefix) cannot run with chat messages; "
                         "use --no-chat-template (nsa-eval run) or drop --apply_chat_template (lm-eval)")
    return CHAT_MARK + json.dumps(messages, ensure_ascii=False)


def prompt_of(context: str) -> Prompt:
    """An lm-eval context string -> our prompt: chat messages when chat_context made it, else the text."""
    return json.loads(context[len(CHAT_MARK):]) if context.startswith(CHAT_MARK) else context


def generation_fields(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's generation_kwargs -> GenerationRequest fields (greedy unless do_sample or a temperature > 0)."""
    until = gen_kwargs.get("until") or []
    sampled = bool(gen_kwargs.get("do_sample")) or float(gen_kwargs.get("temperature") or 0) > 0
    return {
        "max_new_tokens": int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)),
        "stop": [until] if isinstance(until, str) else list(until),
        "temperature": float(gen_kwargs.get("temperature", 1.0)) if sampled else 0.0,
        "top_p": float(gen_kwargs.get("top_p", 1.0)),
    }


# ---- our backends inside lm-eval -------------------------------------------------------------------------


@register_model("nsa-eval")
class NSAEvalLM(LM):
    """Any nsa-eval backend as an lm-eval model. model: a spec (`smollm2`, `hf:PATH`, `nsa:PATH`, `openai:...`) or
    a LanguageModel already loaded. Sampling seeds follow ours (run seed and doc id), so lm-eval and
    `nsa-eval run --tasks lm-eval:TASK` ask the model the same things."""

    def __init__(self, model: str | LanguageModel = "smollm2", device: str | None = None, dtype: str | None = None,
                 max_length: int | str | None = None, batch_size: int | str | None = None, seed: int | str = 0,
                 max_batch_size: Any = None, **unknown: Any):
        super().__init__()
        if unknown:
            raise ValueError(f"--model_args {', '.join(sorted(unknown))}: not an nsa-eval option; "
                             "use model, device, dtype, max_length, batch_size, seed")
        if isinstance(model, str):
            from nsa_eval.models import LoadOptions, load_model

            size = int(batch_size) if str(batch_size or "").isdigit() else 1  # lm-eval's "auto" sizes: one at a time
            model = load_model(model, LoadOptions(device=device or "auto", dtype=dtype or "auto",
                                                  max_length=int(max_length) if max_length else None, batch_size=size))
        self.model = model
        self.seed = int(seed)

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if any(r.args[0] == "" for r in requests):
            raise ValueError("an lm-eval loglikelihood request with an empty context (acc_mutual_info) cannot be "
                             "scored by nsa-eval backends; they score a continuation given a context (whole documents: "
                             "loglikelihood_rolling)")
        answers = self.model.loglikelihood([LoglikelihoodRequest(prompt_of(r.args[0]), r.args[1]) for r in requests])
        results = [(a.logprob, a.is_greedy) for a in answers]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args[:2], result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """lm-eval's perplexity requests (args: the document) -> each document's summed log-probability, from the
        backend's loglikelihood_rolling (lm-eval's disjoint windows of the backend's max length)."""
        answers = self.model.loglikelihood_rolling([RollingLoglikelihoodRequest(r.args[0]) for r in requests])
        results = [answer.logprob for answer in answers]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """lm-eval repeats an instance `repeats` times in a row; those become one request with n samples."""
        from nsa_eval.util import request_seed

        runs: list[tuple[Instance, int]] = []
        for request in requests:
            if runs and runs[-1][0] is request:
                runs[-1] = (request, runs[-1][1] + 1)
            else:
                runs.append((request, 1))
        asks = [
            GenerationRequest(prompt=prompt_of(r.args[0]), n=n, seed=request_seed(self.seed, str(r.doc_id)),
                              **generation_fields(r.args[1]))
            for r, n in runs
        ]
        texts = [text for generation in self.model.generate(asks) for text in generation.texts]
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args[:2], text)
        return texts

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return chat_context(chat_history, add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self.model.name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(getattr(self.model, "tokenizer", None), "chat_template", None) or ""


def run_lm_eval_cli(args: list[str]) -> None:
    """lm-eval's command line (`lm-eval ARGS`), with `nsa-eval` registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *args]
    cli_evaluate()


# ---- lm-eval tasks inside our runner ----------------------------------------------------------------------


def local_data_overrides(data_path: str) -> dict[str, Any]:
    """lm-eval config overrides that read a task's rows from a local file or folder (`--data lm-eval:TASK=PATH`):
    a file serves every split the task names; a folder serves each split from its `SPLIT.<ext>` file."""
    from nsa_eval.tasks.data import SUFFIXES

    path = Path(data_path).expanduser()
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if path.is_file():
        if path.suffix.lower() not in builders:
            raise ValueError(f"{path}: unsupported data file type '{path.suffix}'; use {', '.join(SUFFIXES)}")
        files = {split: str(path) for split in ("train", "validation", "test")}
        builder = builders[path.suffix.lower()]
    elif path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in builders)
        if not found:
            raise ValueError(f"{path} holds no SPLIT{{{','.join(SUFFIXES)}}} files (e.g. test.jsonl); add them or give "
                             "a file")
        builder = builders[found[0].suffix.lower()]
        files = {p.stem: str(p) for p in found if builders[p.suffix.lower()] == builder}
    else:
        raise ValueError(f"data path {path} does not exist; give a jsonl/json/parquet/csv file or a folder of them")
    return {"dataset_path": builder, "dataset_name": None, "dataset_kwargs": {"data_files": files}}


def load_task(name: str, include_path: str | None = None, data_path: str | None = None) -> Any:
    """One lm-eval task (a ConfigurableTask) by name; lm-eval's built-in tasks are indexed only when the name is
    not in include_path (indexing them takes seconds). Its data comes from data_path when given, else from the
    local datasets cache first, then the hub (one line naming --data when neither can serve it)."""
    import datasets
    from lm_eval.tasks import TaskManager

    from nsa_eval.tasks.data import from_hub

    datasets.disable_progress_bars()  # our runner's progress bar is the one a user watches
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {include_path} is not a folder; give the folder holding the task YAML files")
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or name not in manager.all_tasks:
        manager = TaskManager(include_path=include_path)
    if name not in manager.all_tasks:
        where = f" in {include_path} or" if include_path else ""
        raise ValueError(f"unknown lm-eval task '{name}'{where} among lm-eval's tasks."
                         f"{did_you_mean(name, manager.all_tasks, cutoff=0.75)} "
                         "`lm-eval ls tasks` lists them; --include-path DIR adds your own YAML files")
    if data_path is not None:
        overrides = local_data_overrides(data_path)
        try:  # the registered task with its dataset replaced (TaskManager.load of a dict would define a new task)
            built = manager._factory.build(manager.task_index[name], overrides=overrides, registry=manager.task_index)
            loaded = manager.load([built])
        except Exception as error:  # noqa: BLE001 - a split the folder lacks, a malformed file: one line
            raise ValueError(f"lm-eval:{name} could not read {data_path} ({str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}); "
                             "a file serves every split; a folder needs one SPLIT.jsonl per split the task uses") from None
        return _checked(name, loaded)
    remedy = f"download it and pass --data lm-eval:{name}=PATH (a jsonl/json/parquet/csv file, or a folder of SPLIT files)"
    return _checked(name, from_hub(lambda: manager.load([name]), f"the data of lm-eval:{name}", remedy))


def _checked(name: str, loaded: dict[str, Any]) -> Any:
    """The one task of a loaded lm-eval task dict, refused (one line) when our runner cannot score it."""
    if loaded["groups"] or len(loaded["tasks"]) != 1:
        members = sorted(loaded["tasks"])
        shown = ",".join(f"lm-eval:{m}" for m in members[:3]) + (",..." if len(members) > 3 else "")
        raise ValueError(f"lm-eval:{name} is a group of {len(members)} tasks; name them one by one: --tasks {shown}")
    task = next(iter(loaded["tasks"].values()))
    if getattr(task, "UNSAFE_CODE", False) or task.config.unsafe_code:
        raise ValueError(f"lm-eval:{name} runs model-written code without a sandbox; use nsa-eval's sandboxed humaneval task")
    if getattr(task, "MULTIMODAL", False):
        raise ValueError(f"lm-eval:{name} is multimodal; nsa-eval backends take text")
    if task.get_config("num_fewshot") is None:  # as simple_evaluate does
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return task


class WithoutAskedItem:
    """lm-eval's few-shot sampler for a task whose shot split and test split come from one file (`--data
    lm-eval:TASK=FILE`): the shots never include the item being asked. lm-eval removes it only when the shot split's
    name is the test split's; here a shot is the asked item when its row has the same content hash or its question
    renders to the same text. Draws as lm-eval does for a shared split: n + 1 rows, the asked one removed, the first n
    kept (first_n: the first n other rows). Installed on the task by `LmEvalTask`."""

    def __init__(self, task: Any):
        from lm_eval.api.samplers import FirstNSampler

        self.inner, self.task, self.asked = task.sampler, task, None
        self.first_n = isinstance(self.inner, FirstNSampler)
        fewshot_context = task.fewshot_context

        def asking(doc: dict, *args: Any, **kwargs: Any) -> Any:  # lm-eval passes the asked doc only here
            self.asked = doc
            try:
                return fewshot_context(doc, *args, **kwargs)
            finally:
                self.asked = None

        task.fewshot_context, task.sampler = asking, self

    def __getattr__(self, name: str) -> Any:  # set_rnd, rnd, df, ...: the wrapped sampler's
        return getattr(self.inner, name)

    def is_asked(self, shot: dict) -> bool:
        asked = self.asked
        if asked is None:
            return False
        if row_hash(shot) == row_hash(asked):
            return True
        question = self.task.doc_to_text(shot, self.task.fewshot_cfg.doc_to_text)
        return str(question).strip() == str(self.task.doc_to_text(asked)).strip()

    def sample(self, n: int, eval_doc: Any = None, df: Any = None, **kwargs: Any) -> list[dict]:
        if n == 0 or self.asked is None:
            return self.inner.sample(n, eval_doc, df, **kwargs)
        docs = self.inner.fewshot_docs()
        if self.first_n:
            return [d for d in docs if not self.is_asked(d)][:n]
        drawn = [d for d in self.inner.rnd.sample(docs, min(n + 1, len(docs))) if not self.is_asked(d)][:n]
        if len(drawn) < n:  # the file repeats the asked row: draw from the rows that are not it
            drawn = self.inner.rnd.sample([d for d in docs if not self.is_asked(d)], n)
        return drawn


def row_hash(row: dict) -> str:
    """A data row's content hash (keys sorted; numpy values as plain numbers)."""
    return hashlib.sha256(json.dumps(json_safe(row), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class LmEvalTask(Task):
    """An lm-eval task as one of our tasks (name `lm-eval:TASK`); see the module docstring."""

    def __init__(self, task: str, include_path: str | None = None, data_path: str | None = None):
        self.task_name = task
        self.name = f"lm-eval:{task}"
        self.include_path = str(Path(include_path).resolve()) if include_path else None
        self.data_path = data_path
        self._task = load_task(task, include_path, data_path)
        self.excludes_asked = False  # shots drawn from the test file itself, the asked item left out
        shots = int(self._task.get_config("num_fewshot") or 0)
        if data_path is not None and Path(data_path).expanduser().is_file() and shots > 0 \
                and self._task.fewshot_cfg.split is not None and hasattr(self._task, "sampler"):
            rows = len(self._task.sampler.fewshot_docs())
            if rows - 1 < shots:
                raise ValueError(f"lm-eval:{task} needs {shots} shots other than the item asked; {data_path} holds "
                                 f"{rows} rows (give at least {shots + 1})")
            WithoutAskedItem(self._task)
            self.excludes_asked = True
        self.version = str((self._task.config.metadata or {}).get("version", self._task.VERSION))
        self._instances: dict[str, tuple[dict, list[Instance]]] = {}
        self._scored: dict[str, dict[str, Any]] = {}
        filters = [f.name for f in getattr(self._task, "_filters", [])] or ["none"]
        self.headline = metric_key(next(iter(self._task.aggregation()), "acc"), filters[0])

    def config(self) -> dict[str, Any]:
        return {
            "lm_eval_task": self.task_name,
            "lm_eval_version": LM_EVAL_VERSION,
            "include_path": self.include_path,
            **({"data": self.data_path} if self.data_path else {}),
            **({"fewshot_excludes_asked_item": True} if self.excludes_asked else {}),
            "fewshot_seed": FEWSHOT_SEED,
            "task_config": json_safe(self._task.dump_config()),
        }

    def samples(self, ctx: TaskContext) -> list[Sample]:
        self._task.build_all_requests(
            limit=ctx.limit, rank=0, world_size=1, apply_chat_template=ctx.chat, fewshot_as_multiturn=ctx.chat,
            chat_template=chat_context if ctx.chat else None, tokenizer_name="nsa-eval" if ctx.chat else "",
        )
        by_doc: dict[int, list[Instance]] = defaultdict(list)
        for instance in self._task.instances:
            by_doc[instance.doc_id].append(instance)
        samples = []
        for doc_id, instances in by_doc.items():
            instances.sort(key=lambda i: i.idx)
            sample_id = str(doc_id)
            doc = instances[0].doc
            self._instances[sample_id] = (doc, instances)
            target = json_safe(self._task.doc_to_target(doc))
            first = instances[0]
            if first.request_type == "generate_until":
                samples.append(Sample(id=sample_id, prompt=prompt_of(first.args[0]), target=target,
                                      n=first.repeats or 1, **generation_fields(first.args[1])))
            elif first.request_type == "loglikelihood_rolling":  # a document to score whole (perplexity)
                samples.append(Sample(id=sample_id, prompt=first.args[0], target=target, rolling=True))
            else:
                contexts = {i.args[0] for i in instances}
                if len(contexts) != 1:
                    raise ValueError(f"{self.name} scores choices under different contexts (multiple inputs or "
                                     "acc_mutual_info), which nsa-eval samples cannot express; run it with `nsa-eval lm-eval`")
                samples.append(Sample(id=sample_id, prompt=prompt_of(first.args[0]), target=target,
                                      continuations=[i.args[1] for i in instances]))
        return samples

    def score(self, sample: Sample, output: list[Any]) -> dict[str, float]:
        """lm-eval's filters and process_results on this sample's answers. Numbers become our scores; every value
        (numbers, and the pairs corpus metrics such as BLEU aggregate) goes to the record's details."""
        doc, instances = self._instances[sample.id]
        for instance in instances:
            instance.resps, instance.filtered_resps = [], {}
        if sample.rolling:  # lm-eval's loglikelihood_rolling answer: the document's summed log-probability
            instances[0].resps = [sum(float(logprob) for logprob, _ in output)]
        elif sample.continuations is None:
            instances[0].resps = list(output)
        else:
            for instance, pair in zip(instances, output):
                instance.resps = [tuple(pair)]
        for ensemble in getattr(self._task, "_filters", []):
            ensemble.apply(instances)
        values = {}
        for filter_name in instances[0].filtered_resps:
            results = self._task.process_results(doc, [i.filtered_resps[filter_name] for i in instances])
            for metric, value in results.items():
                values[metric_key(metric, filter_name)] = json_safe(value)
        self._scored[sample.id] = values
        return {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}

    def details(self, sample: Sample, output: list[Any]) -> dict[str, Any]:
        if sample.id not in self._scored:
            self.score(sample, output)
        return {"lm_eval": self._scored.pop(sample.id)}

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """lm-eval's aggregation of each metric over the records (the value is under "mean", as reports read it),
        with lm-eval's standard errors (closed form for means, bootstrap for corpus metrics)."""
        raw: dict[str, list[Any]] = defaultdict(list)
        for record in records:
            for key, value in record["details"]["lm_eval"].items():
                raw[key].append(value)
        aggregations = self._task.aggregation()
        metrics = {}
        for key, items in raw.items():
            metric = key.split(",")[0]
            aggregate = aggregations.get(metric, mean)
            stderr = stderr_for_metric(aggregate, bootstrap_iters=100 if metric in SMALL_BOOTSTRAP else 100_000)
            value = float(aggregate(items))
            error = float(stderr(items)) if stderr is not None and len(items) > 1 else math.nan
            metrics[key] = {"mean": value if math.isfinite(value) else None,
                            "stderr": error if math.isfinite(error) else None}
            if not math.isfinite(value):
                metrics[key]["mean_reason"] = f"lm-eval's {metric} aggregation gave {value}"
            if not math.isfinite(error):  # metrics.json is strict JSON: null with the reason, never NaN
                metrics[key]["stderr_reason"] = (f"one sample (n={len(items)}): no standard error" if len(items) < 2
                                                 else f"lm-eval has no standard error for {metric}" if stderr is None
                                                 else f"lm-eval's standard error for {metric} gave {error}")
        return {"n": len(records), "metrics": metrics, "breakdowns": {},
                "higher_is_better": dict(self._task.higher_is_better())}


def metric_key(metric: str, filter_name: str) -> str:
    """lm-eval's "metric,filter" result key, shortened to the metric when the filter is lm-eval's default "none"."""
    return metric if filter_name in ("none", "") else f"{metric},{filter_name}"


def json_safe(value: Any) -> Any:
    """Plain JSON values, stable across runs: numpy scalars as numbers, tuples as lists, functions by name."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    text = str(value)
    return type(value).__name__ if " at 0x" in text else text  # no memory addresses: the config hash must be stable
