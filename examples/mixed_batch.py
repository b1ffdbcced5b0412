"""A mixed-expert batch on the embedded zoo: every prompt answered by the expert it names.

    python examples/mixed_batch.py

Builds (or loads) the `small` zoo, attaches all its LoRA experts to one base model with the
multi-expert layer, and runs one `generate` where each row uses a different expert.
"""

from __future__ import annotations

from moerge import zoo
from moerge.adapters import attach, load_lora, one_hot, use_weights
from moerge.zoo.train import generate_answers


def main() -> None:
    z = zoo.load("small")
    reg = z.registry
    experts = [r.name for r in reg.list(kind="lora")]
    model, tok = z.load_base(), z.tokenizer()
    attach(model, [load_lora(name, registry=reg) for name in experts])

    chosen = ["reverse", "sort", "max"]
    prompts = [z.test_split(task)[0].prompt for task in chosen]  # unseen test prompts
    weights = one_hot([experts.index(e) for e in chosen] + [-1], len(experts))  # last row: the base alone
    with use_weights(model, weights):
        answers = generate_answers(model, tok, [*prompts, prompts[0]], max_new_tokens=8)
    for prompt, expert, answer in zip([*prompts, prompts[0]], [*chosen, "(base)"], answers, strict=True):
        print(f"{expert:>8}: {prompt} {answer}")


if __name__ == "__main__":
    main()
