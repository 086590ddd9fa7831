"""`vllm:PATH`: a full-attention checkpoint run by vLLM inside this process (the fast path for baselines).

Optional: it needs a CUDA GPU and `pip install 'nsa-eval[vllm]'`. vLLM is imported only when a `vllm:` spec is
loaded; without it the spec ends in one line saying how to install it. It cannot run on the CI machine (no GPU,
vLLM not installed), so no test runs it; it was written against vLLM's documented offline API (`LLM`,
`SamplingParams`, `TokensPrompt`, `prompt_logprobs`) and has not been run in this project yet.
NSA checkpoints are not vLLM models: serve those with `nsa-eval serve --model nsa:PATH` and use `openai:`.

Prompts are tokenised here (chat template for chat messages, the middle cut when too long, as `hf:` does),
so vLLM gets token ids and the prompt length recorded is the one the model saw. vLLM schedules the whole list of
requests at once; timings are per call: prefill is not separated from decode, so prefill_ms is 0 and
decode_tokens_per_s is generated tokens over the call's wall time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from nsa_eval.model_adapters.base import (Generation, GenerationRequest, LanguageModel, Loglikelihood,
                                          LoglikelihoodRequest, ModelLoadError)
from nsa_eval.model_adapters.prompts import PromptTokens, first_line, loglikelihood_tokens, truncate_middle

INSTALL_HINT = "pip install 'nsa-eval[vllm]' on a machine with a CUDA GPU"


class VLLMModel(PromptTokens, LanguageModel):
    """A vLLM engine (`vllm.LLM`) behind the LanguageModel interface."""

    def __init__(self, llm: Any, name: str):
        self.llm = llm
        self.name = name
        self.tokenizer = llm.get_tokenizer()
        self.max_length = int(llm.llm_engine.model_config.max_model_len)
        self.chat = getattr(self.tokenizer, "chat_template", None) is not None

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str | None = None, max_length: int | None = None,
                        name: str | None = None, **engine_options: Any) -> "VLLMModel":
        """Start vLLM on a local checkpoint folder, on the GPU (nsa_eval/models.py refuses --device cpu; vLLM
        batches by itself, so --batch-size does not reach it)."""
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"vllm:{path} is not a checkpoint folder with config.json; give the folder save_pretrained wrote")
        try:
            import vllm
        except ImportError:
            raise ModelLoadError(f"vllm:{path} needs vLLM, which is not installed: {INSTALL_HINT}") from None
        try:
            llm = vllm.LLM(model=str(folder), dtype=dtype if dtype not in (None, "auto") else "auto",
                           max_model_len=max_length, seed=0, **engine_options)
        except Exception as error:  # vLLM raises many types; the user needs one line
            raise ModelLoadError(f"vLLM could not load {folder}: {first_line(error)}") from None
        return cls(llm, name or folder.name)

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        from vllm import SamplingParams, TokensPrompt

        prompts, params, cuts = [], [], []
        for request in requests:
            budget = self.max_length - request.max_new_tokens
            if budget < 1:
                raise ValueError(
                    f"max_new_tokens {request.max_new_tokens} leaves no room for a prompt in --max-length {self.max_length}"
                )
            ids, cut = truncate_middle(self.encode(request.prompt), budget)
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            cuts.append(cut)
            params.append(SamplingParams(n=request.n, temperature=request.temperature, top_p=request.top_p,
                                         max_tokens=request.max_new_tokens, stop=list(request.stop) or None,
                                         seed=request.seed))
        started = time.perf_counter()
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        seconds = time.perf_counter() - started
        generated = sum(len(c.token_ids) for out in outputs for c in out.outputs)
        return [
            Generation(
                texts=[c.text for c in out.outputs],
                new_tokens=[len(c.token_ids) for c in out.outputs],
                finish_reasons=["length" if c.finish_reason == "length" else "stop" for c in out.outputs],
                prompt_tokens=len(out.prompt_token_ids),
                truncated=cut,
                decode_tokens_per_s=generated / seconds if seconds > 0 else 0.0,
            )
            for out, cut in zip(outputs, cuts)
        ]

    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[Loglikelihood]:
        """Summed log P(continuation | context) from vLLM's prompt log-probabilities, split as `hf:` splits."""
        from vllm import SamplingParams, TokensPrompt

        encoded = []
        for request in requests:
            context = request.context if isinstance(request.context, str) else self.render(request.context)
            ids, n_cont = loglikelihood_tokens(self.tokenizer, context, request.continuation, isinstance(request.context, str))
            encoded.append((ids[-self.max_length :], n_cont, len(ids) > self.max_length))
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _, _ in encoded],
                                    sampling_params=params, use_tqdm=False)
        results = []
        for (ids, n_cont, cut), out in zip(encoded, outputs):
            total, greedy = 0.0, True
            for position in range(len(ids) - n_cont, len(ids)):
                scores = {token: getattr(value, "logprob", value) for token, value in out.prompt_logprobs[position].items()}
                total += scores[ids[position]]
                greedy = greedy and scores[ids[position]] >= max(scores.values()) - 1e-6
            results.append(Loglikelihood(total, greedy, n_cont, cut))
        return results
