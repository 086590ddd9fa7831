"""What every backend that holds a tokenizer does with prompts, without torch (the `openai:` backend imports this
alone): render chat messages, encode, count tokens, truncate in the middle, split a log-likelihood request into
context and continuation tokens as lm-evaluation-harness does, split a whole document into lm-eval's rolling windows,
find stop sequences and EOS ids."""

from __future__ import annotations

from typing import Any

from nsa_eval.model_adapters.base import Prompt


class PromptTokens:
    """How a backend holding a transformers tokenizer turns prompts into tokens (`hf:`, `vllm:`, `nsa:`).

    Needs `self.tokenizer`, `self.chat` (the tokenizer has a chat template) and `self.name`.
    """

    def render(self, prompt: Prompt) -> str:
        """Chat messages through the chat template (with the assistant cue); text as is."""
        if isinstance(prompt, str):
            return prompt
        if not self.chat:
            raise ValueError(f"{self.name} has no chat template; give the task plain-text prompts (--no-chat-template)")
        return self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: special tokens from the chat template, or the tokenizer's own for text."""
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return self.tokenizer(self.render(prompt), add_special_tokens=False)["input_ids"]

    def count_tokens(self, text: Prompt) -> int:
        return len(self.encode(text))


def loglikelihood_tokens(tokenizer: Any, context: str, continuation: str, special: bool) -> tuple[list[int], int]:
    """Token ids of context + continuation and how many of them belong to the continuation, split as
    lm-evaluation-harness does: the whole string is encoded once and split where the context's own encoding
    ends; trailing spaces of the context move to the continuation. special: add the tokenizer's special tokens."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=special)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=special)["input_ids"]
    return whole, max(1, len(whole) - len(context_ids))


def rolling_tokens(tokenizer: Any, text: str) -> tuple[list[int], int]:
    """(the text's token ids without special tokens, the prefix token that predicts the first of them: the
    tokenizer's BOS, else its EOS), as lm-eval's loglikelihood_rolling encodes a document. (lm-eval 0.4.13's HFLM
    encodes with the tokenizer's own special tokens, so a tokenizer that adds a BOS by itself, as Llama's, gets the
    BOS twice there; tokenizers that add none, SmolLM2's, Qwen's and GPT-2's, give the same ids both ways.)"""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to predict a document's first token from")
    return tokenizer(text, add_special_tokens=False)["input_ids"], prefix


def rolling_windows(tokens: list[int], prefix: int, max_length: int,
                    stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """A document's tokens as [(inputs, targets)]: one forward pass over `inputs` (at most max_length tokens) whose
    last len(targets) positions predict `targets`; every token is a target exactly once, in order. As lm-eval's
    get_rolling_token_windows + make_disjoint_window with context_len 1 (stride None: disjoint windows of max_length
    predictions) or max_length - stride + 1 (sliding: stride new tokens per window after the first). The first window
    starts with the prefix token and predicts its min(max_length, len(tokens)) tokens."""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    if stride is not None and not 1 <= stride <= max_length:
        raise ValueError(f"a rolling window's stride must be between 1 and the window ({max_length} tokens), "
                         f"got {stride}")
    if not tokens:
        return []
    step = max_length if stride is None else stride
    first = min(max_length, len(tokens))
    windows = [([prefix] + tokens[: first - 1], tokens[:first])]
    done = first
    while done < len(tokens):
        count = min(len(tokens) - done, step)
        end = done + count
        windows.append((tokens[end - max_length - 1 : end - 1], tokens[end - count : end]))
        done = end
    return windows


def truncate_middle(ids: list[int], budget: int) -> tuple[list[int], bool]:
    """Keep the first and last budget/2 tokens (LongBench's rule). Returns (ids, whether it cut)."""
    if len(ids) <= budget:
        return ids, False
    head = budget // 2
    return ids[:head] + ids[len(ids) - (budget - head) :], True


def cut_at_stop(text: str, stop: list[str]) -> str | None:
    """Text before the earliest stop sequence, or None when none occurs."""
    hits = [text.find(s) for s in stop if s and s in text]
    return text[: min(hits)] if hits else None


def eos_ids(config: Any, tokenizer: Any, generation_config: Any = None) -> set[int]:
    """Token ids that end a generation: the generation config's, the model config's and the tokenizer's EOS."""
    ids = set()
    for source in (generation_config, config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


