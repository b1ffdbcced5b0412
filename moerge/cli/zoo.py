"""``moerge zoo``: build the embedded zoo, list or export its tasks."""

from __future__ import annotations

import json

import click

from moerge.cli.options import _fail
from moerge.cli.root import main
from moerge.runtime import quiet_hf


@main.group()
def zoo() -> None:
    """The embedded default: synthetic tasks, a tiny base model and its experts."""


@zoo.command("build")
@click.option("--preset", default="small", show_default=True, type=click.Choice(["small", "default"]))
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Zoo cache folder (env MOERGE_CACHE).")
@click.option("--rebuild", is_flag=True, help="Rebuild even if cached.")
@click.option(
    "--path", "path_only", is_flag=True, help='Print only the zoo\'s folder (for the shell: "$(moerge zoo build --path)").'
)
def zoo_build(preset: str, cache_dir: str | None, rebuild: bool, path_only: bool) -> None:
    """Build (or find in the cache) a zoo and print where it is."""
    from moerge import zoo as zoo_mod
    from moerge.zoo.build import is_built

    if rebuild or not is_built(preset, cache_dir):  # a built zoo's folder is found without loading transformers
        quiet_hf()
    z = zoo_mod.load(preset, cache_dir=cache_dir, rebuild=rebuild)
    if path_only:
        click.echo(str(z.root))
        return
    click.echo(
        json.dumps(
            {"root": str(z.root), "registry": str(z.registry_path), "base": str(z.base_path), "timings": z.meta["timings"]},
            indent=2,
        )
    )


@zoo.command("tasks")
@click.option(
    "--export",
    "export_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Write the tasks in the task-set format here (moerge eval --tasks).",
)
@click.option(
    "--preset",
    default="small",
    show_default=True,
    type=click.Choice(["small", "default"]),
    help="With --export: the preset's splits.",
)
@click.option("--task", "only", multiple=True, help="With --export: only these tasks (repeatable).")
@click.option("--real", is_flag=True, help="The real-language suite for the real LM (SmolLM2) instead of the synthetic one.")
@click.option("--seed", default=0, show_default=True, help="With --real: the seed of its entity splits.")
def zoo_tasks(export_dir: str | None, preset: str, only: tuple[str, ...], real: bool, seed: int) -> None:
    """List the suite's tasks with one example each (``composed``: the segment compositions,
    kept out of the demo's suite; see ``Preset.segment_share``), or export them. ``--real``: the
    real-language suite built from packaged data (countries, languages, words, numbers, elements)."""
    from moerge.zoo import HELD_IN, HELD_OUT, sample
    from moerge.zoo.tasks import COMPOSED

    if real:
        _real_tasks(export_dir, only, seed)
        return

    if export_dir is not None:
        from moerge.evaluation import load_task_set
        from moerge.zoo.export import export_task_set

        try:
            root = export_task_set(export_dir, preset, list(only) or None)
        except KeyError as exc:
            _fail(exc)
        ts = load_task_set(root)  # what moerge eval will read: checked here
        click.echo(f"wrote {len(ts.held_in)} held-in and {len(ts.held_out)} held-out tasks to {root}")
        return

    for t in (*HELD_IN, *HELD_OUT, *COMPOSED):
        e = sample(t, 1, seed=0)[0]
        kind = "composed" if t in COMPOSED else "held-out" if t.held_out else "held-in"
        click.echo(f"{t.name:20s} {kind:8s} {e.prompt} {e.target}")


def _real_tasks(export_dir: str | None, only: tuple[str, ...], seed: int) -> None:
    from moerge.zoo import real_tasks as R

    if export_dir is None:
        splits = {f: R.split_family(f, seed) for f in {t.family for t in R.TASKS}}
        for t in R.TASKS:
            line = R.examples(t, "test", splits[t.family]["test"][:1], seed)[0]
            click.echo(f"{t.name:20s} {t.role.replace('_', '-'):8s} {line['messages'][0]['content']}  → {line['targets'][0]}")
        return
    from moerge.evaluation import load_task_set

    try:
        root = R.export_real_task_set(export_dir, seed, tasks=list(only) or None)
    except (KeyError, ImportError) as exc:
        _fail(exc)
    ts = load_task_set(root)
    click.echo(
        f"wrote {len(ts.held_in)} held-in and {len(ts.held_out)} held-out real-language tasks to {root} (sources: {root / 'NOTICE'})"
    )
