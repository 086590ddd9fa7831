"""Runs tasks on a model into a run directory: samples -> requests -> responses -> scores -> metrics."""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from typing import Any, Iterable, Iterator

from nsa_eval import store as run_store
from nsa_eval.model_adapters.base import (Generation, GenerationRequest, LanguageModel, LoglikelihoodRequest,
                                          RollingLoglikelihoodRequest, TokenUpdate)
from nsa_eval.progress import heartbeat, progress as make_progress
from nsa_eval.records import RunInfo, RunKey, SampleRecord, TaskMetrics, prompt_excerpt
from nsa_eval.run_config import RunConfig
from nsa_eval.util import request_seed
from nsa_eval.tasks.base import Sample, Task, TaskContext


def generation_request(sample: Sample, run_seed: int) -> GenerationRequest:
    return GenerationRequest(prompt=sample.prompt, max_new_tokens=sample.max_new_tokens, stop=list(sample.stop),
                             temperature=sample.temperature, top_p=sample.top_p, n=sample.n,
                             seed=request_seed(run_seed, sample.id))


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def generation_fields(generation: Generation) -> tuple[list[Any], dict[str, Any]]:
    """(output for task.score, the record fields a generation adds): its texts, tokens and timings, and the cost of its
    decode steps (Generation's docstring; null where the backend cannot say)."""
    return generation.texts, {
        "responses": generation.texts,
        "new_tokens": generation.new_tokens,
        "finish_reasons": generation.finish_reasons,
        "prompt_tokens": generation.prompt_tokens,
        "truncated": generation.truncated,
        "prefill_ms": round(generation.prefill_ms, 3),
        "decode_tokens_per_s": round(generation.decode_tokens_per_s, 3),
        "decode_steps": generation.decode_steps,
        "decode_ms_per_token": _rounded(generation.decode_ms_per_token, 3),
        "kv_bytes_per_step": _rounded(generation.kv_bytes_per_step, 1),
        "attended_share": _rounded(generation.attended_share, 6),
    }


class TokenCount:
    """A run's progress through a streaming model: tokens generated and samples decoding, from each step's token updates,
    passed to `report(generated, decoding)` at most once a second (the progress display decides what to print)."""

    def __init__(self, report: Any):
        self.report, self.generated, self.decoding, self.reported = report, 0, {}, time.monotonic()

    def take(self, updates: list[TokenUpdate]) -> None:
        for update in updates:
            key = (update.index, update.sample)
            self.generated += len(update.tokens) - self.decoding.get(key, 0)
            if update.done:
                self.decoding.pop(key, None)
            else:
                self.decoding[key] = len(update.tokens)
        now = time.monotonic()
        if self.decoding and now - self.reported >= 1.0:  # none decoding: the finished sample's own line follows
            self.reported = now
            self.report(self.generated, len(self.decoding))


def answer_stream(model: LanguageModel, samples: list[Sample], run_seed: int,
                  progress: TokenCount | None = None) -> Iterator[tuple[Sample, tuple[list[Any], dict]]]:
    """Generative samples through a model that streams (`step`: the native engine's continuous batching), all at
    once: (sample, its answer) in the order they finish. progress: takes every step's token updates."""
    by_index = {model.add_request(generation_request(sample, run_seed)): sample for sample in samples}
    try:
        while model.has_unfinished():
            out = model.step()
            if progress is not None:
                progress.take(out.tokens)
            for index, generation in out.finished:
                yield by_index[index], generation_fields(generation)
    finally:  # stopped early (an error, an interrupt): the model keeps none of these requests
        model.abort()


def answer(model: LanguageModel, samples: list[Sample], run_seed: int) -> list[tuple[list[Any], dict[str, Any]]]:
    """Ask the model for each sample: (output for task.score, the record fields the answer adds)."""
    results: list[tuple[list[Any], dict[str, Any]] | None] = [None] * len(samples)
    generative = [i for i, s in enumerate(samples) if s.generative]
    if generative:
        requests = [generation_request(samples[i], run_seed) for i in generative]
        for i, generation in zip(generative, model.generate(requests)):
            results[i] = generation_fields(generation)
    scored = [i for i, s in enumerate(samples) if s.continuations is not None]
    if scored:
        requests = [LoglikelihoodRequest(samples[i].prompt, c) for i in scored for c in samples[i].continuations]
        answers = iter(model.loglikelihood(requests))
        for i in scored:
            lls = [next(answers) for _ in samples[i].continuations]
            pairs = [(ll.logprob, ll.is_greedy) for ll in lls]
            results[i] = (pairs, {"loglikelihoods": [list(p) for p in pairs], "truncated": any(ll.truncated for ll in lls)})
    rolling = [i for i, s in enumerate(samples) if s.rolling]
    if rolling:
        requests = [RollingLoglikelihoodRequest(samples[i].prompt, samples[i].stride) for i in rolling]
        for i, scored in zip(rolling, model.loglikelihood_rolling(requests)):
            results[i] = (list(zip(scored.logprobs, scored.positions)),
                          {"tokens": len(scored.logprobs), "loglikelihood": scored.logprob, "windows": scored.windows})
    return results  # type: ignore[return-value]


def answer_batches(samples: list[Sample], batch_size: int, scoring_batch: int | None) -> list[list[Sample]]:
    """The samples `answer` gets at once, each batch stored as it comes back: log-likelihood samples `scoring_batch`
    at a time where the backend sets one (the native engine packs their sequences into forwards by tokens, so it
    wants many), every other sample batch_size at a time; each kind in its order."""
    scored = [s for s in samples if s.continuations is not None]
    other = [s for s in samples if s.continuations is None]
    size = scoring_batch or batch_size
    return ([other[start : start + batch_size] for start in range(0, len(other), batch_size)]
            + [scored[start : start + size] for start in range(0, len(scored), size)])


COST_FIELDS = ("decode_ms_per_token", "new_tokens", "kv_bytes_per_step", "attended_share")


def new_tokens_per_completion(record: dict[str, Any]) -> float:
    """A generative record's new tokens, the mean over its completions."""
    counts = record["new_tokens"]
    return sum(counts) / len(counts) if isinstance(counts, list) and counts else float(counts or 0)


def efficiency(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Means over the generative samples: prefill ms, decode tokens/s, prompt tokens, and the cost fields (decode ms per
    token, new tokens per completion, KV bytes per step, share attended) over the samples that hold them (runs before
    these fields, and backends that cannot say, have none)."""
    generated = [r for r in records if "prefill_ms" in r]
    if not generated:
        return {}
    mean = lambda key: sum(r[key] for r in generated) / len(generated)  # noqa: E731
    summary = {
        "prefill_ms_mean": mean("prefill_ms"),
        "decode_tokens_per_s_mean": mean("decode_tokens_per_s"),
        "prompt_tokens_mean": mean("prompt_tokens"),
    }
    for key in COST_FIELDS:
        values = [new_tokens_per_completion(r) if key == "new_tokens" else r.get(key) for r in generated]
        values = [v for v in values if v is not None]
        if values:
            summary[f"{key}_mean"] = sum(values) / len(values)
    return summary


def evaluate(model: LanguageModel, tasks: dict[str, Task], store: run_store.RunStore, config: RunConfig, *,
             show_progress: bool = True) -> dict[str, Any] | None:
    """Evaluate `tasks` on `model` into `store` as `config` asks (seed, limit, chat, the cap on new tokens; recorded in
    run.json); resumes a run with the same config. Returns metrics.json (None in the processes of a data-parallel
    run other than the one that writes it)."""
    seed, limit, max_new_tokens = config.seed, config.limit, config.max_new_tokens
    use_chat = model.chat if config.chat is None else config.chat
    ctx = TaskContext(count_tokens=model.count_tokens, chat=use_chat, max_length=model.max_length, seed=seed, limit=limit,
                      max_new_tokens=max_new_tokens)
    samples = {}
    for name, task in tasks.items():  # bad grids fail here, before any write
        with heartbeat(f"{name}: building its samples", show_progress):
            samples[name] = task.samples(ctx)
    for name, items in samples.items():
        ids = [s.id for s in items]
        if len(set(ids)) != len(ids):
            raise AssertionError(f"task {name} produced duplicate sample ids")
        if not items:
            raise ValueError(f"task {name} has no samples to run (its data, subjects or subsets select none); "
                             "check its --data and --task-option settings")
        if any(s.rolling for s in items):
            model.loglikelihood_rolling([])  # a backend that scores no documents says so in one line, before any write
        if max_new_tokens is not None:
            samples[name] = [dataclasses.replace(s, max_new_tokens=min(s.max_new_tokens, max_new_tokens))
                             if s.generative else s for s in items]
    task_info = {
        name: {
            "version": task.version,
            "config": task.config(),
            "prompts_digest": run_store.prompts_digest([s.prompt_hash for s in samples[name]]),
            "n": len(samples[name]),
        }
        for name, task in tasks.items()
    }
    described = {"device": config.device, "dtype": config.dtype, "batch_size": config.batch_size or 1,
                 "prefill_chunk": None, "attention": None, **model.describe()}  # the run's settings where it is silent
    key = RunKey(
        model={"spec": config.model_spec, "name": model.name, "max_length": model.max_length, "chat": use_chat},
        tasks=task_info, seed=seed, limit=limit, max_new_tokens=max_new_tokens,
        device=str(described["device"]).split(":")[0], dtype=str(described["dtype"]),
        sparse=config.sparse.record() if config.sparse else None)
    batch_size = described["batch_size"]
    store.open(RunInfo(
        run_id=store.root.name, created=run_store.now(), key=key, config_hash=key.hash,
        # outside the hash, as batch_size: prompt tokens per prefill pass change results by float rounding only, and
        # a run resumed with another --prefill-chunk must still resume
        batch_size=batch_size, prefill_chunk=described["prefill_chunk"], engine=type(model).__name__,
        # outside the hash (the model spec decides it): the checkpoint's own attention, e.g. 'nsa' for --attention full
        model_attention=described["attention"],
        # outside the hash (derived from it): each generative task's largest budget after the --max-new-tokens cap
        budgets_used={name: max(s.max_new_tokens for s in items if s.generative)
                      for name, items in samples.items() if any(s.generative for s in items)},
        versions=run_store.versions(), git_sha=run_store.git_sha(), hardware=run_store.hardware(),
        argv=list(config.argv) or sys.argv))

    with make_progress(show_progress) as progress:
        for name, task in tasks.items():
            done = store.finished_ids(name)
            mine = [s for i, s in enumerate(samples[name]) if store.owns(i)]  # a data-parallel process: its shard
            pending = [s for s in mine if s.id not in done]
            unit = task.limit_unit
            note = f" (--limit {limit} per {unit})" if unit and limit is not None else ""
            bar = progress.add_task(name, total=len(mine), completed=len(mine) - len(pending), note=note)
            progress.start(bar)
            streamed = [s for s in pending if s.generative] if model.streams else []
            rest = [s for s in pending if s not in streamed] if streamed else pending
            count = TokenCount(lambda generated, decoding, bar=bar: progress.tokens(bar, generated, decoding))
            answers = answer_stream(model, streamed, seed, count) if streamed else iter(())
            chunks = answer_batches(rest, batch_size, model.scoring_batch)
            batches = itertools.chain(([item] for item in answers),
                                      (list(zip(chunk, answer(model, chunk, seed))) for chunk in chunks))
            for batch in batches:
                for sample, (output, fields) in batch:
                    scores = task.score(sample, output)
                    store.append(name, SampleRecord(
                        id=sample.id, breakdown=sample.breakdown, prompt_hash=sample.prompt_hash,
                        prompt_excerpt=prompt_excerpt(sample.prompt), target=sample.target, answer=fields,
                        scores=scores, details=task.details(sample, output)))
                progress.advance(bar, len(batch))
    if model.compile_s:  # kernel compiles and graph captures, apart from every sample's timings
        store.update_run(compile_s=round(model.compile_s, 3))

    if not store.gather({name: [s.id for s in items] for name, items in samples.items()}):
        return None  # a data-parallel run: process 0 writes the metrics
    metrics = {"model": model.name, "spec": config.model_spec, "tasks": {}}
    for name, task in tasks.items():
        wanted = {s.id for s in samples[name]}
        records = [r.to_json() for r in store.records(name) if r.id in wanted]  # tasks read records as dicts
        metrics["tasks"][name] = TaskMetrics(version=task.version, headline=task.headline,
                                             aggregate=task.aggregate(records), efficiency=efficiency(records)).to_json()
    store.write_json("metrics.json", metrics)
    store.update_run(finished=run_store.now())
    return metrics
