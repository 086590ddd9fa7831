"""The README's gate table: teacher-forced log-probability of the needle's digits on NIAH prompts for a retrofit
(default: the shipped SmolLM2-NSA; its trained tensors on the student) and for the untrained student with the gates
that retrofit started from (its recipe's gate_init, fitted here on other text), with each model's own gates and with
gates fixed to a few mixes (CPU, float32; about 10 minutes on 2 cores).

    python results/smollm2-nsa-vs-full/gate_probe.py [--length 1024] [--depths 0,25] [--delta FILE]
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer

from nsa_eval.model_adapters.retrofit import Recipe, batch_at, fit_gates, load_trained, student_from_base
from nsa_eval.model_adapters.retrofit_file import read_delta
from nsa_eval.model_adapters.retrofit_corpus import build_corpus
from nsa_eval.model_adapters.runtime.checkpoint import from_pretrained
from nsa_eval.model_adapters.smollm2 import plain_checkpoint
from nsa_eval.tasks.base import TaskContext
from nsa_eval.tasks.niah import NeedleInAHaystack

MIXES = (None, (0.0, 1.0, 0.0), (0.0, 0.5, 0.5), (0.0, 0.7, 0.3))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--depths", default="0,25")
    parser.add_argument("--delta", default="model_adapters/smollm2_nsa.safetensors")
    args = parser.parse_args()
    folder = plain_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def encode(prompt) -> list[int]:
        """A prompt (chat messages, or text) -> the ids the model reads after the chat template."""
        text = prompt if isinstance(prompt, str) else tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                                                      tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    tensors, record = read_delta(Path(args.delta))
    recipe = Recipe.from_record(record["recipe"])
    base = from_pretrained(folder, dtype=torch.float32)
    trained = student_from_base(base, recipe)
    load_trained(trained, tensors)
    fitted = student_from_base(base, recipe)
    corpus = build_corpus(tokenizer, Path("/tmp/gate_probe_corpus.bin"), max_tokens=50_000)
    fitted_on, _ = batch_at(corpus.ids, Recipe(seq_len=2048), 0)
    fit_gates(fitted, fitted_on, recipe.gate_targets or (0.5, 0.5, 0.5))  # where that retrofit started

    task = NeedleInAHaystack(lengths=[args.length], depths=[int(d) for d in args.depths.split(",")],
                             samples_per_cell=2)
    context = TaskContext(count_tokens=lambda prompt: len(encode(prompt)), chat=True, max_length=8192)
    for sample in task.samples(context):
        key = sample.prompt[0]["content"].split("special magic number for ")[-1].split(" mentioned")[0]
        answer_start = tokenizer.apply_chat_template(sample.prompt, add_generation_prompt=True, tokenize=False)
        answer_start += f"The special magic number for {key} mentioned in the provided text is "
        target = tokenizer(sample.target, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([encode(answer_start) + target])

        def score(model, student: bool) -> str:
            with torch.no_grad():
                logits, _ = model(ids, student=student)
            log_probs = torch.log_softmax(logits[0, -len(target) - 1:-1].float(), -1)
            mean = log_probs[torch.arange(len(target)), torch.tensor(target)].mean().item()
            return f"{mean:.3f} ({tokenizer.decode(log_probs.argmax(-1))})"

        print(f"{sample.id} needle {sample.target}, {ids.shape[1]} tokens; teacher {score(trained, False)}")
        for name, model in (("trained", trained), ("gates fitted only", fitted)):
            for mix in MIXES:
                model.fixed_gates = mix
                print(f"  {name}, gates {mix or 'its own'}: {score(model, True)}", flush=True)
            model.fixed_gates = None


if __name__ == "__main__":
    main()
