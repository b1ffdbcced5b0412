"""Options and helpers shared by the command groups: registry/zoo sources, --config files, --set parsing, devices and threads."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

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


def registry_option(help: str = "Registry folder (env MOERGE_REGISTRY).") -> Any:  # noqa: A002 - click's own name
    """``--registry DIR`` (env ``MOERGE_REGISTRY``), optional, with a command's own help."""
    return click.option(
        "--registry", "registry_path", envvar="MOERGE_REGISTRY", default=None, type=click.Path(file_okay=False), help=help
    )


ZOO_REGISTRY_OPTION = registry_option()
ZOO_OPTION = click.option(
    "--zoo",
    "zoo_preset",
    default=None,
    type=click.Choice(["small", "default"]),
    help="Use the embedded zoo instead of a registry (built on first use; its data trains gates if a router needs them).",
)
NO_SOURCE = (
    "no registry given: pass --registry DIR (or set MOERGE_REGISTRY), --composition SPEC, or --zoo small to use the embedded zoo"
)
COMPOSITION_OPTION = click.option(
    "--composition", default=None, type=click.Path(dir_okay=False, exists=True), help="A saved composition (JSON spec)."
)


def _zoo_source(preset: str, router: str | None, config: dict, progress: bool | None = None) -> tuple:
    """The zoo's registry, base path and training data, with ``config`` laid over the demo's
    settings for ``router`` (e.g. GLIDER's α)."""
    from moerge import zoo as zoo_mod
    from moerge.bench.quality import ZOO_ROUTERS

    z = zoo_mod.load(preset, progress=progress)
    zoo_cfg = next((c for n, c, _ in ZOO_ROUTERS.values() if n == router), {}) if router else {}
    return z.registry, str(z.base_path), z.expert_data, {**zoo_cfg, **config}


THREADS_OPTION = click.option(
    "--threads",
    default=None,
    type=click.IntRange(min=1),
    help="torch CPU threads [default in demo: the cores not busy with other work; elsewhere torch's default].",
)
DEVICE_OPTION = click.option(
    "--device", default="auto", show_default=True, help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps."
)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _rows(spec: str, known: dict, option: str) -> list[str]:
    chosen = [] if spec.strip().lower() == "none" else [r.strip() for r in spec.split(",") if r.strip()]
    unknown = [r for r in chosen if r not in known]
    if unknown:
        raise click.BadParameter(f"unknown row(s) {unknown}; choose from {list(known)} or 'none'", param_hint=option)
    return chosen


#: options whose values are paths: relative ones in a --config file are taken from the file's folder
_PATH_OPTIONS = ("registry_path", "composition", "data", "base")


def _config_defaults(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--config FILE`` (eager): a YAML mapping whose keys are the command's own options
    (``max-batch`` or ``max_batch``; ``set`` may be a mapping), laid under the command line —
    flags given there win. Unknown keys are refused with the closest option named."""
    if value is None:
        return None
    import yaml

    from moerge.hints import did_you_mean

    path = Path(value)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--config") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must hold a mapping of option names to values", param_hint="--config")
    by_flag = {}
    for p in ctx.command.params:
        if p.name == param.name:
            continue
        for opt in getattr(p, "opts", []):
            by_flag[opt.lstrip("-").replace("-", "_")] = p.name
    defaults: dict[str, Any] = {}
    for key, v in data.items():
        k = str(key).replace("-", "_")
        if k not in by_flag:
            known = sorted(f.replace("_", "-") for f in by_flag)
            raise click.BadParameter(
                f"{path}: unknown key {key!r}{did_you_mean(str(key).replace('_', '-'), known)}; the keys are the options of "
                f"`moerge {ctx.command.name}`: {', '.join(known)}",
                param_hint="--config",
            )
        name = by_flag[k]
        if name == "settings" and isinstance(v, dict):
            v = [f"{a}={json.dumps(b)}" for a, b in v.items()]
        if name in _PATH_OPTIONS and isinstance(v, str) and not Path(v).expanduser().is_absolute():
            beside = path.parent / v
            v = str(beside) if beside.exists() else v
        defaults[name] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


CONFIG_FILE_OPTION = click.option(
    "--config",
    "config_file",
    default=None,
    is_eager=True,
    expose_value=False,
    callback=_config_defaults,
    type=click.Path(dir_okay=False, exists=True),
    help="A YAML file of this command's options (max-batch: 8, router: retrieval, set: {top_k: 2} …); flags override it.",
)


def _parse_config(items: tuple[str, ...]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _read_data(path: str) -> dict[str, list[tuple[str, str]]]:
    data: dict[str, list[tuple[str, str]]] = {}
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                data.setdefault(row["expert"], []).append((row["prompt"], row["target"]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise click.BadParameter(
                    f"{path}:{n}: each line must be a JSON object with expert, prompt, target ({exc})", param_hint="--data"
                ) from None
    return data


def _device_settings(device: str, dtype: str, threads: int | None) -> None:
    """Check --device/--dtype before any work (a bad one is a usage error) and set --threads."""
    from moerge.device import resolve_device, resolve_dtype, set_threads

    try:
        resolve_dtype(dtype, resolve_device(device))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device/--dtype") from None
    set_threads(threads)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _open(path: str, create: bool = False):  # noqa: ANN202
    """The registry at ``path``; only ``registry add``/``init`` create one (a typo must not)."""
    from moerge.registry import Registry
    from moerge.registry.importers import absolute_path

    if not create and not (Path(path).expanduser() / "index.sqlite").exists():
        _fail(
            FileNotFoundError(
                f"no registry at {absolute_path(path)}; create one with `moerge registry init {path}` "
                f"(or `moerge registry add SOURCE --name NAME --registry {path}`)"
            )
        )
    from moerge.registry.store import RegistryIndexError

    try:
        return Registry(path)
    except (RegistryIndexError, NotADirectoryError) as exc:
        _fail(exc)


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)
