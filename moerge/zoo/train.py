"""Training and evaluation loops for the zoo: a plain, seeded torch loop (no Trainer), used for
the base model, the PEFT LoRA experts and the dense fine-tunes alike."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from moerge.device import module_device
from moerge.progress import progress_bar
from moerge.training import PairEncoder, warmup_cosine
from moerge.zoo.tasks import Example


def make_base_model(tokenizer: PreTrainedTokenizerFast, hidden: int, layers: int, heads: int, seed: int) -> LlamaForCausalLM:
    """A tiny Llama built from its config (random init, seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

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
    tokenizer: PreTrainedTokenizerFast, examples: Sequence[Example], prompt_loss: bool, encoder: PairEncoder | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded ids with labels; prompt tokens are masked out of the loss unless ``prompt_loss``.
    ``encoder``: a :class:`~moerge.training.PairEncoder` kept across a loop's steps (each example tokenised once)."""
    return (encoder or PairEncoder(tokenizer, prompt_loss))([(e.prompt, e.target) for e in examples])


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
    progress: bool | None = None,
) -> list[float]:
    """AdamW with linear warm-up and cosine decay over the trainable parameters; returns losses."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_loop: the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, steps))
    model.train()
    device = module_device(model)
    losses: list[float] = []
    bar = progress_bar(range(steps), desc=desc, leave=False, progress=progress)
    encoder, pool = PairEncoder(tokenizer, prompt_loss), list(examples)
    for _ in bar:
        batch = encode_for_training(tokenizer, rng.sample(pool, min(batch_size, len(pool))), prompt_loss, encoder)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
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
        enc = tokenizer(chunk, return_tensors="pt", padding=True).to(module_device(model))
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
