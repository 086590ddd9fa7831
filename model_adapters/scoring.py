"""Scoring by forward passes, shared by the transformers backend (hf.py) and the native engine (runtime/engine.py):
log-likelihoods of continuations as lm-evaluation-harness computes them, rolling log-likelihoods of whole documents,
and token log-probabilities for a server's echo.

ForwardScoring runs padded batches of `batch_size` through `model(input_ids, attention_mask)` (transformers) and one
forward pass per rolling window. PackedScoring (the native engine) packs whole sequences along T into forwards of at
most `batch_tokens` tokens (no padding), runs the LM head only where a target is scored, and gives requests with the
same input one sequence (lm-eval's MMLU: four one-token letters after one prompt are one forward)."""

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
        scores = self._continuation_scores([(whole, n_cont) for whole, n_cont, _ in encoded])
        return [Loglikelihood(logprob, greedy, n_cont, cut)
                for (logprob, greedy), (_, n_cont, cut) in zip(scores, encoded)]

    def _continuation_scores(self, encoded: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(ids, n): the last n of ids are the continuation -> (summed log P of the continuation's tokens, whether
        each was the argmax), in padded batches of batch_size through `model(input_ids, attention_mask)`."""
        results: list[tuple[float, bool]] = []
        for start in range(0, len(encoded), self.batch_size):
            batch = encoded[start : start + self.batch_size]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (seq, _) in enumerate(batch):
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for r, (seq, n_cont) in enumerate(batch):
                positions = torch.arange(len(seq) - n_cont - 1, len(seq) - 1, device=logprobs.device)
                targets = torch.tensor(seq[-n_cont:], device=logprobs.device)
                token_lp = logprobs[r, positions, targets]
                greedy = bool((logprobs[r, positions].argmax(-1) == targets).all())
                results.append((float(token_lp.sum()), greedy))
        return results

    @torch.no_grad()
    def loglikelihood_rolling(self, requests: list[RollingLoglikelihoodRequest]) -> list[RollingLoglikelihood]:
        """Every token of each text scored as lm-eval's loglikelihood_rolling (`RollingLoglikelihoodRequest`): one
        forward pass per window of at most max_length tokens (`prompts.rolling_windows`)."""
        windows = []
        for request in requests:
            tokens, prefix = rolling_tokens(self.tokenizer, request.text)
            windows.append(rolling_windows(tokens, prefix, self.max_length, request.stride))
        scored = iter(self._windows_logprobs([window for each in windows for window in each]))
        results = []
        for each in windows:
            logprobs: list[float] = []
            positions: list[int] = []
            for inputs, targets in each:
                logprobs += next(scored)
                positions += range(len(inputs) - len(targets), len(inputs))
            results.append(RollingLoglikelihood(logprobs, positions, len(each)))
        return results

    def _windows_logprobs(self, windows: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Each rolling window's (inputs, targets) -> its targets' log-probabilities, one forward pass per window."""
        return [self._target_logprobs(inputs, targets) for inputs, targets in windows]

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


class PackedScoring(ForwardScoring):
    """ForwardScoring for a model that scores packed sequences, the runtime's `Transformer.score_positions` (module
    docstring): log-likelihoods and rolling windows go through `_packed_scores`. Needs self.batch_tokens (tokens per
    packed forward) besides what ForwardScoring needs."""

    def _continuation_scores(self, encoded: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """As ForwardScoring's, from packed forwards: the input is ids[:-1] (the last token predicts nothing), so
        requests that differ only in a one-token continuation share one sequence."""
        for ids, n_cont in encoded:
            if n_cont >= len(ids):
                raise ValueError(f"a log-likelihood request needs a token before its continuation to predict the "
                                 f"continuation's first token from; this one has {n_cont} continuation tokens of "
                                 f"{len(ids)} in all within --max-length {self.max_length} (an empty context, or a "
                                 "continuation as long as --max-length): give a context, or raise --max-length")
        scored = self._packed_scores([(ids[:-1], ids[-n_cont:]) for ids, n_cont in encoded])
        return [(float(logprobs.sum()), bool(greedy.all())) for logprobs, greedy in scored]

    def _windows_logprobs(self, windows: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Each rolling window's targets' log-probabilities, windows packed as any scored sequence."""
        return [logprobs.tolist() for logprobs, _ in self._packed_scores(windows)]

    def _packed_scores(self, items: list[tuple[list[int], list[int]]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """items (inputs, targets): targets[j] is predicted at position len(inputs) - len(targets) + j of inputs ->
        per item (log P of each target [n] float32, whether it was the argmax [n] bool), on the CPU. Items with the
        same inputs share one sequence; the distinct sequences are taken longest first (as lm-eval) and packed into
        forwards of at most batch_tokens tokens (`token_packs`; a longer sequence goes alone, in prefill slices)."""
        users: dict[tuple[int, ...], list[int]] = {}  # a sequence -> the items it answers
        for i, (inputs, _) in enumerate(items):
            users.setdefault(tuple(inputs), []).append(i)
        sequences = sorted(users, key=len, reverse=True)
        results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(items)
        for pack in token_packs([len(seq) for seq in sequences], self.batch_tokens):
            positions: list[int] = []
            targets: list[int] = []
            spans = []  # (item, first of its targets among the pack's, count)
            offset = 0
            for seq in (sequences[i] for i in pack):
                for i in users[seq]:
                    wanted = items[i][1]
                    spans.append((i, len(targets), len(wanted)))
                    positions += range(offset + len(seq) - len(wanted), offset + len(seq))
                    targets += wanted
                offset += len(seq)
            logprobs, greedy = self.model.score_positions(
                [torch.tensor(sequences[i], dtype=torch.long, device=self.device) for i in pack],
                torch.tensor(positions, dtype=torch.long, device=self.device),
                torch.tensor(targets, dtype=torch.long, device=self.device))
            logprobs, greedy = logprobs.cpu(), greedy.cpu()
            for i, first, count in spans:
                results[i] = (logprobs[first:first + count], greedy[first:first + count])
        return results  # type: ignore[return-value]


def token_packs(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of sequences of these lengths, in order, cut into packs of at most `budget` tokens each (a sequence
    longer than the budget is a pack of its own)."""
    packs: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if not packs or used + n > budget:
            packs.append([])
            used = 0
        packs[-1].append(i)
        used += n
    return packs
