"""``moerge demo``: the embedded zoo end to end."""

from __future__ import annotations

import time
from pathlib import Path

import click

from moerge.cli.options import DEVICE_OPTION, THREADS_OPTION, _rows, torch_threads
from moerge.cli.root import main
from moerge.runtime import quiet_hf


@main.command()
@click.option("--preset", default="default", show_default=True, type=click.Choice(["small", "default"]), help="Zoo preset.")
@click.option(
    "--out",
    default="moerge-demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for report.md, results.json and cross_task.png.",
)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write every figure as JSON here.")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Zoo cache folder (env MOERGE_CACHE).")
@click.option(
    "--routers",
    default="PHATGOOSE,GLIDER,GLIDER (templates shared),Arrow,retrieval",
    show_default=True,
    help="Router rows to add (comma-separated), or 'none'.",
)
@click.option(
    "--merges",
    default="uniform average,task arithmetic,TIES,DARE-TIES,Twin-Merging",
    show_default=True,
    help="Merge rows to add (comma-separated), or 'none'.",
)
@click.option(
    "--retrieval/--no-retrieval",
    default=True,
    show_default=True,
    help="Also RouterRetriever's table on the retrieval suite (preset small: the reduced suite).",
)
@click.option(
    "--symbolic/--no-symbolic",
    default=True,
    show_default=True,
    help="Also Symbolic-MoE's table on the zoo's whole-model pool (its group models and aggregator trained once, cached).",
)
@click.option(
    "--control/--no-control",
    default=True,
    show_default=True,
    help="Also the positive control for token routing (disjoint-vocabulary experts; built once, cached).",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@DEVICE_OPTION
@THREADS_OPTION
def demo(
    preset: str,
    out: str,
    json_path: str | None,
    cache_dir: str | None,
    routers: str,
    merges: str,
    retrieval: bool,
    symbolic: bool,
    control: bool,
    no_progress: bool,
    device: str,
    threads: int | None,
) -> None:
    """Build or load the zoo, evaluate base, every expert on every task, the oracle, the routers and the merges; print the table.

    The zoo is built on the CPU (the reference weights); evaluation, router preparation and
    merges run on --device in float32."""
    quiet_hf()
    from moerge.device import auto_threads, resolve_device, set_threads

    try:
        dev = resolve_device(device)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None
    n_threads = set_threads(threads or auto_threads())
    click.echo(f"      {torch_threads()} torch thread(s) (--threads to choose)", err=True)
    from moerge import zoo as zoo_mod
    from moerge.bench.prebuild import maybe_start
    from moerge.bench.quality import ZOO_MERGES, ZOO_ROUTERS, evaluate_zoo, write_report
    from moerge.zoo.build import default_cache_dir

    chosen = _rows(routers, ZOO_ROUTERS, "--routers")
    chosen_merges = _rows(merges, ZOO_MERGES, "--merges")
    t0 = time.perf_counter()
    suite_preset = "retrieval-small" if preset == "small" else "retrieval"
    control_preset = "control-small" if preset == "small" else "control"
    # the retrieval suite (and its scores), which does not need the zoo, builds in a second
    # process meanwhile, one thread each; it is the longest part, so the control suite stays here
    bg = maybe_start(
        Path(cache_dir).expanduser() if cache_dir else default_cache_dir(), suite_preset if retrieval else None, None, n_threads
    )
    if bg is not None:
        click.echo(f"      retrieval suite: building in a second process (1 thread each; log {bg.log})", err=True)

    def poll() -> None:  # the prebuild gives its thread back once it has ended
        if bg is not None:
            bg.poll()

    try:
        click.echo(f"[1/4] zoo preset {preset!r} (built once, then cached) ...", err=True)
        zoo = zoo_mod.load(preset, cache_dir=cache_dir, progress=None if not no_progress else False)
        click.echo(f"      {zoo.root}", err=True)
        poll()
        click.echo(
            f"[2/4] evaluating base, {len(zoo.held_in)} experts × {len(zoo.held_in) + len(zoo.held_out)} tasks, oracle ...",
            err=True,
        )
        click.echo(
            f"[3/4] routers: {', '.join(chosen) or 'none'} (per-expert artifacts prepared once, cached); merges: "
            f"{', '.join(chosen_merges) or 'none'} (hyper-parameters chosen on the validation split) — through moerge.evaluate ...",
            err=True,
        )
        report = evaluate_zoo(zoo, chosen, chosen_merges, progress=None if not no_progress else False, device=dev)
        report.meta["device"], report.meta["threads"] = str(dev), n_threads
        report.meta["prebuild"] = bg is not None
        poll()
        if symbolic:
            from moerge.bench import symbolic as symbolic_bench

            click.echo(
                "      Symbolic-MoE: whole-model pool (group models and aggregator trained once, cached), profiles, "
                "recruiting, batch-by-model run ...",
                err=True,
            )
            t_s = time.perf_counter()
            report.symbolic = symbolic_bench.evaluate(zoo, progress=None if not no_progress else False)
            report.meta["symbolic_seconds"] = time.perf_counter() - t_s
        if control:
            from moerge.bench import control as control_bench
            from moerge.zoo.control import load_control

            click.echo(
                "      token-routing control: disjoint-vocabulary experts (built once, cached), merges, routers, oracles ...",
                err=True,
            )
            t_c = time.perf_counter()
            poll()
            suite = load_control(control_preset, cache_dir=cache_dir, progress=None if not no_progress else False)
            report.token_control = control_bench.evaluate(suite, progress=None if not no_progress else False, device=str(dev))
            report.meta["control_seconds"] = time.perf_counter() - t_c
        if retrieval:
            from moerge.bench import retrieval as retrieval_bench

            if bg is not None:
                t_w = time.perf_counter()
                bg.wait()
                report.meta["prebuild_wait_seconds"] = time.perf_counter() - t_w
            click.echo(
                f"      retrieval suite {suite_preset!r} (6 domains' LoRAs trained once, cached): base, experts, routers, oracles ...",
                err=True,
            )
            t_r = time.perf_counter()
            report.retrieval = retrieval_bench.run(suite_preset, cache_dir=cache_dir, progress=None if not no_progress else False)
            report.meta["retrieval_seconds"] = time.perf_counter() - t_r
        report.meta["demo_seconds"] = time.perf_counter() - t0
        paths = write_report(report, out, json_path)
        click.echo("[4/4] done\n", err=True)
        click.echo(report.markdown())
        click.echo("\nCross-task matrix (exact match %):\n")
        click.echo(report.matrix_markdown())
        if report.retrieval is not None:
            click.echo("\nRetrieval — RouterRetriever's Table 1 (nDCG@10 on each domain's test queries, trec_eval):\n")
            click.echo(retrieval_bench.markdown(report.retrieval))
        if report.token_control is not None:
            click.echo(
                "\nToken routing, positive control (disjoint-vocabulary experts; segments right on mixed held-out prompts):\n"
            )
            click.echo(control_bench.markdown(report.token_control))
        if report.symbolic is not None:
            click.echo("\nSymbolic-MoE on the zoo's whole-model pool (accuracy %, exact match, per task group):\n")
            click.echo(symbolic_bench.markdown(report.symbolic))
        click.echo(f"\nWrote {paths['markdown']}, {paths['json']}, {paths['png']} in {report.meta['demo_seconds']:.0f} s.")
    finally:
        if bg is not None:
            bg.stop()
