"""Merging benchmarks, each reported as ratios measured in the same run (machines here are noisy):

* ``twin``: Twin-Merging's exact batched dynamic merge (every row its own weights, through the
  multi-expert layer) against the reference code's way — per input, materialise θ_s + Σ w_t v_t
  as dense weights, then run that one input (forward with ``torch.func.functional_call``, as the
  discriminative code does; generate after overwriting the weights in place, as the generative
  server does) — at several batch sizes, on a mid-size tiny Llama with T random rank-r twin
  vectors on 7 projections.
* ``dense``: a TIES merge of N dense models (built and saved by the benchmark, ~``params_m``
  million parameters each) by ``moerge.merge`` (streamed) and by mergekit on the same inputs,
  each in a fresh subprocess: wall time and peak RSS, and the largest difference between the
  two outputs (both use mergekit's semantics, ``flavor="mergekit"``).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moerge.adapters import attach, use_weights
from moerge.bench.routing import BenchConfig, build_model, random_experts


@dataclass
class TwinBenchConfig:
    hidden: int = 512
    layers: int = 4
    tasks: int = 8
    rank: int = 16
    batches: tuple[int, ...] = (16, 64)
    seq: int = 64
    new_tokens: int = 16
    repeats: int = 3
    seed: int = 0
    #: a pretrained model instead of the random Llama (:attr:`moerge.bench.routing.BenchConfig.base`)
    base: str | None = None


@dataclass
class DenseBenchConfig:
    models: int = 8
    params_m: float = 100.0
    density: float = 0.2
    seed: int = 0
    workdir: str | None = None
    keep: bool = False
    #: a pretrained model's folder (or ``.gguf``, or ``"real"``) as the base of the family, instead
    #: of a random Llama of ``params_m`` million parameters
    base: str | None = None


@dataclass
class MergeBenchResult:
    twin: list[dict[str, Any]] = field(default_factory=list)
    dense: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _median_time(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_twin(cfg: TwinBenchConfig, progress: bool | None = None) -> list[dict[str, Any]]:
    """Per batch size, forward (prefill of ``seq`` tokens) and generate (``new_tokens`` greedy
    tokens after ``seq``-token prompts): batched per-row weights vs per input materialise-then-run."""
    from moerge.adapters import layers
    from moerge.routers.twin import materialised_weights, per_sample_forward

    model = build_model(BenchConfig(hidden=cfg.hidden, layers=cfg.layers, seq=cfg.seq, seed=cfg.seed, base=cfg.base))
    attach(model, random_experts(model, cfg.tasks, cfg.rank, cfg.seed))
    wrapped = layers(model)
    dense_twins = {n: torch.einsum("e,eor,eri->eoi", m.scaling, m.lora_B, m.lora_A) for n, m in wrapped.items()}
    g = torch.Generator().manual_seed(cfg.seed)
    gen_kw = dict(max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens, do_sample=False, pad_token_id=0)
    rows = []
    for batch in cfg.batches:
        ids = torch.randint(3, min(2000, model.config.vocab_size), (batch, cfg.seq), generator=g)
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        w = torch.softmax(torch.randn(batch, cfg.tasks, generator=g) * 2, dim=-1)

        def batched_forward(w: torch.Tensor = w, enc: dict = enc) -> torch.Tensor:
            with use_weights(model, w), torch.inference_mode():
                return model(**enc).logits

        def per_sample_fwd(w: torch.Tensor = w, enc: dict = enc) -> torch.Tensor:
            return per_sample_forward(model, enc, w)

        def batched_generate(w: torch.Tensor = w, enc: dict = enc) -> torch.Tensor:
            with use_weights(model, w), torch.inference_mode():
                return model.generate(**enc, **gen_kw)

        def per_sample_generate(w: torch.Tensor = w, enc: dict = enc) -> torch.Tensor:
            """The reference generative server's way: per request, overwrite the weights in place
            with that request's merge, then generate for it alone."""
            saved = {n: m.base.weight.detach().clone() for n, m in wrapped.items()}
            outs = []
            try:
                with use_weights(model, None), torch.inference_mode():
                    for b in range(w.shape[0]):
                        for key, value in materialised_weights(model, w[b]).items():
                            wrapped[key.removesuffix(".base.weight")].base.weight.copy_(value)
                        outs.append(model.generate(**{k: v[b : b + 1] for k, v in enc.items()}, **gen_kw))
                        for n, m in wrapped.items():
                            m.base.weight.copy_(saved[n])
            finally:
                for n, m in wrapped.items():
                    m.base.weight.data.copy_(saved[n])
            return torch.cat(outs)

        def per_sample_dense_fwd(w: torch.Tensor = w, enc: dict = enc) -> torch.Tensor:
            """As the official discriminative code: twin vectors kept as dense matrices, each
            input's weights θ_s + Σ_t w_t·V_t summed densely, then ``functional_call``."""
            outs = []
            with use_weights(model, None), torch.inference_mode():
                for b in range(w.shape[0]):
                    params = {
                        f"{n}.base.weight": m.base.weight + torch.einsum("e,eoi->oi", w[b], dense_twins[n])
                        for n, m in wrapped.items()
                    }
                    row = {k: v[b : b + 1] for k, v in enc.items()}
                    outs.append(torch.func.functional_call(model, params, args=(), kwargs=row).logits)
            return torch.cat(outs)

        fwd_diff = float((batched_forward() - per_sample_fwd()).abs().max())
        fwd_diff = max(fwd_diff, float((batched_forward() - per_sample_dense_fwd()).abs().max()))
        same_tokens = bool(torch.equal(batched_generate(), per_sample_generate()))
        runs = (
            ("forward", "low-rank twin vectors", batched_forward, per_sample_fwd),
            ("forward", "dense twin vectors (official code)", batched_forward, per_sample_dense_fwd),
            ("generate", "low-rank twin vectors", batched_generate, per_sample_generate),
        )
        for mode, reference, fast, slow in runs:
            tb, tp = [], []
            for _ in range(cfg.repeats):  # interleaved, median of each
                tb.append(_median_time(fast, 1))
                tp.append(_median_time(slow, 1))
            b, p = statistics.median(tb), statistics.median(tp)
            rows.append(
                {
                    "mode": mode,
                    "reference": reference,
                    "batch": batch,
                    "batched_s": b,
                    "per_sample_s": p,
                    "speedup": p / b,
                    "max_abs_logit_diff": fwd_diff,
                    "same_generated_tokens": same_tokens,
                }
            )
            if progress is not False:
                print(
                    f"twin {mode} ({reference}) batch {batch}: batched {b:.3f}s, per-sample {p:.3f}s, {p / b:.1f}×",
                    file=sys.stderr,
                )
    return rows


# ------------------------------------------------------------------------ dense TIES


def _llama_config(params_m: float) -> Any:
    """A Llama config of about ``params_m`` million parameters (hidden 768, vocab 16k, layers to
    fit; below 50 M a narrower model, so tests can run the benchmark in seconds)."""
    from transformers import LlamaConfig

    hidden, inter, vocab = (768, 2048, 16000) if params_m >= 50 else (128, 256, 1000)
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params_m * 1e6 - 2 * vocab * hidden) / per_layer))
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        tie_word_embeddings=False,
    )


def build_dense_family(root: Path, cfg: DenseBenchConfig, progress: bool | None = None) -> tuple[Path, list[Path], int]:
    """Save a random base (or take ``cfg.base``'s folder) and ``cfg.models`` perturbed copies
    (θ_0 + 0.01·noise, of the tensors the base's folder stores) under ``root``."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    if cfg.base:
        from moerge.registry.gguf import local_base

        if cfg.base == "real":
            from moerge.zoo.real import base_folder

            folder = Path(base_folder())
        else:
            folder = Path(str(local_base(cfg.base)))
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            raise RuntimeError(f"--base {cfg.base!r}: no .safetensors weights in {folder}")
        state = {k: v for f in shards for k, v in load_file(f).items()}
        n_params = sum(v.numel() for v in state.values())
        shutil.copytree(folder, root / "base", ignore=shutil.ignore_patterns(".lock", "*.json.tmp"))
    else:
        base = LlamaForCausalLM(_llama_config(cfg.params_m))
        n_params = sum(p.numel() for p in base.parameters())
        base.save_pretrained(root / "base")
        state = {k: v.detach().contiguous() for k, v in base.state_dict().items()}
    experts = []
    for i in range(cfg.models):
        g = torch.Generator().manual_seed(cfg.seed * 1000 + i + 1)
        folder = root / f"expert{i}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / "base" / "config.json", folder / "config.json")
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}, folder / "model.safetensors")
        experts.append(folder)
        if progress is not False:
            print(f"built expert {i + 1}/{cfg.models}", file=sys.stderr)
    return root / "base", experts, n_params


#: the child's own peak RSS in MB: Linux's VmHWM belongs to the process's memory map, which exec
#: starts afresh; getrusage's ru_maxrss would carry the parent's peak at fork into the child (measured:
#: both tools "peaked" at the benchmark process's 6 GB), so it is only the fallback elsewhere
_PEAK = """
def peak_mb():
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

_OURS = (
    _PEAK
    + """
import json, sys, time
import moerge
a = json.loads(sys.argv[1])
base_rss = peak_mb()
t0 = time.perf_counter()
moerge.merge(a["base"], a["experts"], "ties", a["out"], density=a["density"], flavor="mergekit")
peak = peak_mb()
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": peak, "import_rss_mb": base_rss, "merge_rss_mb": peak - base_rss}))
"""
)

_MERGEKIT = (
    _PEAK
    + """
import json, sys, time
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
a = json.loads(sys.argv[1])
base_rss = peak_mb()
cfg = {"merge_method": "ties", "base_model": a["base"], "dtype": "float32",
       "models": [{"model": e, "parameters": {"weight": 1.0, "density": a["density"]}} for e in a["experts"]]}
t0 = time.perf_counter()
run_merge(MergeConfiguration.model_validate(cfg), a["out"], MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
peak = peak_mb()
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": peak, "import_rss_mb": base_rss, "merge_rss_mb": peak - base_rss}))
"""
)


def _run(script: str, args: dict[str, Any]) -> dict[str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    res = subprocess.run([sys.executable, "-c", script, json.dumps(args)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _max_diff(a: Path, b: Path) -> float:
    from moerge.registry.files import TensorFolder

    x, y = TensorFolder(a), TensorFolder(b)
    if set(x.keys()) != set(y.keys()):
        raise RuntimeError(f"the two merges wrote different tensors: {sorted(set(x.keys()) ^ set(y.keys()))[:5]}")
    return max(float((x.get(k).float() - y.get(k).float()).abs().max()) for k in x.keys())


def bench_dense(cfg: DenseBenchConfig, progress: bool | None = None) -> dict[str, Any]:
    try:
        import mergekit  # noqa: F401
    except ImportError:
        raise RuntimeError("the dense benchmark compares with mergekit: pip install mergekit") from None
    root = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="moerge-bench-merge-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        base, experts, n_params = build_dense_family(root, cfg, progress)
        build_s = time.perf_counter() - t0
        args = {"base": str(base), "experts": [str(e) for e in experts], "density": cfg.density}
        # mergekit first, then ours (page cache equally warm for the second: run ours twice, keep the second)
        mk = _run(_MERGEKIT, {**args, "out": str(root / "mergekit-out")})
        ours = _run(_OURS, {**args, "out": str(root / "moerge-out")})
        shutil.rmtree(root / "moerge-out")
        ours = _run(_OURS, {**args, "out": str(root / "moerge-out")})
        diff = _max_diff(root / "moerge-out", root / "mergekit-out")
        model_mb = n_params * 4 / 2**20
        return {
            "models": cfg.models,
            "params_per_model_m": n_params / 1e6,
            "model_mb": model_mb,
            "density": cfg.density,
            "build_s": build_s,
            "moerge": ours,
            "mergekit": mk,
            "time_ratio": ours["seconds"] / mk["seconds"],
            "rss_ratio": ours["peak_rss_mb"] / mk["peak_rss_mb"],
            # on tiny models the imports can be the peak: no merge RSS to compare
            "merge_rss_ratio": ours["merge_rss_mb"] / mk["merge_rss_mb"] if mk["merge_rss_mb"] > 0 else float("nan"),
            "moerge_rss_in_models": ours["merge_rss_mb"] / model_mb,
            "mergekit_rss_in_models": mk["merge_rss_mb"] / model_mb,
            "max_abs_diff": diff,
        }
    finally:
        if not cfg.keep and not cfg.workdir:
            shutil.rmtree(root, ignore_errors=True)


def markdown(result: MergeBenchResult) -> str:
    lines = []
    if result.twin:
        lines += [
            "| run | per-sample reference | batch | batched dynamic merge (s) | per-sample materialise, then run (s) "
            "| speed-up | max logit diff | same tokens |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        lines += [
            f"| {r['mode']} | {r['reference']} | {r['batch']} | {r['batched_s']:.3f} | {r['per_sample_s']:.3f} | {r['speedup']:.1f}× "
            f"| {r['max_abs_logit_diff']:.1e} | {'yes' if r['same_generated_tokens'] else 'no'} |"
            for r in result.twin
        ]
    d = result.dense
    if d:
        lines += [
            "",
            f"Dense TIES (density {d['density']}) of {d['models']} models × {d['params_per_model_m']:.0f} M parameters "
            f"({d['model_mb']:.0f} MB each, fp32):",
            "",
            "| tool | wall (s) | peak RSS (MB) | of which after imports (MB) | that in models |",
            "|---|---:|---:|---:|---:|",
            f"| moerge | {d['moerge']['seconds']:.1f} | {d['moerge']['peak_rss_mb']:.0f} | {d['moerge']['merge_rss_mb']:.0f} "
            f"| {d['moerge_rss_in_models']:.2f} |",
            f"| mergekit | {d['mergekit']['seconds']:.1f} | {d['mergekit']['peak_rss_mb']:.0f} | {d['mergekit']['merge_rss_mb']:.0f} "
            f"| {d['mergekit_rss_in_models']:.2f} |",
            f"| ratio moerge / mergekit | {d['time_ratio']:.2f} | {d['rss_ratio']:.2f} | {d['merge_rss_ratio']:.2f} | |",
            "",
            f"Largest difference between the two outputs: {d['max_abs_diff']:.1e}.",
        ]
    return "\n".join(lines)
