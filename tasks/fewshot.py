"""Few-shot prompts as lm-evaluation-harness lays them out, in plain text or as chat messages."""

from __future__ import annotations

from nsa_eval.tasks.base import Prompt


def fewshot_prompt(
    shots: list[tuple[str, str]],
    question: str,
    *,
    chat: bool,
    description: str = "",
    target_delimiter: str = " ",
    fewshot_delimiter: str = "\n\n",
) -> Prompt:
    """The prompt for `question` after `shots` ((question text, answer text) pairs).

    Plain text: description + "q1{target_delimiter}a1{fewshot_delimiter}" ... + question.
    Chat (lm-eval's --apply_chat_template --fewshot_as_multiturn): the description as the system message,
    each shot as a user turn and an assistant turn, the question as the last user turn.
    """
    if chat:
        messages = [{"role": "system", "content": description}] if description else []
        for shot_question, shot_answer in shots:
            messages.append({"role": "user", "content": shot_question})
            messages.append({"role": "assistant", "content": shot_answer})
        messages.append({"role": "user", "content": question})
        return messages
    examples = "".join(f"{q}{target_delimiter}{a}{fewshot_delimiter}" for q, a in shots)
    return f"{description}{examples}{question}"
