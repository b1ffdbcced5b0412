"""The ``moerge`` command: the demo, the zoo, and the expert registry."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import click

REGISTRY_OPTION = click.option(
    "--registry",
    "registry_path",
    envvar="MOERGE_REGISTRY",
    default="./experts",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Registry folder (env MOERGE_REGISTRY).",
)


def _quiet_hf() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """moerge: register fine-tuned experts, then merge, route or recruit them at inference time."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# ---------------------------------------------------------------------------- demo / zoo


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
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def demo(preset: str, out: str, json_path: str | None, cache_dir: str | None, no_progress: bool) -> None:
    """Build or load the zoo, evaluate base, every expert on every task and the oracle, print the table."""
    _quiet_hf()
    from moerge import zoo as zoo_mod
    from moerge.bench.quality import evaluate_zoo, write_report

    t0 = time.perf_counter()
    click.echo(f"[1/3] zoo preset {preset!r} (built once, then cached) ...", err=True)
    zoo = zoo_mod.load(preset, cache_dir=cache_dir, progress=not no_progress)
    click.echo(f"      {zoo.root}", err=True)
    click.echo(
        f"[2/3] evaluating base, {len(zoo.held_in)} experts × {len(zoo.held_in) + len(zoo.held_out)} tasks, oracle ...", err=True
    )
    report = evaluate_zoo(zoo, progress=not no_progress)
    report.meta["demo_seconds"] = time.perf_counter() - t0
    paths = write_report(report, out, json_path)
    click.echo("[3/3] done\n", err=True)
    click.echo(report.markdown())
    click.echo("\nCross-task matrix (exact match %):\n")
    click.echo(report.matrix_markdown())
    click.echo(f"\nWrote {paths['markdown']}, {paths['json']}, {paths['png']} in {report.meta['demo_seconds']:.0f} s.")


@main.group()
def zoo() -> None:
    """The embedded default: synthetic tasks, a tiny base model and its experts."""


@zoo.command("build")
@click.option("--preset", default="small", show_default=True, type=click.Choice(["small", "default"]))
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Zoo cache folder (env MOERGE_CACHE).")
@click.option("--rebuild", is_flag=True, help="Rebuild even if cached.")
def zoo_build(preset: str, cache_dir: str | None, rebuild: bool) -> None:
    """Build (or find in the cache) a zoo and print where it is."""
    _quiet_hf()
    from moerge import zoo as zoo_mod

    z = zoo_mod.load(preset, cache_dir=cache_dir, rebuild=rebuild)
    click.echo(
        json.dumps(
            {"root": str(z.root), "registry": str(z.registry_path), "base": str(z.base_path), "timings": z.meta["timings"]},
            indent=2,
        )
    )


@zoo.command("tasks")
def zoo_tasks() -> None:
    """List the suite's tasks with one example each."""
    from moerge.zoo import HELD_IN, HELD_OUT, sample

    for t in (*HELD_IN, *HELD_OUT):
        e = sample(t, 1, seed=0)[0]
        click.echo(f"{t.name:20s} {'held-out' if t.held_out else 'held-in ':8s} {e.prompt} {e.target}")


# ---------------------------------------------------------------------------- registry


@main.group()
def registry() -> None:
    """Add, list, show, remove and export experts."""


def _open(path: str):  # noqa: ANN202
    from moerge.registry import Registry

    return Registry(path)


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


@registry.command("add")
@REGISTRY_OPTION
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("--name", required=True, help="Expert name (a new version if it exists).")
@click.option("--description", default="", help="What the expert does.")
@click.option("--skill", "skills", multiple=True, help="A skill (repeatable).")
@click.option("--tag", "tags", multiple=True, help="A tag (repeatable).")
@click.option("--example", "examples", multiple=True, help="An example input (repeatable).")
@click.option("--metric", "metrics", multiple=True, help="KEY=VALUE (repeatable).")
@click.option(
    "--base", default=None, help="Base model folder or hub id (LoRA: defaults to the adapter's; dense: stores a task vector)."
)
@click.option(
    "--kind", default=None, type=click.Choice(["lora", "dense", "embedding", "model"]), help="Override the detected kind."
)
@click.option("--allow-pickle", is_flag=True, help="Accept pickle .bin weights (read with weights_only=True).")
def registry_add(registry_path, source, name, description, skills, tags, examples, metrics, base, kind, allow_pickle) -> None:  # noqa: ANN001
    """Register SOURCE (a PEFT adapter, HF model or sentence-transformers folder)."""
    _quiet_hf()
    try:
        parsed = {}
        for m in metrics:
            key, sep, value = m.partition("=")
            if not sep:
                raise ValueError(f"--metric {m!r} must be KEY=VALUE")
            parsed[key] = float(value)
        rec = _open(registry_path).register(
            source,
            name,
            description=description,
            skills=skills,
            tags=tags,
            examples=examples,
            metrics=parsed,
            base=base,
            kind=kind,
            allow_pickle=allow_pickle,
        )
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        _fail(exc)
    click.echo(f"registered {rec.ref} ({rec.kind}, {rec.storage})")


@registry.command("list")
@REGISTRY_OPTION
@click.option("--kind", default=None, type=click.Choice(["lora", "dense", "embedding", "model"]))
@click.option("--base", default=None, help="Base model id or config fingerprint.")
@click.option("--skill", default=None)
@click.option("--tag", default=None)
@click.option("--all-versions", is_flag=True, help="Every version, not only the latest.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def registry_list(registry_path, kind, base, skill, tag, all_versions, as_json) -> None:  # noqa: ANN001
    """List experts (latest versions)."""
    records = _open(registry_path).list(kind=kind, base=base, skill=skill, tag=tag, all_versions=all_versions)
    if as_json:
        click.echo(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        return
    if not records:
        click.echo("(no experts)")
        return
    width = max(len(r.ref) for r in records)
    for r in records:
        click.echo(f"{r.ref:<{width}}  {r.kind:9s} {','.join(r.skills)[:30]:30s} {r.description[:60]}")


@registry.command("show")
@REGISTRY_OPTION
@click.argument("name")
@click.option("--version", type=int, default=None)
def registry_show(registry_path, name, version) -> None:  # noqa: ANN001
    """Print one expert's record as JSON."""
    reg = _open(registry_path)
    try:
        rec = reg.get(name, version)
    except KeyError as exc:
        _fail(exc)
    data = rec.model_dump(mode="json")
    data["path"] = str(reg.path(rec))
    data["artifacts"] = reg.list_artifacts(rec)
    click.echo(json.dumps(data, indent=2))


@registry.command("rm")
@REGISTRY_OPTION
@click.argument("name")
@click.option("--version", type=int, default=None, help="Only this version (default: all).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def registry_rm(registry_path, name, version, yes) -> None:  # noqa: ANN001
    """Remove an expert (all versions unless --version)."""
    reg = _open(registry_path)
    what = f"{name}@{version}" if version else f"every version of {name}"
    if not yes and not click.confirm(f"remove {what}?", default=False):
        click.echo("aborted")
        return
    try:
        removed = reg.remove(name, version)
    except KeyError as exc:
        _fail(exc)
    click.echo("removed " + ", ".join(r.ref for r in removed))


@registry.command("export")
@REGISTRY_OPTION
@click.argument("name")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--version", type=int, default=None)
@click.option("--base", default=None, help="Base for a task-vector expert (default: the recorded base).")
def registry_export(registry_path, name, dest, version, base) -> None:  # noqa: ANN001
    """Write NAME back out as a PEFT / HF folder at DEST."""
    _quiet_hf()
    try:
        path = _open(registry_path).export(name, dest, version=version, base=base)
    except (KeyError, FileExistsError, FileNotFoundError, ValueError) as exc:
        _fail(exc)
    click.echo(f"exported to {path}")


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
