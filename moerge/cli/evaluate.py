"""``moerge eval`` (any registry on any task files) and ``moerge lm-eval`` (lm-evaluation-harness)."""

from __future__ import annotations

from pathlib import Path

import click

from moerge.cli.options import DEVICE_OPTION, THREADS_OPTION, _device_settings, _fail, _open
from moerge.cli.root import main
from moerge.runtime import quiet_hf


@main.command("eval")
@click.option("--registry", "registry_path", envvar="MOERGE_REGISTRY", required=True, type=click.Path(file_okay=False),
              help="Registry folder (env MOERGE_REGISTRY).")  # fmt: skip
@click.option(
    "--tasks",
    "tasks_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Task-set folder (tasks.yaml + <task>/{train,validation,test}.jsonl).",
)
@click.option("--base", default=None, help="Base model folder or hub id (default: the experts' registered base).")
@click.option(
    "--methods",
    default=None,
    help="Comma-separated methods [default: all of the papers' tables]: base,experts,oracle,phatgoose,glider,arrow,retrieval,average,task_arithmetic,ties,dare_ties,twin; by name, mergekit's breadcrumbs,breadcrumbs_ties,della,sce,model_stock,multislerp; or, over whole-model experts, symbolic_moe,majority_vote,best_single.",
)
@click.option("--expert", "experts", multiple=True, help="Evaluate only these experts (repeatable; default: every LoRA expert).")
@click.option(
    "--set",
    "settings",
    multiple=True,
    help="A grid axis METHOD.PARAM=V1,V2,… chosen on validation (repeatable), e.g. glider.alpha=1,10,100.",
)
@click.option(
    "--limit", default=None, type=click.IntRange(min=1), help="The first N validation and test examples per task (a quick look)."
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for report.md, results.json, cross_task.png and the score cache.",
)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Write results.json here instead.")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Score cache [default: OUT/cache].")
@click.option("--no-cache", is_flag=True, help="Compute everything again (nothing read from or written to the cache).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Prompts per generate call.")
@DEVICE_OPTION
@click.option("--dtype", default="auto", show_default=True, help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16.")
@THREADS_OPTION
@click.option("--no-progress", is_flag=True)
def eval_cmd(registry_path, tasks_dir, base, methods, experts, settings, limit, out, json_path, cache_dir, no_cache, batch_size,
             device, dtype, threads, no_progress) -> None:  # noqa: ANN001  # fmt: skip
    """Score a registry's experts on your task set with every method; hyper-parameters chosen on validation."""
    from moerge.evaluation import EvaluationError, TaskSetError, evaluate

    quiet_hf()
    _device_settings(device, dtype, threads)
    registry = _open(registry_path)
    try:
        report = evaluate(
            registry, tasks_dir, base=base, methods=methods, grid=list(settings), experts=list(experts) or None,
            device=device, dtype=dtype, limit=limit, out=out, json_path=json_path,
            cache_dir=None if no_cache else (cache_dir or "auto"), batch_size=batch_size,
            progress=False if no_progress else None,
        )  # fmt: skip
    except (EvaluationError, TaskSetError, ValueError, FileNotFoundError, KeyError) as exc:
        _fail(exc)
    click.echo(report.markdown())
    meta = report.meta
    for m, why in meta["skipped"].items():
        click.echo(f"{m}: not run: {why}")
    click.echo(
        f"\n{len(meta['computed'])} entries computed, {meta['cache']['hits']} from the cache, {meta['seconds']['total']:.0f} s; "
        f"report: {Path(out) / 'report.md'}, results: {json_path or Path(out) / 'results.json'}"
    )


@main.command("lm-eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lm_eval_cmd(args: tuple[str, ...]) -> None:
    """lm-evaluation-harness's command line with the model ``moerge`` registered, e.g.
    ``moerge lm-eval --model moerge --model_args composition=glider.json --tasks T --include_path DIR``
    (needs the extra: pip install 'moerge[lm-eval]'; --help shows lm-eval's options)."""
    try:
        from moerge.integrations.lm_harness import main as lm_eval_main
    except ImportError as exc:
        _fail(ImportError(f"moerge lm-eval needs lm-evaluation-harness: pip install 'moerge[lm-eval]' ({exc})"))
    lm_eval_main(list(args))
