"""``moerge route``: compose a router over registered experts and explain one prompt's routing."""

from __future__ import annotations

import json

import click

from moerge.cli.options import (
    COMPOSITION_OPTION,
    NO_SOURCE,
    ZOO_OPTION,
    ZOO_REGISTRY_OPTION,
    _fail,
    _open,
    _parse_config,
    _read_data,
    _zoo_source,
)
from moerge.cli.root import main
from moerge.runtime import quiet_hf


@main.command()
@click.argument("prompt")
@click.option("--router", default="phatgoose", show_default=True, help="phatgoose, glider, arrow, retrieval or twin.")
@ZOO_REGISTRY_OPTION
@ZOO_OPTION
@COMPOSITION_OPTION
@click.option("--expert", "experts", multiple=True, help="Restrict to these experts (repeatable; default: every LoRA expert).")
@click.option("--base", default=None, help="Base model folder or hub id (default: the experts' registered base).")
@click.option(
    "--data", default=None, type=click.Path(dir_okay=False, exists=True), help="JSONL {expert, prompt, target} for gate training."
)
@click.option("--set", "settings", multiple=True, help="Router setting KEY=VALUE (repeatable), e.g. --set top_k=1 --set alpha=3.")
@click.option("--task", default=None, help="A task description for GLIDER's global router (default: the prompt).")
@click.option("--max-new-tokens", default=8, show_default=True, type=int)
@click.option(
    "--png", default=None, type=click.Path(dir_okay=False), help="Write a heatmap (tokens × layers, coloured by expert)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the explanation as JSON.")
@click.option(
    "--expect", default=None, help="The expert this prompt should go to: the diagnostics then say how often the router chose it."
)
@click.option("--save", default=None, type=click.Path(dir_okay=False), help="Save the composition spec here.")
def route(
    prompt,
    router,
    registry_path,
    zoo_preset,
    composition,
    experts,
    base,
    data,
    settings,
    task,
    max_new_tokens,
    png,
    as_json,
    expect,
    save,
) -> None:  # noqa: ANN001
    """Compose experts under a router, generate for PROMPT and show which experts were chosen
    where, with routing diagnostics (top-1 expert per token type, per layer, and the vote)."""
    quiet_hf()
    import moerge

    config = _parse_config(settings)
    try:
        train_data = _read_data(data) if data else None
        if composition:
            model = moerge.load_composition(composition, data=train_data, **({"base": base} if base else {}))
        else:
            if zoo_preset:
                reg, zoo_base, zoo_data, config = _zoo_source(zoo_preset, router, config)
                base, train_data = base or zoo_base, train_data or zoo_data
            elif registry_path:
                reg = _open(registry_path)
            else:
                raise ValueError(NO_SOURCE)
            sel = reg.select(names=list(experts) or None, kind="lora")
            model = moerge.compose(base, sel, router, data=train_data, **config)
        if max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be at least 1")
        if expect is not None and expect not in model.experts:
            raise ValueError(f"--expect {expect!r} is not among the composition's experts {model.experts}")
        ex = model.explain(prompt, task=task, max_new_tokens=max_new_tokens)
    except (KeyError, ValueError, OSError, RuntimeError) as exc:
        _fail(exc)
    click.echo(json.dumps(ex.to_json(expect), indent=2) if as_json else ex.summary(expected=expect))
    if png:
        click.echo(f"wrote {ex.plot(png)}", err=True)
    if save:
        click.echo(f"saved composition to {model.save(save)}", err=True)
