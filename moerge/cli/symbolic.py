"""``moerge symbolic``: Symbolic-MoE over registered whole-model experts."""

from __future__ import annotations

import json
from pathlib import Path

import click

from moerge.cli.options import _fail, _open
from moerge.cli.root import main
from moerge.runtime import quiet_hf


@main.group()
def symbolic() -> None:
    """Symbolic-MoE over registered whole-model experts: profile them, then recruit and answer."""


def _questions(path: str, need_answer: bool) -> dict[str, dict]:
    from moerge.symbolic.moe import read_questions

    return read_questions(path, need_answer)


def _symbolic_moe(registry_path, models, skills, annotator, aggregator, max_new_tokens, validation):  # noqa: ANN001, ANN202
    from moerge.symbolic import SymbolicMoE
    from moerge.symbolic.moe import make_annotator

    reg = _open(registry_path)
    names = list(models) or [r.name for r in reg.list(kind="model") if r.name not in (aggregator, annotator)]
    if not names:
        raise ValueError(f"registry {reg.root} has no whole-model experts (registry add --kind model)")
    vocab = [s.strip() for s in skills.split(",") if s.strip()] if skills else None
    return SymbolicMoE(reg, names, make_annotator(reg, validation, vocab, annotator), aggregator=aggregator,
                       max_new_tokens=max_new_tokens)  # fmt: skip


SYMBOLIC_OPTIONS = [
    click.option("--registry", "registry_path", required=True, type=click.Path(file_okay=False)),
    click.option("--model", "models", multiple=True, help="A whole-model expert (repeatable; default: every kind-model expert)."),
    click.option(
        "--validation",
        required=True,
        type=click.Path(dir_okay=False, exists=True),
        help="JSONL id, question, answer[, keywords].",
    ),
    click.option(
        "--skills",
        default=None,
        help="Comma-separated skill vocabulary for the offline annotator (MiniLM) [default, without --annotator: "
        "the keywords of each question's nearest validation questions].",
    ),
    click.option("--annotator", default=None, help="A registered instruction-tuned model to annotate keywords (the paper's)."),
    click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(min=1)),
    click.option("--no-progress", is_flag=True),
]


def _symbolic_options(fn):  # noqa: ANN001, ANN202
    for opt in reversed(SYMBOLIC_OPTIONS):
        fn = opt(fn)
    return fn


@symbolic.command("profile")
@_symbolic_options
def symbolic_profile(registry_path, models, validation, skills, annotator, max_new_tokens, no_progress) -> None:  # noqa: ANN001
    """Profile the models on a validation set (each answers every question once, one load per
    model); profiles are stored in the registry, so only models without one run."""
    quiet_hf()
    try:
        val = _questions(validation, True)
        moe = _symbolic_moe(registry_path, models, skills, annotator, None, max_new_tokens, val)
        profiles = moe.profile(val, progress=None if not no_progress else False)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as exc:
        _fail(exc)
    report = moe.report["profile"]
    gamma = moe.competency
    click.echo("| model | validation accuracy | γ | strongest keywords |\n|---|---:|---:|---|")
    for m, prof in profiles.items():
        top = ", ".join(k for k, v in sorted(prof.items(), key=lambda kv: -kv[1])[:3] if v > 0)
        click.echo(f"| {m} | {100 * report['accuracy'][m]:.1f} | {gamma[m]:.3f} | {top} |")
    click.echo(f"profiled now: {', '.join(report['profiled_now']) or 'none (all stored)'}; model loads {report['model_loads']}")


@symbolic.command("run")
@_symbolic_options
@click.option(
    "--test", "test_path", required=True, type=click.Path(dir_okay=False, exists=True), help="JSONL id, question[, answer]."
)
@click.option("--aggregator", default=None, help="The aggregator model [default: chosen by the synthetic benchmark].")
@click.option("--ray", "on_ray", is_flag=True, help="One Ray task per recruited model (its own process).")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Write every query's result here.")
def symbolic_run(
    registry_path, models, validation, skills, annotator, max_new_tokens, no_progress, test_path, aggregator, on_ray, json_path
) -> None:  # noqa: ANN001
    """Recruit k = 3 experts per test question by the profiles, answer grouped by model, aggregate;
    with answers in the test file, print accuracy of the aggregator and of the majority vote."""
    quiet_hf()
    progress = None if not no_progress else False
    try:
        val = _questions(validation, True)
        moe = _symbolic_moe(registry_path, models, skills, annotator, aggregator, max_new_tokens, val)
        moe.profile(val, progress=progress)
        if aggregator is None:
            moe.select_aggregator(progress=progress)
        test = _questions(test_path, False)
        out = moe.run({q: r["question"] for q, r in test.items()}, on_ray=on_ray, progress=progress)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as exc:
        _fail(exc)
    res = out["results"]
    click.echo(f"{len(res)} questions, aggregator {out['aggregator']}: {out['model_loads']} model loads "
               f"({out['distinct_models']} recruited models + the aggregator)")  # fmt: skip
    uniform = sum(r["how"] == "uniform" for r in res.values())
    if uniform:
        click.echo(f"{uniform} question(s) had no keyword any profile knows: recruited uniformly (the spec's fallback)")
    judged = [q for q in res if "answer" in test[q]]
    if judged:
        for name, key in (("aggregator", "final"), ("majority vote", "majority")):
            acc = sum(moe.check(res[q][key] or "", test[q]["answer"]) for q in judged) / len(judged)
            click.echo(f"{name}: {100 * acc:.1f} % of {len(judged)}")
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=2))
