"""Token counting as the model sees a prompt (NIAH and RULER tests measure their prompts with it)."""


def counter(tokenizer):
    """count(prompt): tokens of plain text, or of chat messages with the chat template applied."""

    def count(prompt):
        if isinstance(prompt, str):
            return len(tokenizer(prompt)["input_ids"])
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count
