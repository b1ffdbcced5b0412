"""``moerge merge``: static merges of registered experts, from flags or a mergekit YAML."""

from __future__ import annotations

import json
from pathlib import Path

import click

from moerge.cli.options import _fail, _open, registry_option
from moerge.cli.root import main
from moerge.runtime import quiet_hf


@main.command("merge")
@click.option(
    "--method",
    default="ties",
    show_default=True,
    help="average, task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune, svd; mergekit's breadcrumbs, "
    "breadcrumbs_ties, della, della_linear, sce, slerp, nearswap, model_stock, nuslerp, multislerp, karcher, arcee_fusion, "
    "ram, ramplus_tl, cat; lorahub (weights searched on --examples).",
)
@click.option("--experts", default=None, help="Comma-separated registry names or PEFT-adapter / model folders.")
@click.option(
    "--config",
    "config_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="A mergekit YAML (merge_method, base_model, models, parameters, dtype) instead of --method/--experts/--weights.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (must not exist or be empty).")
@registry_option("Registry holding the named experts (env MOERGE_REGISTRY).")
@click.option("--base", default=None, help="Base model folder or hub id (default: the experts' registered base).")
@click.option("--weights", default=None, help="Comma-separated weight per expert, in --experts order.")
@click.option("--density", default=None, type=float, help="Fraction kept (ties, dare_*, magnitude_prune).")
@click.option("--lambda", "lambda_", default=None, type=float, help="Scale of the merged task vector.")
@click.option("--majority-sign-method", default=None, type=click.Choice(["total", "frequency"]), help="TIES sign election.")
@click.option("--seed", default=None, type=int, help="DARE mask seed.")
@click.option(
    "--flavor", default=None, type=click.Choice(["peft", "mergekit"]), help="Whose semantics where PEFT and mergekit differ."
)
@click.option(
    "--rank",
    default=None,
    help="Rank of a LoRA output (default: the largest input rank), or 'auto': per module the smallest within --rank-tolerance.",
)
@click.option(
    "--rank-tolerance", default=1e-2, show_default=True, type=float, help="--rank auto: the largest relative re-factoring error."
)
@click.option(
    "--output", default=None, type=click.Choice(["lora", "model"]), help="LoRA experts: a LoRA (default) or a merged model."
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="NAME=VALUE",
    help="Any other parameter of the method (repeatable): gamma, epsilon (breadcrumbs, della), select_topk (sce), "
    "t (slerp, nearswap), filter_wise (model_stock), flatten and row_wise (nuslerp), normalize_weights (multislerp) …",
)
@click.option(
    "--examples",
    "examples_path",
    default=None,
    type=click.Path(dir_okay=False, exists=True),
    help='lorahub: a JSONL of the new task\'s examples ({"prompt": ..., "target": ...} per line, as a task split).',
)
@click.option(
    "--tokenizer-source",
    default=None,
    help="Dense experts of different vocabularies: the output's tokenizer — base, union or a model folder (as mergekit's).",
)
@click.option("--no-progress", is_flag=True)
def merge_cmd(
    method,
    experts,
    config_path,
    out,
    registry_path,
    base,
    weights,
    density,
    lambda_,
    majority_sign_method,
    seed,
    flavor,
    rank,
    rank_tolerance,
    output,
    settings,
    examples_path,
    tokenizer_source,
    no_progress,
) -> None:  # noqa: ANN001
    """Merge experts into one LoRA or one model with a static merge method, written to --out."""
    quiet_hf()
    import warnings

    import moerge
    from moerge.evaluation.methods import parse_value
    from moerge.registry.importers import MoergeWarning

    params = {"density": density, "lambda": lambda_, "majority_sign_method": majority_sign_method, "seed": seed, "flavor": flavor}
    for item in settings:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            _fail(ValueError(f"--set takes NAME=VALUE, got {item!r}"))
        params[name.strip().replace("-", "_")] = parse_value(value.strip())
    if config_path is not None:
        flags = {"density": density, "lambda": lambda_, "majority_sign_method": majority_sign_method, "seed": seed}
        flags.update({"flavor": flavor, "experts": experts, "weights": weights, "base": base, "set": settings,
                      "tokenizer_source": tokenizer_source})  # fmt: skip
        given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v]
        if given:
            _fail(ValueError(f"--config gives the method, models and parameters; drop {', '.join(given)}"))
    elif not experts:
        _fail(ValueError("give --experts (with --method) or --config merge.yml"))
    if (method == "lorahub") != (examples_path is not None):
        _fail(ValueError("--examples goes with --method lorahub (its weights are searched on them), and lorahub needs it"))
    if method == "lorahub":
        _lorahub(experts, out, registry_path, base, params, rank, output, examples_path, no_progress)
        return
    try:
        reg = _open(registry_path) if registry_path else None
        if config_path is not None:
            from moerge.composer.mergekit import load_merge_config, plan_merge

            plan = plan_merge(load_merge_config(Path(config_path)))
            if plan["method"] == "passthrough":
                from moerge.composer.mergekit import run_passthrough

                path = run_passthrough(plan, out, progress=None if not no_progress else False)
                click.echo(f"stacked {len(plan['slices'])} slices with passthrough into {path}")
                return
            if plan["method"] == "sliced":
                from moerge.composer.slices import merge_slices

                path = merge_slices(plan, out, progress=None if not no_progress else False)
                click.echo(f"merged {len(plan['slices'])} slices layer by layer with {plan['kernel']} into {path}")
                return
            base, names, method, w = plan["base"], plan["experts"], plan["method"], plan["weights"]
            params, dtype, tokenizer_source = plan["params"], plan["dtype"], plan.get("tokenizer_source")
        else:
            names = [e.strip() for e in experts.split(",") if e.strip()]
            dtype = None
            w = [float(x) for x in weights.split(",")] if weights else None
        if rank is not None and rank != "auto":
            if not rank.isdigit():
                raise ValueError(f"--rank must be a positive integer or 'auto', got {rank!r}")
            rank = int(rank)
        with warnings.catch_warnings():  # the re-factoring error is printed below
            warnings.simplefilter("ignore", MoergeWarning)
            path = moerge.merge(
                base,
                names,
                method,
                out,
                registry=reg,
                weights=w,
                output=output,
                rank=rank,
                rank_tolerance=rank_tolerance,
                dtype=dtype,
                progress=None if not no_progress else False,
                tokenizer_source=tokenizer_source,
                **params,
            )
    except (KeyError, ValueError, OSError, RuntimeError) as exc:
        _fail(exc)
    report = json.loads((path / "moerge_merge.json").read_text())
    click.echo(f"merged {len(names)} experts with {method} into {path} ({report['output']}, {report['seconds']:.1f} s)")
    if report["params"].get("vocab_size"):
        click.echo(f"tokenizer: {report['params']['tokenizer_source']}, {report['params']['vocab_size']} tokens")
    if report["refactor_error"]:
        auto = f" (auto: each module's smallest rank within {report['rank_tolerance']:g})" if report.get("module_ranks") else ""
        click.echo(f"rank-{report['rank']} re-factoring{auto}: max relative error {max(report['refactor_error'].values()):.3f}")


def _lorahub(experts, out, registry_path, base, params, rank, output, examples_path, no_progress) -> None:  # noqa: ANN001
    import moerge
    from moerge.evaluation.tasks import read_jsonl

    given = [f"--{k}" for k in ("density", "lambda", "majority_sign_method", "flavor") if params.get(k) is not None]
    if rank is not None:
        given.append("--rank")
    if given:
        _fail(ValueError(f"lorahub combines the experts' factors with searched weights; drop {', '.join(given)}"))
    known = ("budget", "l1", "bound", "batch_size")
    extra = {k: v for k, v in params.items() if k not in (*known, "density", "lambda", "majority_sign_method", "seed", "flavor")}
    if extra:
        _fail(ValueError(f"lorahub has no setting {', '.join(extra)}; its --set settings: {', '.join(known)} (and --seed)"))
    kwargs = {k: params[k] for k in known if params.get(k) is not None}
    if params.get("seed") is not None:
        kwargs["seed"] = params["seed"]
    try:
        rows = read_jsonl(Path(examples_path))
        chat = [e.where for e in rows if e.prompt is None]
        if chat:
            raise ValueError(f"lorahub's --examples take plain prompts; {chat[0]} is a chat example (render it to a prompt)")
        reg = _open(registry_path) if registry_path else None
        names = [e.strip() for e in experts.split(",") if e.strip()]
        path = moerge.lorahub(base, names, [(e.prompt, e.target) for e in rows], out, registry=reg, output=output or "lora",
                              progress=None if not no_progress else False, **kwargs)  # fmt: skip
    except (KeyError, ValueError, OSError, RuntimeError, ImportError) as exc:
        _fail(exc)
    report = json.loads((path / "moerge_lorahub.json").read_text())
    weights = ", ".join(f"{n} {w:+.3f}" for n, w in report["weights"].items())
    click.echo(f"LoRAHub over {len(names)} experts on {report['examples']} examples ({report['budget']} evaluations, "
               f"{report['seconds']:.1f} s) into {path}")  # fmt: skip
    click.echo(f"weights: {weights}")
    click.echo(f"examples' loss: {report['loss_at_zero']:.4f} at w = 0 (the base) → {report['loss']:.4f}")
