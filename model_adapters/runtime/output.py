"""The engine's output step: a row's new token checked against EOS, stop sequences and its budget, and a request's
Generation (texts cut at their stop sequence, timings, decode cost) once all its rows are done."""

from __future__ import annotations

from typing import Any

from nsa_eval.model_adapters.base import Generation
from nsa_eval.model_adapters.decode_cost import DecodeCost, StepCost
from nsa_eval.model_adapters.prompts import cut_at_stop
from nsa_eval.model_adapters.runtime.scheduler import SampleRow


class OutputStep:
    """Tokens into rows and finished rows into Generations, for one tokenizer, its EOS ids and the model's decode
    cost (model_adapters/decode_cost.py)."""

    def __init__(self, tokenizer: Any, eos_ids: set[int], decode_cost: DecodeCost):
        self.tokenizer, self.eos_ids, self.decode_cost = tokenizer, eos_ids, decode_cost

    def take(self, row: SampleRow, token: int, now: float) -> bool:
        """A row's new token; True when the row is done (EOS, a stop sequence, or its budget). `now`: perf_counter s."""
        asked = row.request.asked
        if token in self.eos_ids:
            row.finish = "stop"
        else:
            row.tokens.append(token)
            if asked.stop and self._stopped(row.tokens, asked.stop):
                row.finish = "stop"
            elif len(row.tokens) < asked.max_new_tokens:
                return False
        row.ended = now
        return True

    def _stopped(self, tokens: list[int], stop: list[str]) -> bool:
        """Whether a stop sequence ends within the newest tokens: only a window of them is decoded (a stop sequence
        of L characters spans at most L tokens; the margin covers tokens that decode to partial characters)."""
        window = 2 * max(len(s) for s in stop) + 8
        return cut_at_stop(self.tokenizer.decode(tokens[-window:], skip_special_tokens=True), stop) is not None

    def finish(self, row: SampleRow) -> tuple[int, Generation] | None:
        """Record a finished row -> (request index, its Generation) once all the request's rows are done, else None."""
        request = row.request
        request.done.append(row)
        if len(request.done) < request.rows:
            return None
        done = sorted(request.done, key=lambda r: r.sample)
        texts = []
        for r in done:
            text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
            cut = cut_at_stop(text, request.asked.stop)
            texts.append(text if cut is None else cut)
        counts, finish = [len(r.tokens) for r in done], [r.finish for r in done]
        if request.rows == 1 and request.asked.n > 1:  # greedy: every sample is the same text
            texts, counts, finish = (x * request.asked.n for x in (texts, counts, finish))
        seconds = max(r.decode_s for r in done)  # its rows decode side by side
        generated = sum(len(r.tokens) for r in done)
        cost = sum((self.decode_cost.over_steps(len(request.ids), r.steps) for r in done), StepCost())
        step_s = sum(r.decode_s for r in done)
        return request.index, Generation(
            texts=texts, new_tokens=counts, finish_reasons=finish, prompt_tokens=len(request.ids),
            truncated=request.truncated, prefill_ms=request.prefill_ms,
            decode_tokens_per_s=generated / seconds if seconds > 0 else 0.0, decode_steps=cost.steps,
            decode_ms_per_token=step_s * 1e3 / cost.steps if cost.steps else None,
            kv_bytes_per_step=cost.kv_bytes_per_step, attended_share=cost.mean_attended_share)
