"""Small training helpers shared by the zoo and the routers that train something post hoc
(PHATGOOSE gates): turning (prompt, target) pairs into a causal-LM batch, and LR schedules."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

#: a training example: a (prompt, target) pair (loss on the target only) or a plain text (loss on all of it)
TextPair = tuple[str, str] | str


def encode_pairs(tokenizer, examples: Sequence[TextPair], prompt_loss: bool = False) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels``. For a pair, the prompt is
    tokenised with special tokens, the target without, then EOS; prompt tokens get label −100
    unless ``prompt_loss``. A plain string is one sequence with loss everywhere."""
    if not examples:
        raise ValueError("encode_pairs needs at least one example")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first")
    rows, labels = [], []
    for e in examples:
        if isinstance(e, str):
            ids = tokenizer(e).input_ids
            rows.append(ids)
            labels.append(list(ids))
            continue
        prompt, target = e
        prompt_ids = tokenizer(prompt).input_ids
        answer_ids = tokenizer(target, add_special_tokens=False).input_ids
        if tokenizer.eos_token_id is not None:
            answer_ids = answer_ids + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        labels.append((prompt_ids if prompt_loss else [-100] * len(prompt_ids)) + answer_ids)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def warmup_cosine(warmup: int, steps: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return f


def warmup_constant(warmup: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then constant (PHATGOOSE's schedule)."""
    return lambda step: (step + 1) / warmup if step < warmup else 1.0
