"""Scoring by forward passes, shared by the transformers backend (hf.py) and the native engine (runtime/engine.py):
log-likelihoods of continuations as lm-evaluation-harness computes them, rolling log-likelihoods of whole documents,
and token log-probabilities for a server's echo."""

from __future__ import annotations

import inspect

import torch

from nsa_eval.model_adapters.base import (Loglikelihood, LoglikelihoodRequest, RollingLoglikelihood,
                                          RollingLoglikelihoodRequest)
from nsa_eval.model_adapters.prompts import loglikelihood_tokens, rolling_tokens, rolling_windows


class ForwardScoring:
    """Log-likelihoods and token log-probabilities from one forward pass of a causal LM that takes
    `model(input_ids=[B, T], attention_mask=[B, T]).logits` (transformers models and the runtime's Transformer).
    Needs self.model, self.tokenizer, self.render, self.max_length, self.batch_size, self.device, self.name."""

    # ---- log-likelihood -----------------------------------------------------------------------------

    @torch.no_grad()
    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[Loglikelihood]:
        """Summed log P(continuation | context), tokenised as lm-evaluation-harness does: the whole string is
        encoded once and split where the context's own encoding ends; trailing spaces of the context move to
        the continuation. Over-long inputs lose tokens from the left."""
        encoded = []
        for request in requests:
            whole, n_cont = loglikelihood_tokens(
                self.tokenizer, self.render(request.context), request.continuation, isinstance(request.context, str)
            )
            cut = len(whole) > self.max_length
            encoded.append((whole[-self.max_length :], n_cont, cut))
        results: list[Loglikelihood] = []
        for start in range(0, len(encoded), self.batch_size):
            batch = encoded[start : start + self.batch_size]
            width = max(len(ids) for ids, _, _ in batch)
            ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (seq, _, _) in enumerate(batch):
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for r, (seq, n_cont, cut) in enumerate(batch):
                positions = torch.arange(len(seq) - n_cont - 1, len(seq) - 1, device=logprobs.device)
                targets = torch.tensor(seq[-n_cont:], device=logprobs.device)
                token_lp = logprobs[r, positions, targets]
                greedy = bool((logprobs[r, positions].argmax(-1) == targets).all())
                results.append(Loglikelihood(float(token_lp.sum()), greedy, n_cont, cut))
        return results

    @torch.no_grad()
    def loglikelihood_rolling(self, requests: list[RollingLoglikelihoodRequest]) -> list[RollingLoglikelihood]:
        """Every token of each text scored as lm-eval's loglikelihood_rolling (`RollingLoglikelihoodRequest`): one
        forward pass per window of at most max_length tokens (`prompts.rolling_windows`)."""
        results = []
        for request in requests:
            tokens, prefix = rolling_tokens(self.tokenizer, request.text)
            windows = rolling_windows(tokens, prefix, self.max_length, request.stride)
            logprobs: list[float] = []
            positions: list[int] = []
            for inputs, targets in windows:
                logprobs += self._target_logprobs(inputs, targets)
                positions += range(len(inputs) - len(targets), len(inputs))
            results.append(RollingLoglikelihood(logprobs, positions, len(windows)))
        return results

    def _target_logprobs(self, inputs: list[int], targets: list[int]) -> list[float]:
        """log P(targets[j] | inputs up to position len(inputs) - len(targets) + j) in nats, float32, from one forward
        pass over inputs (the logits of the last len(targets) positions only, where the model can keep fewer)."""
        keep = {"logits_to_keep": len(targets)} if self._keeps_logits() else {}
        logits = self.model(input_ids=torch.tensor([inputs], device=self.device), **keep).logits[0, -len(targets):]
        return target_logprobs(logits, torch.tensor(targets, device=logits.device))

    def _keeps_logits(self) -> bool:
        return "logits_to_keep" in inspect.signature(self.model.forward).parameters

    @torch.no_grad()
    def token_logprobs(self, ids: list[int], top: int = 1) -> list[tuple[float, list[tuple[int, float]]]]:
        """For each token after the first: (log P(ids[i] | ids[:i]) in nats, the `top` most likely tokens at that
        position as (id, logprob)), from one forward pass. What a server needs for OpenAI's echo + logprobs."""
        if len(ids) > self.max_length:
            raise ValueError(f"{len(ids)} tokens exceed {self.name}'s --max-length {self.max_length}; send a shorter prompt")
        logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0, :-1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        chosen = logprobs.gather(1, torch.tensor(ids[1:], device=self.device).unsqueeze(1)).squeeze(1).tolist()
        best_lp, best_ids = logprobs.topk(max(1, top), dim=-1)
        return [
            (lp, list(zip(row_ids, row_lp))[:top])
            for lp, row_ids, row_lp in zip(chosen, best_ids.tolist(), best_lp.tolist())
        ]


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, rows: int = 1024) -> list[float]:
    """logits [n, V] (any dtype), targets [n] -> log_softmax(logits)[i, targets[i]] in float32, computed `rows` rows
    at a time so that a long window's float32 log-probabilities never exist whole."""
    out = []
    for start in range(0, logits.shape[0], rows):
        part = torch.log_softmax(logits[start : start + rows].float(), dim=-1)
        out.append(part.gather(1, targets[start : start + rows, None])[:, 0])
    return torch.cat(out).tolist() if out else []
