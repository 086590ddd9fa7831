"""The engine's output step: a decoding sample's new token checked against EOS, stop sequences and its budget, and a request's
Generation (texts cut at their stop sequence, timings, decode cost) once all its samples are done."""

from __future__ import annotations

from typing import Any

from nsa_eval.model_adapters.base import Generation
from nsa_eval.model_adapters.decode_cost import DecodeCost, StepCost
from nsa_eval.model_adapters.prompts import cut_at_stop
from nsa_eval.model_adapters.runtime.scheduler import DecodingSample


class OutputStep:
    """Tokens into decoding samples and finished ones into Generations, for one tokenizer, its EOS ids and the model's decode
    cost (model_adapters/decode_cost.py)."""

    def __init__(self, tokenizer: Any, eos_ids: set[int], decode_cost: DecodeCost):
        self.tokenizer, self.eos_ids, self.decode_cost = tokenizer, eos_ids, decode_cost

    def take(self, decoding: DecodingSample, token: int, now: float) -> bool:
        """A sample's new token; True when the sample is done (EOS, a stop sequence, or its budget). `now`: perf_counter s."""
        asked = decoding.request.asked
        if token in self.eos_ids:
            decoding.finish = "stop"
        else:
            decoding.tokens.append(token)
            if asked.stop and self._stopped(decoding.tokens, asked.stop):
                decoding.finish = "stop"
            elif len(decoding.tokens) < asked.max_new_tokens:
                return False
        decoding.ended = now
        return True

    def _stopped(self, tokens: list[int], stop: list[str]) -> bool:
        """Whether a stop sequence ends within the newest tokens: only a window of them is decoded (a stop sequence
        of L characters spans at most L tokens; the margin covers tokens that decode to partial characters)."""
        window = 2 * max(len(s) for s in stop) + 8
        return cut_at_stop(self.tokenizer.decode(tokens[-window:], skip_special_tokens=True), stop) is not None

    def finish(self, decoding: DecodingSample) -> tuple[int, Generation] | None:
        """Record a finished sample -> (request index, its Generation) once all the request's samples are done, else
        None."""
        request = decoding.request
        request.done.append(decoding)
        if len(request.done) < request.decoded_samples:
            return None
        done = sorted(request.done, key=lambda r: r.sample)
        texts = []
        for r in done:
            text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
            cut = cut_at_stop(text, request.asked.stop)
            texts.append(text if cut is None else cut)
        counts, finish = [len(r.tokens) for r in done], [r.finish for r in done]
        if request.decoded_samples == 1 and request.asked.n > 1:  # greedy: every sample is the same text
            texts, counts, finish = (x * request.asked.n for x in (texts, counts, finish))
        seconds = max(r.decode_s for r in done)  # its samples decode side by side
        generated = sum(len(r.tokens) for r in done)
        cost = sum((self.decode_cost.over_steps(len(request.ids), r.steps) for r in done), StepCost())
        step_s = sum(r.decode_s for r in done)
        return request.index, Generation(
            texts=texts, new_tokens=counts, finish_reasons=finish, prompt_tokens=len(request.ids),
            truncated=request.truncated, prefill_ms=request.prefill_ms,
            decode_tokens_per_s=generated / seconds if seconds > 0 else 0.0, decode_steps=cost.steps,
            decode_ms_per_token=step_s * 1e3 / cost.steps if cost.steps else None,
            kv_bytes_per_step=cost.kv_bytes_per_step, attended_share=cost.mean_attended_share)
