"""``moerge registry``: add, tag, list, show, verify, remove and export experts."""

from __future__ import annotations

import json
import os
import sys

import click

from moerge.cli.options import REGISTRY_OPTION, _fail, _open
from moerge.cli.root import main
from moerge.runtime import quiet_hf


@main.group()
def registry() -> None:
    """Add, list, show, remove and export experts."""


@registry.command("init")
@click.argument("path", type=click.Path(file_okay=False))
def registry_init(path: str) -> None:
    """Create an empty registry at PATH (an existing one is left as it is)."""
    try:
        reg = _open(path, create=True)
    except (OSError, ValueError) as exc:
        _fail(exc)
    click.echo(f"registry at {reg.root} ({len(reg.list(all_versions=True))} expert versions)")


@registry.command("add")
@REGISTRY_OPTION
@click.argument("source")
@click.option("--name", required=True, help="Expert name (a new version if it exists).")
@click.option("--description", default="", help="What the expert does.")
@click.option("--skill", "skills", multiple=True, help="A skill (repeatable).")
@click.option("--tag", "tags", multiple=True, help="A tag (repeatable).")
@click.option("--example", "examples", multiple=True, help="An example input (repeatable).")
@click.option("--task", "tasks", multiple=True, help="A task-set task it was trained on (repeatable; moerge eval's oracle).")
@click.option("--metric", "metrics", multiple=True, help="KEY=VALUE (repeatable).")
@click.option(
    "--base", default=None, help="Base model folder or hub id (LoRA: defaults to the adapter's; dense: stores a task vector)."
)
@click.option(
    "--kind", default=None, type=click.Choice(["lora", "dense", "embedding", "model"]), help="Override the detected kind."
)
@click.option("--allow-pickle", is_flag=True, help="Accept pickle .bin weights (read with weights_only=True).")
@click.option("--reference", is_flag=True, help="--kind model: keep the model where it is (folder or hub id), do not copy it.")
def registry_add(
    registry_path, source, name, description, skills, tags, examples, tasks, metrics, base, kind, allow_pickle, reference
) -> None:  # noqa: ANN001
    """Register SOURCE (a PEFT adapter, HF model or sentence-transformers folder, or a hub id org/name)."""
    quiet_hf()
    try:
        parsed = {}
        for m in metrics:
            key, sep, value = m.partition("=")
            if not sep:
                raise ValueError(f"--metric {m!r} must be KEY=VALUE")
            parsed[key] = float(value)
        rec = _open(registry_path, create=True).register(
            source,
            name,
            description=description,
            skills=skills,
            tags=tags,
            examples=examples,
            tasks=tasks,
            metrics=parsed,
            base=base,
            kind=kind,
            allow_pickle=allow_pickle,
            reference=reference,
        )
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, TimeoutError) as exc:
        _fail(exc)
    click.echo(f"registered {rec.ref} ({rec.kind}, {rec.storage})")


@registry.command("tag")
@REGISTRY_OPTION
@click.argument("name")
@click.option("--task", "tasks", multiple=True, required=True, help="A task-set task the expert was trained on (repeatable).")
@click.option("--version", default=None, type=int, help="The version to tag [default: the latest].")
@click.option(
    "--mode",
    default="set",
    show_default=True,
    type=click.Choice(["set", "add", "remove"]),
    help="Replace, add to or remove from its tasks.",
)
def registry_tag(registry_path, name, tasks, version, mode) -> None:  # noqa: ANN001
    """Say which task-set tasks expert NAME was trained on (metadata only: no new version)."""
    try:
        rec = _open(registry_path).tag(name, tasks, version, mode=mode)
    except (ValueError, KeyError, RuntimeError, TimeoutError) as exc:
        _fail(exc)
    click.echo(f"{rec.ref}: tasks {', '.join(rec.tasks) or 'none'}")


@registry.command("verify")
@REGISTRY_OPTION
@click.option("--repair", is_flag=True, help="Remove unlisted version folders and dead processes' staging folders.")
@click.option("--json", "as_json", is_flag=True)
def registry_verify(registry_path, repair, as_json) -> None:  # noqa: ANN001
    """Check every record, file hash and artifact against the disk; exit 1 if anything is wrong."""
    report = _open(registry_path).verify(repair=repair)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for line in report["repaired"]:
            click.echo(f"repaired: {line}")
        for p in report["problems"]:
            click.echo(f"{p['kind']}: {p['ref']} {p['detail']}".replace("  ", " "))
        click.echo(
            f"{report['checked']} version(s) checked: " + ("ok" if report["ok"] else f"{len(report['problems'])} problem(s)")
        )
    if not report["ok"]:
        sys.exit(1)


@registry.command("rebuild-index")
@REGISTRY_OPTION
def registry_rebuild_index(registry_path) -> None:  # noqa: ANN001
    """Recreate the index from the record files on disk (the old one is kept beside it)."""
    from moerge.registry import Registry

    try:
        report = Registry.rebuild_index(registry_path)
    except (FileNotFoundError, OSError) as exc:
        _fail(exc)
    click.echo(
        f"indexed {report['experts']} version(s), {report['artifacts']} artifact(s), "
        f"{report['group_artifacts']} group artifact(s)"
        + (f"; the old index is at {report['old_index']}" if report["old_index"] else "")
    )
    for line in report["skipped"]:
        click.echo(f"skipped {line}", err=True)


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
    quiet_hf()
    try:
        path = _open(registry_path).export(name, dest, version=version, base=base)
    except (KeyError, FileExistsError, FileNotFoundError, ValueError) as exc:
        _fail(exc)
    click.echo(f"exported to {path}")


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
