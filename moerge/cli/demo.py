"""``moerge demo``: a short tour of moerge on the embedded zoo (:mod:`moerge.bench.tour`)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from moerge.cli.options import DEVICE_OPTION, THREADS_OPTION, _rows, torch_threads
from moerge.cli.root import main
from moerge.runtime import quiet_hf


@main.command()
@click.option(
    "--preset", default="small", show_default=True, type=click.Choice(["small", "default"]),
    help="Zoo preset (small: the tour's minutes; default: the benchmark's zoo).",
)  # fmt: skip
@click.option(
    "--out",
    default="moerge-demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for report.md, results.json and cross_task.png.",
)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write every figure as JSON here.")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Zoo cache folder (env MOERGE_CACHE).")
@click.option("--routers", default=",".join(("PHATGOOSE", "GLIDER", "Arrow", "retrieval")), show_default=True,
              help="Router rows (comma-separated), or 'none'.")  # fmt: skip
@click.option("--merges", default="uniform average,task arithmetic,TIES,DARE-TIES,Twin-Merging", show_default=True,
              help="Merge rows (comma-separated), or 'none'.")  # fmt: skip
@click.option("--retrieval/--no-retrieval", default=True, show_default=True,
              help="RouterRetriever's table on the retrieval suite (retrieval-small with --preset small).")  # fmt: skip
@click.option("--symbolic/--no-symbolic", default=True, show_default=True,
              help="Symbolic-MoE's table on the zoo's whole-model pool.")  # fmt: skip
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
    no_progress: bool,
    device: str,
    threads: int | None,
) -> None:
    """A tour: the zoo's registry, then one table per method family (baselines, routers, merges, RouterRetriever, Symbolic-MoE), each built and scored here.

    Builds are cached (the zoo, its experts, the router artifacts, the suites), and so are the
    evaluator's answers: a second run takes seconds. The full tables, mean ± sd over seeds, are
    `moerge bench all`."""
    quiet_hf()
    from moerge import zoo as zoo_mod
    from moerge.bench import tour as tour_mod
    from moerge.bench.prebuild import maybe_start
    from moerge.bench.quality import ZOO_MERGES, ZOO_ROUTERS
    from moerge.device import auto_threads, resolve_device, set_threads
    from moerge.runtime import default_cache_dir

    try:
        dev = resolve_device(device)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None
    chosen = _rows(routers, ZOO_ROUTERS, "--routers")
    chosen_merges = _rows(merges, ZOO_MERGES, "--merges")
    n_threads = set_threads(threads or auto_threads())
    click.echo(f"      {torch_threads()} torch thread(s) (--threads to choose)", err=True)
    t0 = time.perf_counter()
    suite = ("retrieval-small" if preset == "small" else "retrieval") if retrieval else None
    # the retrieval suite, which does not need the zoo, builds in a second process meanwhile (one thread each)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    bg = maybe_start(cache, suite, None, n_threads)
    if bg is not None:
        click.echo(f"      retrieval suite: building in a second process (1 thread each; log {bg.log})", err=True)
    try:
        click.echo(f"[1/3] zoo preset {preset!r}: base, experts trained and registered (built once, then cached) ...", err=True)
        zoo = zoo_mod.load(preset, cache_dir=cache_dir, progress=None if not no_progress else False)
        click.echo(f"      {zoo.root}", err=True)
        if bg is not None:
            bg.poll()
        step = iter(["[2/3]", "     ", "     "])
        tour = tour_mod.run(
            zoo, chosen, chosen_merges, retrieval=suite, symbolic=symbolic, cache_dir=cache_dir, device=dev,
            progress=None if not no_progress else False, before_retrieval=bg.wait if bg is not None else None,
            echo=lambda msg: click.echo(f"{next(step, '     ')} {msg}", err=True),
        )  # fmt: skip
        tour.report.meta.update(device=str(dev), threads=n_threads, prebuild=bg is not None)
        tour.seconds["total"] = time.perf_counter() - t0
        paths = tour_mod.write(tour, out, json_path)
        click.echo("[3/3] done\n", err=True)
        click.echo(tour.markdown())
        click.echo(f"\n## Cross-task matrix (exact match %)\n\n{tour.report.matrix_markdown()}")
        click.echo(
            f"\nWrote {paths['markdown']}, {paths['json']}, {paths['png']} in {tour.seconds['total']:.0f} s "
            f"({tour.report.meta.get('eval_cache', {}).get('hits') or 0} answers read from the cache).\n"
            "The full tables — every variant, the routing breakdown by token type, the token-routing control, "
            "the speed baselines — with their spread over seeds: `make bench` (moerge bench all)."
        )
    finally:
        if bg is not None:
            bg.stop()
