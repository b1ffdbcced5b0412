"""``moerge moe build``: a Mixtral MoE from dense experts, from mergekit-moe's config."""

from __future__ import annotations

from pathlib import Path

import click

from moerge.cli.options import _fail, _open, registry_option
from moerge.cli.root import main
from moerge.runtime import quiet_hf


@main.group("moe")
def moe() -> None:
    """Sparse MoE models built from dense experts (mergekit-moe's configs)."""


@moe.command("build")
@click.argument("config_path", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (must not exist or be empty).")
@registry_option("Registry whose experts the config may name (LoRAs folded into the base's MLPs; prompts from their examples).")
@click.option(
    "--hidden-dtype",
    default="bfloat16",
    show_default=True,
    help="dtype of the base's hidden states for the routers (mergekit's).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random gate modes and noise_scale.")
@click.option("--no-progress", is_flag=True)
def build_cmd(config_path, out, registry_path, hidden_dtype, seed, no_progress) -> None:  # noqa: ANN001
    """Build the Mixtral (or, with one shared expert, Qwen2-MoE) model of a mergekit-moe CONFIG
    (base_model, experts with positive_prompts, gate_mode, experts_per_token, dtype) into --out;
    plain transformers loads it."""
    quiet_hf()
    from moerge.composer.moe import build_moe, describe

    try:
        reg = _open(registry_path) if registry_path else None
        path = build_moe(Path(config_path), out, registry=reg, hidden_dtype=hidden_dtype, seed=seed,
                         progress=None if not no_progress else False)  # fmt: skip
    except (KeyError, ValueError, OSError, RuntimeError) as exc:
        _fail(exc)
    info = describe(path)
    kind = "Qwen2-MoE" if info.get("architecture") == "qwen2_moe" else "Mixtral MoE"
    click.echo(f"built a {kind} of {len(info['experts'])} experts (top-{info['experts_per_token']}, gate_mode "
               f"{info['gate_mode']}) into {path} ({info['seconds']:.1f} s)")  # fmt: skip
    if info["degenerate_layers"]:
        click.echo(
            f"warning: layers {info['degenerate_layers']} have nearly dependent router rows (condition number > 5): "
            "the experts' prompts may be too similar, and some experts will be underused"
        )
