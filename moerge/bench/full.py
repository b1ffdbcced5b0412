"""``moerge bench all``: every quality table of the embedded suites, for one seed per call of
:func:`run_seed` — the zoo (base and experts), the routers' and merges' own seeds, the retrieval
suite's query LoRAs, the control suite and the Symbolic-MoE pool all built with that seed — so
that :mod:`moerge.bench.spread` can report each figure as mean ± sd over independent builds.

Seed 0 is the presets as they are (the same cache folders as the tour's); another seed is another
build, cached apart (its preset's key changes with the seed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from moerge.bench.quality import QualityReport


@dataclass(frozen=True)
class SeededPresets:
    """The four suites' presets for one seed."""

    seed: int
    zoo: Any
    retrieval: Any
    control: Any
    symbolic: Any


def seeded_presets(preset: str, seed: int) -> SeededPresets:
    """``preset`` (``small`` or ``default``) and its side suites with every build seed set to ``seed``."""
    from moerge.zoo.build import PRESETS
    from moerge.zoo.control import CONTROL_PRESETS
    from moerge.zoo.retrieval import RETRIEVAL_PRESETS
    from moerge.zoo.symbolic import SYMBOLIC_PRESETS

    if preset not in PRESETS:
        raise KeyError(f"unknown zoo preset {preset!r}; choose one of {sorted(PRESETS)}")
    small = preset == "small"
    r = RETRIEVAL_PRESETS["retrieval-small" if small else "retrieval"]
    return SeededPresets(
        seed=seed,
        zoo=replace(PRESETS[preset], seed=seed),
        retrieval=replace(r, lora=replace(r.lora, seed=seed)),
        control=replace(CONTROL_PRESETS["control-small" if small else "control"], seed=seed),
        symbolic=replace(SYMBOLIC_PRESETS["small" if small else "default"], seed=seed),
    )


def run_seed(
    presets: SeededPresets,
    routers: Sequence[str],
    merges: Sequence[str],
    retrieval: bool = True,
    symbolic: bool = True,
    control: bool = True,
    cache_dir: str | Path | None = None,
    device: Any = "cpu",
    threads: int = 1,
    progress: bool | None = None,
    echo: Callable[[str], None] | None = None,
) -> QualityReport:
    """Every table for one seed. With ≥ 2 threads and a retrieval suite not yet built, the suite
    builds in a second process meanwhile (one thread each; :mod:`moerge.bench.prebuild`)."""
    from moerge import zoo as zoo_mod
    from moerge.bench.prebuild import maybe_start
    from moerge.bench.quality import evaluate_zoo
    from moerge.runtime import default_cache_dir

    say = echo or (lambda _msg: None)
    seed = presets.seed
    t0 = time.perf_counter()
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    bg = maybe_start(cache, presets.retrieval if retrieval else None, None, threads)
    if bg is not None:
        say(f"seed {seed}: retrieval suite building in a second process (1 thread each; log {bg.log})")
    try:
        say(f"seed {seed}: zoo preset {presets.zoo.name!r} (built once per seed, then cached) ...")
        zoo = zoo_mod.load(presets.zoo, cache_dir=cache_dir, progress=progress)
        if bg is not None:
            bg.poll()
        say(
            f"seed {seed}: base, experts, oracle, routers ({', '.join(routers) or 'none'}), merges ({', '.join(merges) or 'none'}) ..."
        )
        report = evaluate_zoo(zoo, routers, merges, progress=progress, device=device, cache_dir=zoo.root / "eval-cache",
                              seed=seed)  # fmt: skip
        report.meta.update(seed=seed, device=str(device), threads=threads, prebuild=bg is not None)
        if symbolic:
            from moerge.bench import symbolic as symbolic_bench
            from moerge.zoo.symbolic import load_pool

            say(f"seed {seed}: Symbolic-MoE (the whole-model pool built once per seed, cached) ...")
            t = time.perf_counter()
            pool = load_pool(zoo, presets.symbolic, progress=progress)
            report.symbolic = symbolic_bench.evaluate(zoo, pool=pool, per_query=False, progress=progress, seed=seed)
            report.meta["symbolic_seconds"] = time.perf_counter() - t
            if bg is not None:
                bg.poll()
        if control:
            from moerge.bench import control as control_bench
            from moerge.zoo.control import load_control

            say(f"seed {seed}: token-routing control (disjoint-vocabulary experts, built once per seed) ...")
            t = time.perf_counter()
            suite = load_control(presets.control, cache_dir=cache_dir, progress=progress)
            report.token_control = control_bench.evaluate(suite, progress=progress, device=str(device), seed=seed)
            report.meta["control_seconds"] = time.perf_counter() - t
        if retrieval:
            from moerge.bench import retrieval as retrieval_bench
            from moerge.zoo.retrieval import load_suite

            if bg is not None:
                t = time.perf_counter()
                bg.wait()
                report.meta["prebuild_wait_seconds"] = time.perf_counter() - t
            say(f"seed {seed}: RouterRetriever on the retrieval suite {presets.retrieval.name!r} ...")
            t = time.perf_counter()
            suite = load_suite(presets.retrieval, cache_dir=cache_dir, progress=progress)
            report.retrieval = retrieval_bench.run(presets.retrieval.name, cache_dir=cache_dir, progress=progress, suite=suite)
            report.meta["retrieval_seconds"] = time.perf_counter() - t
    finally:
        if bg is not None:
            bg.stop()
    report.meta["seconds"] = time.perf_counter() - t0
    return report
