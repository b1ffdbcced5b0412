"""Serving benchmarks, every figure a ratio against a baseline measured in the same run.

1. **Mixed-expert batches** (in-process; the path every worker runs): ``generate`` throughput
   of a batch whose rows use k = 1, 2, 4, 8 distinct LoRA experts, through the multi-expert
   layer (per-row :class:`~moerge.adapters.Assignment`), against a single-expert batch of the
   same size; the same workload through PEFT ``adapter_names`` mixed batches and through
   per-request adapter switching (``set_adapter`` + one ``generate`` per request), on the
   same model and the same adapters.
2. **HTTP on loopback** (Ray Serve app on the zoo): requests/s and p50/p99 latency at a fixed
   concurrency with a real HTTP client, for explicit experts, for requests routed by the
   retrieval router, and for a token-routed composition (GLIDER); the baseline is explicit
   experts at concurrency 1 (no batching possible).
"""

from __future__ import annotations

import asyncio
import copy
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from moerge.adapters import Assignment, attach_slots, load_expert, lora_from_state, use_weights
from moerge.bench.routing import TARGETS, BenchConfig, build_model, sync
from moerge.device import describe, module_device, module_dtype
from moerge.progress import progress_bar


@dataclass
class MixedConfig:
    hidden: int = 512
    layers: int = 4
    rank: int = 16
    experts: int = 8
    ks: tuple[int, ...] = (1, 2, 4, 8)
    batch: int = 32
    prompt: int = 16
    new_tokens: int = 32
    repeats: int = 3
    threads: int | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"
    #: also time eager against compiled decode steps (static cache + torch.compile)
    compile: bool = False
    compile_backend: str = "inductor"
    #: a pretrained model instead of the random Llama (:attr:`moerge.bench.routing.BenchConfig.base`)
    base: str | None = None


def _peft_model(cfg: MixedConfig) -> tuple[Any, torch.nn.Module]:
    """A PEFT model with ``cfg.experts`` random non-zero adapters, and a clean copy of its base."""
    from peft import LoraConfig, get_peft_model

    base = build_model(
        BenchConfig(
            hidden=cfg.hidden,
            layers=cfg.layers,
            seq=cfg.prompt,
            new_tokens=cfg.new_tokens,
            seed=cfg.seed,
            device=cfg.device,
            dtype=cfg.dtype,
            base=cfg.base,
        )
    )
    clean = copy.deepcopy(base)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.0)
    torch.manual_seed(cfg.seed + 1)
    pm = get_peft_model(base, lcfg, adapter_name="e0")
    for e in range(1, cfg.experts):
        pm.add_adapter(f"e{e}", lcfg)
    with torch.no_grad():  # PEFT's random init is large for B; keep generations numerically tame
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    return pm.eval(), clean.eval()


def run_mixed(cfg: MixedConfig | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Throughput (generated tokens/s) per variant, medians over ``repeats`` interleaved rounds."""
    from peft import get_peft_model_state_dict

    cfg = cfg or MixedConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if max(cfg.ks) > cfg.experts or cfg.batch % max(cfg.ks):
        raise ValueError(f"every k must be ≤ experts ({cfg.experts}) and divide the batch ({cfg.batch})")
    pm, ours = _peft_model(cfg)
    names = [f"e{e}" for e in range(cfg.experts)]
    attach_slots(ours, sorted({n for n, m in ours.named_modules() if n.split(".")[-1] in TARGETS}), cfg.experts)
    for e, n in enumerate(names):
        load_expert(ours, e, lora_from_state(n, pm.peft_config[n].to_dict(), get_peft_model_state_dict(pm, adapter_name=n)))
    dev = module_device(ours)
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(3, min(2000, ours.config.vocab_size), (cfg.batch, cfg.prompt), generator=g).to(dev)
    mask = torch.ones_like(ids)
    gen_kw = {"max_new_tokens": cfg.new_tokens, "min_new_tokens": cfg.new_tokens, "do_sample": False, "pad_token_id": 0}

    def rows(k: int) -> list[int]:
        return [b % k for b in range(cfg.batch)]  # k experts, evenly interleaved (worst case for grouping)

    @torch.inference_mode()
    def moerge_batch(k: int) -> None:
        with use_weights(ours, Assignment(torch.tensor(rows(k)))):
            ours.generate(input_ids=ids, attention_mask=mask, **gen_kw)

    @torch.inference_mode()
    def peft_mixed(k: int) -> None:
        if k == 1:
            pm.set_adapter("e0")
            pm.generate(input_ids=ids, attention_mask=mask, **gen_kw)
        else:
            pm.generate(input_ids=ids, attention_mask=mask, adapter_names=[names[e] for e in rows(k)], **gen_kw)

    @torch.inference_mode()
    def peft_switching(k: int) -> None:
        for b, e in enumerate(rows(k)):
            pm.set_adapter(names[e])
            pm.generate(input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1], **gen_kw)

    variants: list[tuple[str, int, Any]] = [("moerge", k, moerge_batch) for k in cfg.ks]
    variants += [("peft adapter_names", k, peft_mixed) for k in cfg.ks]
    variants += [("peft set_adapter per request", k, peft_switching) for k in cfg.ks if k in (max(cfg.ks),)]
    times: dict[tuple[str, int], list[float]] = {(n, k): [] for n, k, _ in variants}
    for _, k, fn in variants[:2]:  # warm-up
        fn(k)
    bar = progress_bar(total=cfg.repeats * len(variants), desc="bench serving (mixed batches)", progress=progress)
    for _ in range(cfg.repeats):
        for n, k, fn in variants:
            sync(dev)
            t = time.perf_counter()
            fn(k)
            sync(dev)
            times[(n, k)].append(time.perf_counter() - t)
            bar.update()
    bar.close()
    tokens = cfg.batch * cfg.new_tokens
    single = statistics.median(times[("moerge", 1)])
    rows_out = []
    for (n, k), ts in times.items():
        med = statistics.median(ts)
        rows_out.append(
            {
                "variant": n,
                "k": k,
                "seconds": round(med, 4),
                "tokens_per_s": round(tokens / med, 1),
                "vs_single": round(single / med, 3),
                "vs_peft_same_k": round(statistics.median(times[("peft adapter_names", k)]) / med, 3)
                if ("peft adapter_names", k) in times
                else None,
            }
        )
    mc = ours.config
    out = {
        "config": asdict(cfg) | {"hidden": mc.hidden_size, "layers": mc.num_hidden_layers},
        "rows": rows_out,
        "threads": torch.get_num_threads(),
        "machine": describe(dev),
        "dtype": str(module_dtype(ours)).removeprefix("torch."),
    }
    if cfg.compile:
        out["decode"] = run_decode(ours, ids, mask, cfg, progress)
    return out


def memory_bandwidth(device: torch.device, megabytes: int = 512) -> float:
    """Bytes per second one device-to-device copy moves (read + write), best of 5."""
    n = megabytes * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    del src, dst
    return 2 * n * 4 / best


def run_decode(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, cfg: MixedConfig, progress: bool | None = None
) -> dict[str, Any]:
    """Milliseconds per decode step, eager against compiled (static KV cache + torch.compile,
    CUDA graphs on a GPU), on a mixed batch over min(4, experts) experts; a step's time is
    (generate N tokens − generate 1 token) / (N − 1), so prefill is left out. The physical
    floor is reading every weight once at the memory bandwidth measured in the same run."""
    from moerge import decoding

    dev = module_device(model)
    k = min(4, cfg.experts)
    assign = Assignment(torch.tensor([b % k for b in range(ids.shape[0])]))
    kw = {"do_sample": False, "pad_token_id": 0, "attention_mask": mask}
    n = cfg.new_tokens

    @torch.inference_mode()
    def gen(tokens: int, extra: dict[str, Any]) -> float:
        with use_weights(model, assign):
            sync(dev)
            t = time.perf_counter()
            model.generate(input_ids=ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw, **extra)
            sync(dev)
            return time.perf_counter() - t

    variants = {"eager": {}, "compiled": decoding.compile_kwargs(dev, backend=cfg.compile_backend)}
    result: dict[str, Any] = {"k": k, "batch": ids.shape[0], "new_tokens": n}
    t = time.perf_counter()
    try:
        for _ in range(2):  # compile, record the graphs
            gen(n, variants["compiled"])
            gen(1, variants["compiled"])
    except Exception as exc:  # a missing compiler, an unsupported backend: say so, time eager alone
        result["compile_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        variants.pop("compiled")
    result["compile_s"] = round(time.perf_counter() - t, 1)
    gen(n, {})
    steps: dict[str, list[float]] = {v: [] for v in variants}
    for _ in progress_bar(range(cfg.repeats), desc="bench serving (decode)", progress=progress):
        for name, extra in variants.items():
            steps[name].append((gen(n, extra) - gen(1, extra)) / (n - 1))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    bw = memory_bandwidth(dev)
    floor_ms = 1000 * weight_bytes / bw
    result.update(weight_gb=round(weight_bytes / 1e9, 3), bandwidth_gb_s=round(bw / 1e9, 1), floor_ms=round(floor_ms, 3))
    for name, ts in steps.items():
        ms = 1000 * statistics.median(ts)
        result[f"{name}_ms_per_step"] = round(ms, 3)
        result[f"{name}_x_floor"] = round(ms / floor_ms, 1)
    if "compiled" in steps:
        # a step's time is a difference of two timings: on a tiny model and a busy machine noise can
        # make it ≤ 0, and then there is no ratio to report
        eager, compiled = result["eager_ms_per_step"], result["compiled_ms_per_step"]
        result["compiled_speedup"] = round(eager / compiled, 2) if eager > 0 and compiled > 0 else None
    return result


# ------------------------------------------------------------------------------------ HTTP


@dataclass
class HttpConfig:
    preset: str = "small"
    requests: int = 192
    concurrency: int = 16
    max_new_tokens: int = 12
    replicas: int = 1
    max_batch: int = 16
    max_wait_s: float = 0.01
    composition: str = "glider"
    port: int = 8765
    workloads: tuple[str, ...] = ("explicit, concurrency 1", "explicit", "retrieval-routed", "composition")
    extra: dict[str, Any] = field(default_factory=dict)


async def _load(url: str, bodies: list[dict[str, Any]], concurrency: int) -> tuple[list[float], list[dict[str, Any]], float]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    results: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(body: dict[str, Any]) -> None:
            async with sem:
                t = time.perf_counter()
                r = await client.post("/v1/generate", json=body)
                lat.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                results.append(r.json()["results"][0])

        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return lat, results, time.perf_counter() - t0


def run_http(cfg: HttpConfig | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Start the app on the zoo, drive each workload over loopback HTTP, stop it."""
    from ray import serve

    from moerge import zoo as zoo_mod
    from moerge.bench.quality import ZOO_ROUTERS
    from moerge.runtime import ensure_ray
    from moerge.serving.app import deploy
    from moerge.serving.workers import composition_spec

    cfg = cfg or HttpConfig()
    z = zoo_mod.load(cfg.preset, progress=progress)
    registry = str(z.registry_path)
    router_cfg = next((c for n, c, _ in ZOO_ROUTERS.values() if n == cfg.composition), {})
    spec = composition_spec(registry, cfg.composition, router_cfg, data=z.expert_data)
    from moerge.composer.compose import CompositionSpec

    ensure_ray()
    t = time.perf_counter()
    dep = deploy(
        registry,
        router="retrieval",
        data=z.expert_data,
        composition=CompositionSpec.model_validate(spec),
        port=cfg.port,
        name="moerge-bench",
        replicas=cfg.replicas,
        max_batch=cfg.max_batch,
        max_wait_s=cfg.max_wait_s,
    )
    startup = time.perf_counter() - t
    tasks = z.held_in
    prompts = [
        (t, e.prompt) for i in range(cfg.requests) for t in [tasks[i % len(tasks)]] for e in [z.test_split(t)[i // len(tasks)]]
    ]
    bodies = {
        "explicit, concurrency 1": (
            [{"prompt": p, "expert": t, "max_new_tokens": cfg.max_new_tokens} for t, p in prompts[:48]],
            1,
        ),
        "explicit": ([{"prompt": p, "expert": t, "max_new_tokens": cfg.max_new_tokens} for t, p in prompts], cfg.concurrency),
        "retrieval-routed": ([{"prompt": p, "max_new_tokens": cfg.max_new_tokens} for _, p in prompts], cfg.concurrency),
        "composition": (
            [{"prompt": p, "model": cfg.composition, "max_new_tokens": cfg.max_new_tokens} for _, p in prompts],
            cfg.concurrency,
        ),
    }
    out = []
    try:
        for name in progress_bar(cfg.workloads, desc="bench serving (HTTP)", progress=progress):
            body, conc = bodies[name]
            asyncio.run(_load(dep.url, body[: min(8, len(body))], conc))  # warm-up: experts loaded
            lat, results, wall = asyncio.run(_load(dep.url, body, conc))
            lat.sort()
            out.append(
                {
                    "workload": name,
                    "requests": len(body),
                    "concurrency": conc,
                    "req_per_s": round(len(body) / wall, 1),
                    "p50_ms": round(1000 * lat[len(lat) // 2], 1),
                    "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1),
                    "mean_batch": round(statistics.mean(r["batch_size"] for r in results), 1),
                    "mean_distinct_experts": round(statistics.mean(r["distinct_experts"] for r in results), 1),
                }
            )
    finally:
        dep.shutdown()
        serve.shutdown()
    base = next((r["req_per_s"] for r in out if r["workload"] == "explicit, concurrency 1"), None)
    for r in out:
        r["vs_concurrency_1"] = round(r["req_per_s"] / base, 2) if base else None
    return {"config": asdict(cfg), "startup_s": round(startup, 1), "rows": out}


def plot_mixed(result: dict[str, Any], path: str) -> str:
    """Throughput relative to a single-expert batch, by distinct experts per batch."""
    from moerge.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for variant, marker in [("moerge", "o"), ("peft adapter_names", "s"), ("peft set_adapter per request", "x")]:
        pts = [(r["k"], r["vs_single"]) for r in result["rows"] if r["variant"] == variant]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, label=variant)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(f"distinct experts in a batch of {result['config']['batch']}")
    ax.set_ylabel("throughput vs single-expert batch")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    return str(save_figure(fig, path))
