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
    return PairEncoder(tokenizer, prompt_loss)(examples)


class PairEncoder:
    """:func:`encode_pairs` that tokenises each distinct example once. A training loop samples
    the same few thousand examples for hundreds of steps; tokenising every sampled example
    again cost 15 % of a zoo build's CPU time (678,401 tokenizer calls in a cold ``moerge demo``,
    measured with cProfile). The batches are identical to :func:`encode_pairs`'s."""

    def __init__(self, tokenizer, prompt_loss: bool = False) -> None:  # noqa: ANN001
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first")
        self.tokenizer, self.prompt_loss, self.pad = tokenizer, prompt_loss, pad
        self._rows: dict[TextPair, tuple[list[int], list[int]]] = {}

    def _row(self, e: TextPair) -> tuple[list[int], list[int]]:
        row = self._rows.get(e)
        if row is not None:
            return row
        tok = self.tokenizer
        if isinstance(e, str):
            ids = tok(e).input_ids
            row = (ids, list(ids))
        else:
            prompt, target = e
            prompt_ids = tok(prompt).input_ids
            answer_ids = tok(target, add_special_tokens=False).input_ids
            if tok.eos_token_id is not None:
                answer_ids = answer_ids + [tok.eos_token_id]
            row = (prompt_ids + answer_ids, (prompt_ids if self.prompt_loss else [-100] * len(prompt_ids)) + answer_ids)
        self._rows[e] = row
        return row

    def __call__(self, examples: Sequence[TextPair]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("encode_pairs needs at least one example")
        rows = [self._row(e) for e in examples]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([r + [self.pad] * (width - len(r)) for r, _ in rows], dtype=torch.long)
        lab = torch.tensor([lb + [-100] * (width - len(lb)) for _, lb in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows], dtype=torch.long)
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
