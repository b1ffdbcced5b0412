"""Training and evaluation loops for the zoo: a plain, seeded torch loop (no Trainer), used for
the base model, the PEFT LoRA experts and the dense fine-tunes alike."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from moerge.zoo.tasks import Example


def make_base_model(tokenizer: PreTrainedTokenizerFast, hidden: int, layers: int, heads: int, seed: int) -> LlamaForCausalLM:
    """A tiny Llama built from its config (random init, seeded)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def encode_for_training(
    tokenizer: PreTrainedTokenizerFast, examples: Sequence[Example], prompt_loss: bool
) -> dict[str, torch.Tensor]:
    """Right-padded ids with labels; prompt tokens are masked out of the loss unless ``prompt_loss``."""
    rows, labels = [], []
    for e in examples:
        prompt_ids = tokenizer(e.prompt).input_ids
        answer_ids = tokenizer(e.target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        labels.append((prompt_ids if prompt_loss else [-100] * len(prompt_ids)) + answer_ids)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def train_loop(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    examples: Sequence[Example],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.0,
    warmup: int = 10,
    prompt_loss: bool = False,
    desc: str = "train",
    progress: bool = True,
) -> list[float]:
    """AdamW with linear warm-up and cosine decay over the trainable parameters; returns losses."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_loop: the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, leave=False, disable=not progress)
    for _ in bar:
        batch = encode_for_training(tokenizer, rng.sample(list(examples), min(batch_size, len(examples))), prompt_loss)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.3f}")
    model.eval()
    return losses


@torch.inference_mode()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 12,
    batch_size: int = 128,
    **generate_kwargs: object,
) -> list[str]:
    """Greedy answers (the text after the prompt, special tokens dropped), batched with left padding."""
    if tokenizer.padding_side != "left":
        raise ValueError("generate_answers needs a left-padding tokenizer (tokenizer.padding_side = 'left')")
    model.eval()
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **generate_kwargs,
        )
        out.extend(tokenizer.batch_decode(gen[:, enc.input_ids.shape[1] :], skip_special_tokens=True))
    return [" ".join(t.split()) for t in out]
