"""The ``moerge`` command: the demo, the zoo, the expert registry, routing and merging."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
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


ZOO_REGISTRY_OPTION = click.option(
    "--registry",
    "registry_path",
    envvar="MOERGE_REGISTRY",
    default=None,
    type=click.Path(file_okay=False),
    help="Registry folder (env MOERGE_REGISTRY).",
)
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


def _quiet_hf() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import warnings

    # PEFT calls a transformers helper that transformers 5 deprecated: nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


THREADS_OPTION = click.option(
    "--threads",
    default=None,
    type=click.IntRange(min=1),
    help="torch CPU threads [default in demo: the cores not busy with other work; elsewhere torch's default].",
)
DEVICE_OPTION = click.option(
    "--device", default="auto", show_default=True, help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps."
)


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
@click.option(
    "--routers",
    default="PHATGOOSE,GLIDER,GLIDER (templates shared),Arrow,retrieval",
    show_default=True,
    help="Router rows to add (comma-separated), or 'none'.",
)
@click.option(
    "--merges",
    default="uniform average,task arithmetic,TIES,DARE-TIES,Twin-Merging",
    show_default=True,
    help="Merge rows to add (comma-separated), or 'none'.",
)
@click.option(
    "--retrieval/--no-retrieval",
    default=True,
    show_default=True,
    help="Also RouterRetriever's table on the retrieval suite (preset small: the reduced suite).",
)
@click.option(
    "--symbolic/--no-symbolic",
    default=True,
    show_default=True,
    help="Also Symbolic-MoE's table on the zoo's whole-model pool (its group models and aggregator trained once, cached).",
)
@click.option(
    "--control/--no-control",
    default=True,
    show_default=True,
    help="Also the positive control for token routing (disjoint-vocabulary experts; built once, cached).",
)
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
    control: bool,
    no_progress: bool,
    device: str,
    threads: int | None,
) -> None:
    """Build or load the zoo, evaluate base, every expert on every task, the oracle, the routers and the merges; print the table.

    The zoo is built on the CPU (the reference weights); evaluation, router preparation and
    merges run on --device in float32."""
    _quiet_hf()
    from moerge.device import auto_threads, resolve_device, set_threads

    try:
        dev = resolve_device(device)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None
    n_threads = set_threads(threads or auto_threads())
    click.echo(f"      {torch_threads()} torch thread(s) (--threads to choose)", err=True)
    from moerge import zoo as zoo_mod
    from moerge.bench.quality import ZOO_MERGES, ZOO_ROUTERS, evaluate_zoo, write_report
    from moerge.zoo.build import default_cache_dir
    from moerge.zoo.prebuild import maybe_start

    chosen = _rows(routers, ZOO_ROUTERS, "--routers")
    chosen_merges = _rows(merges, ZOO_MERGES, "--merges")
    t0 = time.perf_counter()
    suite_preset = "retrieval-small" if preset == "small" else "retrieval"
    control_preset = "control-small" if preset == "small" else "control"
    # the retrieval suite (and its scores), which does not need the zoo, builds in a second
    # process meanwhile, one thread each; it is the longest part, so the control suite stays here
    bg = maybe_start(
        Path(cache_dir).expanduser() if cache_dir else default_cache_dir(), suite_preset if retrieval else None, None, n_threads
    )
    if bg is not None:
        click.echo(f"      retrieval suite: building in a second process (1 thread each; log {bg.log})", err=True)

    def poll() -> None:  # the prebuild gives its thread back once it has ended
        if bg is not None:
            bg.poll()

    try:
        click.echo(f"[1/4] zoo preset {preset!r} (built once, then cached) ...", err=True)
        zoo = zoo_mod.load(preset, cache_dir=cache_dir, progress=None if not no_progress else False)
        click.echo(f"      {zoo.root}", err=True)
        poll()
        click.echo(
            f"[2/4] evaluating base, {len(zoo.held_in)} experts × {len(zoo.held_in) + len(zoo.held_out)} tasks, oracle ...",
            err=True,
        )
        click.echo(
            f"[3/4] routers: {', '.join(chosen) or 'none'} (per-expert artifacts prepared once, cached); merges: "
            f"{', '.join(chosen_merges) or 'none'} (hyper-parameters chosen on the validation split) — through moerge.evaluate ...",
            err=True,
        )
        report = evaluate_zoo(zoo, chosen, chosen_merges, progress=None if not no_progress else False, device=dev)
        report.meta["device"], report.meta["threads"] = str(dev), n_threads
        report.meta["prebuild"] = bg is not None
        poll()
        if symbolic:
            from moerge.bench import symbolic as symbolic_bench

            click.echo(
                "      Symbolic-MoE: whole-model pool (group models and aggregator trained once, cached), profiles, "
                "recruiting, batch-by-model run ...",
                err=True,
            )
            t_s = time.perf_counter()
            report.symbolic = symbolic_bench.evaluate(zoo, progress=None if not no_progress else False)
            report.meta["symbolic_seconds"] = time.perf_counter() - t_s
        if control:
            from moerge.bench import control as control_bench
            from moerge.zoo.control import load_control

            click.echo(
                "      token-routing control: disjoint-vocabulary experts (built once, cached), merges, routers, oracles ...",
                err=True,
            )
            t_c = time.perf_counter()
            poll()
            suite = load_control(control_preset, cache_dir=cache_dir, progress=None if not no_progress else False)
            report.token_control = control_bench.evaluate(suite, progress=None if not no_progress else False, device=str(dev))
            report.meta["control_seconds"] = time.perf_counter() - t_c
        if retrieval:
            from moerge.bench import retrieval as retrieval_bench

            if bg is not None:
                t_w = time.perf_counter()
                bg.wait()
                report.meta["prebuild_wait_seconds"] = time.perf_counter() - t_w
            click.echo(
                f"      retrieval suite {suite_preset!r} (6 domains' LoRAs trained once, cached): base, experts, routers, oracles ...",
                err=True,
            )
            t_r = time.perf_counter()
            report.retrieval = retrieval_bench.run(suite_preset, cache_dir=cache_dir, progress=None if not no_progress else False)
            report.meta["retrieval_seconds"] = time.perf_counter() - t_r
        report.meta["demo_seconds"] = time.perf_counter() - t0
        paths = write_report(report, out, json_path)
        click.echo("[4/4] done\n", err=True)
        click.echo(report.markdown())
        click.echo("\nCross-task matrix (exact match %):\n")
        click.echo(report.matrix_markdown())
        if report.retrieval is not None:
            click.echo("\nRetrieval — RouterRetriever's Table 1 (nDCG@10 on each domain's test queries, trec_eval):\n")
            click.echo(retrieval_bench.markdown(report.retrieval))
        if report.token_control is not None:
            click.echo(
                "\nToken routing, positive control (disjoint-vocabulary experts; segments right on mixed held-out prompts):\n"
            )
            click.echo(control_bench.markdown(report.token_control))
        if report.symbolic is not None:
            click.echo("\nSymbolic-MoE on the zoo's whole-model pool (accuracy %, exact match, per task group):\n")
            click.echo(symbolic_bench.markdown(report.symbolic))
        click.echo(f"\nWrote {paths['markdown']}, {paths['json']}, {paths['png']} in {report.meta['demo_seconds']:.0f} s.")
    finally:
        if bg is not None:
            bg.stop()


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _rows(spec: str, known: dict, option: str) -> list[str]:
    chosen = [] if spec.strip().lower() == "none" else [r.strip() for r in spec.split(",") if r.strip()]
    unknown = [r for r in chosen if r not in known]
    if unknown:
        raise click.BadParameter(f"unknown row(s) {unknown}; choose from {list(known)} or 'none'", param_hint=option)
    return chosen


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
    _quiet_hf()
    from moerge import zoo as zoo_mod

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
def zoo_tasks(export_dir: str | None, preset: str, only: tuple[str, ...]) -> None:
    """List the suite's tasks with one example each (``composed``: the segment compositions,
    kept out of the demo's suite; see ``Preset.segment_share``), or export them."""
    from moerge.zoo import HELD_IN, HELD_OUT, sample
    from moerge.zoo.tasks import COMPOSED

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


# ---------------------------------------------------------------------------- routing


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
    _quiet_hf()
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


@main.command()
@CONFIG_FILE_OPTION
@ZOO_REGISTRY_OPTION
@ZOO_OPTION
@click.option(
    "--router",
    default=None,
    help="retrieval (decided per request, experts batched) or phatgoose/glider/arrow/twin (composition).",
)
@COMPOSITION_OPTION
@click.option("--set", "settings", multiple=True, help="Router setting KEY=VALUE (repeatable).")
@click.option("--replicas", default=1, show_default=True, type=int, help="Expert workers (each holds the base model once).")
@click.option("--max-resident", default=8, show_default=True, type=int, help="Experts resident per worker (LRU).")
@click.option(
    "--max-batch", default=16, show_default=True, type=int, help="Requests per batch (--embeddings: texts per forward)."
)
@click.option("--max-wait-ms", default=10.0, show_default=True, type=float, help="How long a batch waits for company.")
@click.option("--num-cpus", default=None, type=float, help="Ray CPUs per worker [default: the machine's CPUs shared, ≤ 1 each].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--device", default="auto", show_default=True, help="Workers' device: auto (the GPU Ray gives each, else CPU), cpu, cuda."
)
@click.option(
    "--dtype", default="auto", show_default=True, help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16."
)
@click.option(
    "--gpus-per-worker", default=0.0, show_default=True, type=float, help="GPUs each worker asks Ray for (0.5: two per card)."
)
@click.option("--compile", "compiled", is_flag=True, help="Static KV cache + torch.compile decode (pays on a GPU).")
@THREADS_OPTION
@click.option("--base", default=None, help="Base model folder or hub id (default: the experts' registered base).")
@click.option(
    "--data",
    default=None,
    type=click.Path(dir_okay=False, exists=True),
    help="JSONL {expert, prompt, target}: PHATGOOSE/GLIDER gate training, retrieval's example bank.",
)
@click.option(
    "--request-timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a request may take before it is answered 504.",
)
@click.option(
    "--api-key",
    envvar="MOERGE_API_KEY",
    default=None,
    help="Require 'Authorization: Bearer KEY' (env MOERGE_API_KEY); needed to bind beyond loopback.",
)
@click.option(
    "--drain-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="On SIGTERM/Ctrl-C: seconds to let in-flight requests finish before stopping.",
)
@click.option(
    "--embeddings",
    is_flag=True,
    help="Serve a sentence encoder's LoRA experts instead: POST /v1/embeddings (model = expert, __base__ or auto), /v1/search.",
)
@click.option("--encoder", default=None, help="With --embeddings: the sentence-transformers encoder [default: bundled MiniLM].")
@click.option("--expert", "experts", multiple=True, help="With --embeddings: serve only these experts (repeatable).")
@click.option(
    "--search", "search", multiple=True, help="With --embeddings: NAME=BEIR_FOLDER to serve /v1/search over (repeatable)."
)
@click.option(
    "--symbolic",
    is_flag=True,
    help="Serve Symbolic-MoE over whole-model experts instead: model='symbolic-moe' in /v1/generate and /v1/completions "
    "(with --zoo: the zoo's pool).",
)
@click.option(
    "--validation",
    default=None,
    type=click.Path(dir_okay=False, exists=True),
    help="With --symbolic: JSONL id, question, answer[, keywords] the profiles come from.",
)
@click.option("--skills", default=None, help="With --symbolic: comma-separated skill vocabulary (offline MiniLM annotator).")
@click.option("--annotator", default=None, help="With --symbolic: a registered instruction-tuned model as the paper's annotator.")
@click.option("--aggregator", default=None, help="With --symbolic: the aggregator [default: chosen by the synthetic benchmark].")
@click.option("--model", "symbolic_models", multiple=True, help="With --symbolic: recruit only these models (repeatable).")
def serve(
    registry_path,
    zoo_preset,
    router,
    composition,
    settings,
    replicas,
    max_resident,
    max_batch,
    max_wait_ms,
    num_cpus,
    host,
    port,
    device,
    dtype,
    gpus_per_worker,
    compiled,
    threads,
    base,
    data,
    request_timeout,
    api_key,
    drain_timeout,
    embeddings,
    encoder,
    experts,
    search,
    symbolic,
    validation,
    skills,
    annotator,
    aggregator,
    symbolic_models,
) -> None:  # noqa: ANN001
    """Serve experts over HTTP on Ray Serve until interrupted (POST /v1/generate, /v1/route,
    /v1/completions; GET /v1/experts, /healthz). With --embeddings: an encoder's experts
    (POST /v1/embeddings, /v1/search; GET /v1/models, /healthz). With --symbolic: Symbolic-MoE
    over whole models (model "symbolic-moe"; questions arriving within --max-wait-ms are recruited
    together and answered batch-by-model)."""
    _quiet_hf()
    symbolic_given = [n for n, v in (("--validation", validation), ("--skills", skills), ("--annotator", annotator),
                                     ("--aggregator", aggregator), ("--model", symbolic_models)) if v]  # fmt: skip
    if symbolic:
        _serve_symbolic(registry_path, zoo_preset, validation, skills, annotator, aggregator, symbolic_models, max_batch,
                        max_wait_ms, num_cpus, host, port, device, dtype, gpus_per_worker, threads, request_timeout, api_key,
                        drain_timeout)  # fmt: skip
        return
    if symbolic_given:
        _fail(ValueError(f"{', '.join(symbolic_given)} go with --symbolic"))
    if embeddings:
        _serve_embeddings(registry_path, encoder, experts, search, replicas, max_batch, max_wait_ms, num_cpus, host, port,
                          device, gpus_per_worker, threads, request_timeout, api_key, drain_timeout)  # fmt: skip
        return
    if encoder or experts or search:
        _fail(ValueError("--encoder, --expert and --search go with --embeddings"))

    from moerge.serving.app import build_settings, deploy

    config = _parse_config(settings)
    try:
        if replicas < 1 or max_resident < 1 or max_batch < 1 or max_wait_ms < 0:
            raise ValueError("--replicas, --max-resident and --max-batch must be ≥ 1 and --max-wait-ms ≥ 0")
        if gpus_per_worker < 0 or (gpus_per_worker > 1 and gpus_per_worker != int(gpus_per_worker)):
            raise ValueError(f"--gpus-per-worker must be a fraction ≤ 1 or a whole number, got {gpus_per_worker}")
        from moerge.serving.types import is_loopback

        if not is_loopback(host) and not api_key:
            raise ValueError(
                f"--host {host} exposes the server beyond this machine: set --api-key (or MOERGE_API_KEY); "
                "clients then send 'Authorization: Bearer KEY'"
            )
        if device.startswith("cuda") and not gpus_per_worker:
            raise ValueError("--device cuda needs --gpus-per-worker (e.g. 1, or 0.5 for two workers per card)")
        from moerge.device import resolve_dtype

        resolve_dtype(dtype)
        data = _read_data(data) if data else None
        if zoo_preset:
            reg, zoo_base, zoo_data, config = _zoo_source(zoo_preset, router, config, progress=None)
            registry_path, base, data = str(reg.root), base or zoo_base, data or zoo_data
        elif registry_path:
            registry_path = str(_open(registry_path).root)
        elif not composition:
            raise ValueError(NO_SOURCE)
        # everything that can fail (router settings, gate training without data, the base) fails here, before Ray starts
        serve_settings = build_settings(
            composition,
            registry=registry_path,
            router=router,
            router_config=config,
            data=data,
            base=base,
            replicas=replicas,
            max_resident=max_resident,
            max_batch=max_batch,
            max_wait_s=max_wait_ms / 1000,
            num_cpus=num_cpus,
            threads=threads,
            device=device,
            dtype=dtype,
            gpus_per_worker=gpus_per_worker,
            compile=compiled,
            request_timeout_s=request_timeout,
            api_key=api_key,
        )
        click.echo("starting Ray Serve and loading workers …", err=True)
        from moerge.serving.workers import ensure_ray

        stop = _StopSignal()  # SIGTERM during start-up is honoured once the app is up
        ensure_ray()
        stop.install()  # again: ray.init installs its own handler, which exits with a stack trace
        dep = deploy(serve_settings, host=host, port=port)
    except (KeyError, ValueError, OSError, RuntimeError) as exc:
        _fail(exc)
    click.echo(f"serving {dep.settings.registry} at {dep.url}  (router: {router or 'none'}; replicas: {replicas})")
    click.echo(f"  curl -s {dep.url}/v1/experts")
    click.echo(
        f'  curl -s {dep.url}/v1/generate -H \'content-type: application/json\' -d \'{{"prompt": "...", "expert": "NAME"}}\''
    )
    click.echo("Ctrl-C or SIGTERM stops the server (in-flight requests are answered first).")
    _stop_serving(dep, signal.Signals(stop.wait()).name, drain_timeout)


def _serve_embeddings(registry_path, encoder, experts, search, replicas, max_batch, max_wait_ms, num_cpus, host, port,
                      device, gpus_per_worker, threads, request_timeout, api_key, drain_timeout) -> None:  # noqa: ANN001  # fmt: skip
    from moerge.serving.embeddings import deploy_embeddings

    try:
        if not registry_path:
            raise ValueError("--embeddings needs --registry (e.g. the suite's: moerge retrieval suite --path)/registry")
        indexes = {}
        for item in search:
            name, sep, folder = item.partition("=")
            if not sep or not name or not Path(folder).is_dir():
                raise ValueError(f"--search takes NAME=BEIR_FOLDER (an existing folder), got {item!r}")
            indexes[name] = folder
        if replicas < 1 or max_batch < 1 or max_wait_ms < 0:
            raise ValueError("--replicas and --max-batch must be ≥ 1 and --max-wait-ms ≥ 0")
        registry_path = str(_open(registry_path).root)
        click.echo("starting Ray Serve and loading embedding workers …", err=True)
        from moerge.serving.workers import ensure_ray

        stop = _StopSignal()
        ensure_ray()
        stop.install()
        dep = deploy_embeddings(
            registry_path, host=host, port=port, encoder=encoder, experts=list(experts) or None, search=indexes,
            replicas=replicas, max_batch=max(max_batch, 1), max_wait_s=max_wait_ms / 1000, num_cpus=num_cpus,
            threads=threads, device=device, gpus_per_worker=gpus_per_worker, request_timeout_s=request_timeout, api_key=api_key,
        )  # fmt: skip
    except (KeyError, ValueError, OSError, RuntimeError) as exc:
        _fail(exc)
    click.echo(f"serving embeddings of {registry_path} at {dep.url}")
    click.echo(f"  curl -s {dep.url}/v1/models")
    click.echo(
        f'  curl -s {dep.url}/v1/embeddings -H \'content-type: application/json\' -d \'{{"model": "auto", "input": ["..."]}}\''
    )
    click.echo("Ctrl-C or SIGTERM stops the server (in-flight requests are answered first).")
    _stop_serving(dep, signal.Signals(stop.wait()).name, drain_timeout)


def _serve_symbolic(registry_path, zoo_preset, validation, skills, annotator, aggregator, models, max_batch, max_wait_ms,
                    num_cpus, host, port, device, dtype, gpus_per_worker, threads, request_timeout, api_key, drain_timeout) -> None:  # noqa: ANN001  # fmt: skip
    from moerge.serving.symbolic import MODEL, deploy_symbolic

    try:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("--max-batch must be ≥ 1 and --max-wait-ms ≥ 0")
        options: dict = {}
        if zoo_preset:
            from moerge import zoo as zoo_mod
            from moerge.zoo.symbolic import load_pool

            pool = load_pool(zoo_mod.load(zoo_preset))
            registry_path, val = str(pool.root / "registry"), pool.validation()
            options = {"models": list(models) or pool.models, "aggregator": aggregator or pool.aggregator,
                       "instruction_sep": " : ", "aggregate_template": "compact", "max_new_tokens": pool.preset.max_new_tokens}  # fmt: skip
        elif registry_path:
            registry_path = str(_open(registry_path).root)
            if not validation:
                raise ValueError("--symbolic needs --validation FILE.jsonl (the questions the models' profiles come from)")
            val = validation
            options = {"models": list(models) or None, "aggregator": aggregator}
        else:
            raise ValueError("--symbolic needs --registry DIR --validation FILE.jsonl, or --zoo small|default (the zoo's pool)")
        if skills:
            options["skills"] = [x.strip() for x in skills.split(",") if x.strip()]
        if annotator:
            options["annotator"] = annotator
        click.echo("starting Ray Serve; profiling the pool (stored profiles are reused) …", err=True)
        from moerge.serving.workers import ensure_ray

        stop = _StopSignal()
        ensure_ray()
        stop.install()
        dep = deploy_symbolic(
            registry_path, val, host=host, port=port, max_batch=max_batch, max_wait_s=max_wait_ms / 1000, num_cpus=num_cpus,
            threads=threads, device=device, dtype=dtype, gpus_per_worker=gpus_per_worker, request_timeout_s=request_timeout,
            api_key=api_key, **options,
        )  # fmt: skip
    except (KeyError, ValueError, OSError, RuntimeError) as exc:
        _fail(exc)
    click.echo(f"serving {MODEL} over {registry_path} at {dep.url}")
    click.echo(
        f'  curl -s {dep.url}/v1/completions -H \'content-type: application/json\' -d \'{{"model": "{MODEL}", "prompt": "..."}}\''
    )
    click.echo("Ctrl-C or SIGTERM stops the server (in-flight requests are answered first).")
    _stop_serving(dep, signal.Signals(stop.wait()).name, drain_timeout)


class _StopSignal:
    """SIGTERM or SIGINT (what systemd, Kubernetes and Ctrl-C send) as an event, replacing
    Ray's driver handler, which exits with a stack trace. A second signal exits at once."""

    def __init__(self) -> None:
        self.got: list[int] = []
        self.event = threading.Event()
        self.install()

    def _handler(self, signum: int, frame: Any) -> None:
        if self.got:  # a second signal while draining: stop now
            click.echo(f"{signal.Signals(signum).name} again: exiting without draining", err=True)
            os._exit(1)
        self.got.append(signum)
        self.event.set()

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def wait(self) -> int:
        while not self.event.wait(0.5):
            pass
        return self.got[0]


def _stop_serving(dep: Any, why: str, drain_timeout: float) -> None:
    import ray
    from ray import serve as ray_serve

    click.echo(f"{why}: no new requests; draining those in flight (up to {drain_timeout:g} s) …", err=True)
    try:
        left = dep.drain(timeout_s=drain_timeout)
    except Exception as exc:  # noqa: BLE001 - the app is already gone: nothing left to drain
        left = 0
        click.echo(f"could not drain ({type(exc).__name__}: {exc})", err=True)
    if left:
        click.echo(f"{left} request(s) still unanswered after {drain_timeout:g} s; stopping anyway", err=True)
    ray_serve.shutdown()
    ray.shutdown()
    click.echo("stopped", err=True)


def _device_settings(device: str, dtype: str, threads: int | None) -> None:
    """Check --device/--dtype before any work (a bad one is a usage error) and set --threads."""
    from moerge.device import resolve_device, resolve_dtype, set_threads

    try:
        resolve_dtype(dtype, resolve_device(device))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device/--dtype") from None
    set_threads(threads)


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
    help="Comma-separated methods [default: all]: base,experts,oracle,phatgoose,glider,arrow,retrieval,average,task_arithmetic,ties,dare_ties,twin; or, over whole-model experts, symbolic_moe,majority_vote,best_single.",
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

    _quiet_hf()
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


@main.group()
def bench() -> None:
    """Performance benchmarks (ratios against a baseline measured in the same run)."""


@bench.command("routing")
@click.option("--hidden", default=512, show_default=True, type=int)
@click.option("--layers", default=4, show_default=True, type=int)
@click.option("--experts", default="4,8,16", show_default=True, help="Expert counts for PHATGOOSE top-k.")
@click.option("--top-k", default=2, show_default=True, type=int)
@click.option("--batch", default=8, show_default=True, type=int)
@click.option("--seq", default=64, show_default=True, type=int, help="Forward: tokens per row.")
@click.option("--repeats", default=5, show_default=True, type=int)
@DEVICE_OPTION
@click.option("--dtype", default="auto", show_default=True, help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16.")
@THREADS_OPTION
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the result as JSON.")
@click.option("--no-progress", is_flag=True)
def bench_routing(hidden, layers, experts, top_k, batch, seq, repeats, device, dtype, threads, json_path, no_progress) -> None:  # noqa: ANN001
    """Forward/generate time: base, single LoRA, PHATGOOSE top-k over E experts, every expert
    computed (random weights of the given size; --hidden 2048 --layers 16 is ~0.8 B)."""
    from moerge.bench import routing as rb

    try:
        counts = rb.parse_experts(experts)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--experts") from None
    _device_settings(device, dtype, threads)
    cfg = rb.BenchConfig(
        hidden=hidden,
        layers=layers,
        experts=tuple(counts),
        top_k=top_k,
        batch=batch,
        seq=seq,
        repeats=repeats,
        device=device,
        dtype=dtype,
    )
    result = rb.run(cfg, progress=None if not no_progress else False)
    click.echo(rb.markdown(result))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=2)


@bench.command("embedding")
@click.option("--queries", default=1000, show_default=True, type=int)
@click.option("--experts", default=6, show_default=True, type=int)
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--repeats", default=3, show_default=True, type=int)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the result as JSON.")
@click.option("--no-progress", is_flag=True)
@THREADS_OPTION
def bench_embedding(queries, experts, batch_size, repeats, json_path, no_progress, threads) -> None:  # noqa: ANN001
    """Routed query embedding: mixed-expert batches vs PEFT set_adapter per query and per expert group."""
    from moerge.bench import embedding
    from moerge.device import set_threads

    set_threads(threads)
    result = embedding.run(
        embedding.EmbedBenchConfig(queries=queries, experts=experts, batch_size=batch_size, repeats=repeats),
        progress=None if not no_progress else False,
    )
    click.echo(embedding.table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))


@bench.command("symbolic")
@click.option(
    "--preset",
    default="small",
    show_default=True,
    type=click.Choice(["small", "default"]),
    help="Zoo preset (its dense fine-tunes are the pool).",
)
@click.option("--queries", default=48, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--k", default=3, show_default=True, type=click.IntRange(min=1), help="Experts recruited per query (with replacement)."
)
@click.option("--max-new-tokens", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Zoo cache folder (env MOERGE_CACHE).")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the result as JSON.")
@click.option("--no-progress", is_flag=True)
@THREADS_OPTION
def bench_symbolic(preset, queries, k, max_new_tokens, cache_dir, json_path, no_progress, threads) -> None:  # noqa: ANN001
    """Symbolic-MoE's batch-by-model run (each recruited model loaded once) vs loading the recruited models per query."""
    _quiet_hf()
    from moerge.bench import symbolic
    from moerge.device import set_threads

    set_threads(threads)
    cfg = symbolic.SymbolicBenchConfig(preset=preset, queries=queries, k=k, max_new_tokens=max_new_tokens)
    result = symbolic.run(cfg, cache_dir=cache_dir, progress=None if not no_progress else False)
    click.echo(symbolic.format_result(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))


@bench.command("control")
@click.option(
    "--preset",
    default="control",
    show_default=True,
    type=click.Choice(["control", "control-d128", "control-small"]),
    help="The token-routing control suite (built once, cached).",
)
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "val"]), help="Mixed prompts to score.")
@click.option(
    "--routers",
    default="phatgoose,arrow,retrieval,random",
    show_default=True,
    help="Comma-separated: phatgoose, arrow, retrieval, random (PHATGOOSE with random keys), or 'none'.",
)
@click.option(
    "--merges", default="average,task_arithmetic,ties", show_default=True, help="Comma-separated static merges, or 'none'."
)
@click.option(
    "--set", "settings", multiple=True, help="PHATGOOSE setting KEY=VALUE (repeatable), e.g. --set accumulate=32 --set steps=300."
)
@DEVICE_OPTION
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Cache folder (env MOERGE_CACHE).")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the result as JSON.")
@click.option("--no-progress", is_flag=True)
@THREADS_OPTION
def bench_control(preset, split, routers, merges, settings, device, cache_dir, json_path, no_progress, threads) -> None:  # noqa: ANN001
    """The positive control for token routing: single experts, static merges, PHATGOOSE, Arrow,
    retrieval, random gates and the per-token oracle, scored per segment on mixed prompts, with
    routing accuracy on item tokens."""
    _quiet_hf()
    from moerge.bench import control as control_bench
    from moerge.device import resolve_device, set_threads
    from moerge.zoo.control import load_control

    set_threads(threads)
    router_names = {
        "phatgoose": "PHATGOOSE",
        "arrow": "Arrow",
        "retrieval": "retrieval",
        "random": "random gates (PHATGOOSE, keys replaced)",
    }
    merge_names = {"average": "uniform average", "task_arithmetic": "task arithmetic", "ties": "TIES"}
    chosen_routers = [router_names[r] for r in _rows(routers, router_names, "--routers")]
    chosen_merges = [merge_names[m] for m in _rows(merges, merge_names, "--merges")]
    try:
        dev = str(resolve_device(device))
        suite = load_control(preset, cache_dir=cache_dir, progress=None if not no_progress else False)
        result = control_bench.evaluate(
            suite,
            progress=None if not no_progress else False,
            split=split,
            routers=chosen_routers,
            merges=chosen_merges,
            phatgoose=_parse_config(settings),
            device=dev,
        )
    except (KeyError, ValueError, OSError) as exc:
        _fail(exc)
    click.echo(control_bench.markdown(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))


@bench.command("soak")
@click.option("--requests", "n_requests", default=2000, show_default=True, type=int)
@click.option("--concurrency", default=32, show_default=True, type=int)
@click.option("--kills", default=3, show_default=True, type=int, help="Workers SIGKILLed during the run.")
@click.option("--freezes", default=1, show_default=True, type=int, help="Workers SIGSTOPped (then thawed) during the run.")
@click.option("--freeze-s", default=4.0, show_default=True, type=float)
@click.option("--replicas", default=2, show_default=True, type=int)
@click.option("--request-timeout", default=10.0, show_default=True, type=float, help="The server's per-request deadline.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the result as JSON.")
def bench_soak(n_requests, concurrency, kills, freezes, freeze_s, replicas, request_timeout, json_path) -> None:  # noqa: ANN001
    """Soak a real `moerge serve` (small zoo) at high concurrency while killing and freezing its
    workers: every request must be answered or fail clearly within its deadline, none lost."""
    from moerge.bench import soak

    cfg = soak.SoakConfig(
        requests=n_requests,
        concurrency=concurrency,
        kills=kills,
        freezes=freezes,
        freeze_s=freeze_s,
        replicas=replicas,
        request_timeout_s=request_timeout,
    )
    result = soak.run(cfg)
    click.echo(soak.table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    if result["lost"] or not result["healthy_at_end"] or result["exit_code"] != 0:
        sys.exit(1)


@bench.command("serving")
@click.option("--mixed/--no-mixed", default=True, help="Mixed-expert batches vs single-expert, PEFT adapter_names, set_adapter.")
@click.option("--http/--no-http", default=True, help="End to end over loopback HTTP on Ray Serve (the zoo).")
@click.option("--hidden", default=512, show_default=True, type=int)
@click.option("--layers", default=4, show_default=True, type=int)
@click.option("--batch", default=32, show_default=True, type=int)
@click.option("--new-tokens", default=32, show_default=True, type=int)
@click.option("--repeats", default=3, show_default=True, type=int)
@click.option("--preset", default="small", show_default=True, type=click.Choice(["small", "default"]), help="Zoo for HTTP.")
@click.option("--requests", "n_requests", default=192, show_default=True, type=int, help="HTTP requests per workload.")
@click.option("--concurrency", default=16, show_default=True, type=int)
@click.option("--port", default=8765, show_default=True, type=int)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the result as JSON.")
@click.option("--png", default=None, type=click.Path(dir_okay=False), help="Plot mixed-batch throughput by distinct experts.")
@click.option("--no-progress", is_flag=True)
@click.option("--ks", default="1,2,4,8", show_default=True, help="Distinct experts per mixed batch (each must divide --batch).")
@DEVICE_OPTION
@click.option("--dtype", default="auto", show_default=True, help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16.")
@click.option(
    "--compile", "compiled", is_flag=True, help="Also time eager vs compiled decode steps against the weight-read floor."
)
@click.option("--compile-backend", default="inductor", show_default=True, help="torch.compile backend for --compile.")
@THREADS_OPTION
def bench_serving(
    mixed,
    http,
    hidden,
    layers,
    batch,
    new_tokens,
    repeats,
    preset,
    n_requests,
    concurrency,
    port,
    json_path,
    png,
    no_progress,
    ks,
    device,
    dtype,
    compiled,
    compile_backend,
    threads,
) -> None:  # noqa: ANN001
    """Serving throughput: mixed-expert batches (k distinct experts) against single-expert
    batches, PEFT adapter_names and per-request set_adapter; with --compile, ms per decode step
    eager vs compiled vs the physical floor; then HTTP req/s and p50/p99 latency."""
    _quiet_hf()
    from moerge.bench import routing as rb
    from moerge.bench import serving as sb

    try:
        k_list = tuple(rb.parse_experts(ks))
    except ValueError as exc:
        raise click.BadParameter(str(exc).replace("--experts", "--ks"), param_hint="--ks") from None
    _device_settings(device, dtype, threads)
    out: dict = {}
    try:
        if mixed:
            out["mixed"] = sb.run_mixed(
                sb.MixedConfig(
                    hidden=hidden,
                    layers=layers,
                    batch=batch,
                    new_tokens=new_tokens,
                    repeats=repeats,
                    ks=k_list,
                    experts=max(k_list),
                    device=device,
                    dtype=dtype,
                    compile=compiled,
                    compile_backend=compile_backend,
                ),
                progress=None if not no_progress else False,
            )
            m = out["mixed"]["machine"]
            click.echo(
                f"mixed-expert batches: batch {batch}, {new_tokens} new tokens, hidden {hidden}, {layers} layers; "
                f"{m['device']} ({m.get('name', '')}), {out['mixed']['dtype']}"
            )
            click.echo(f"{'variant':<32} {'k':>2} {'tok/s':>9} {'vs single':>10} {'vs PEFT':>8}")
            for r in out["mixed"]["rows"]:
                peft = "" if r["vs_peft_same_k"] is None else f"{r['vs_peft_same_k']:.2f}"
                click.echo(f"{r['variant']:<32} {r['k']:>2} {r['tokens_per_s']:>9.1f} {r['vs_single']:>10.2f} {peft:>8}")
            d = out["mixed"].get("decode")
            if d:
                click.echo(
                    f"decode steps (batch {d['batch']}, k = {d['k']}): eager {d['eager_ms_per_step']} ms "
                    f"({d['eager_x_floor']}× the {d['floor_ms']} ms floor of reading {d['weight_gb']} GB at {d['bandwidth_gb_s']} GB/s)"
                )
                if "compiled_ms_per_step" in d:
                    click.echo(
                        f"  compiled {d['compiled_ms_per_step']} ms ({d['compiled_x_floor']}× floor): "
                        + (
                            f"{d['compiled_speedup']}× eager "
                            if d["compiled_speedup"]
                            else "no ratio (a step time ≤ 0: timing noise) "
                        )
                        + f"(compile + graph capture {d['compile_s']} s)"
                    )
                else:
                    click.echo(f"  compiled decode failed here: {d['compile_error']}")
            if png:
                click.echo(f"wrote {sb.plot_mixed(out['mixed'], png)}", err=True)
        if http:
            out["http"] = sb.run_http(
                sb.HttpConfig(preset=preset, requests=n_requests, concurrency=concurrency, port=port),
                progress=None if not no_progress else False,
            )
            click.echo(f"HTTP on loopback ({preset} zoo, app start {out['http']['startup_s']} s)")
            click.echo(
                f"{'workload':<24} {'conc':>4} {'req/s':>7} {'×c=1':>6} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'experts':>8}"
            )
            for r in out["http"]["rows"]:
                click.echo(
                    f"{r['workload']:<24} {r['concurrency']:>4} {r['req_per_s']:>7.1f} {r['vs_concurrency_1']:>6.2f} "
                    f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['mean_batch']:>6.1f} {r['mean_distinct_experts']:>8.1f}"
                )
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(exc)
    if json_path:
        from moerge.registry.files import atomic_write_json

        atomic_write_json(Path(json_path), out)


@bench.command("merging")
@click.option("--twin/--no-twin", default=True, help="Twin-Merging batched vs per-sample materialised.")
@click.option("--dense/--no-dense", default=True, help="Dense TIES of N models vs mergekit (needs mergekit).")
@click.option("--batches", default="16,64", show_default=True, help="Batch sizes for the Twin-Merging comparison.")
@click.option("--hidden", default=512, show_default=True, type=int)
@click.option("--tasks", default=8, show_default=True, type=int, help="Twin vectors (tasks).")
@click.option("--repeats", default=3, show_default=True, type=int)
@click.option("--models", default=8, show_default=True, type=int, help="Dense models to merge.")
@click.option("--params-m", default=100.0, show_default=True, type=float, help="Million parameters per dense model.")
@click.option(
    "--workdir", default=None, type=click.Path(file_okay=False), help="Where to build the dense models (default: a temp folder)."
)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the result as JSON.")
@click.option("--no-progress", is_flag=True)
def bench_merging(twin, dense, batches, hidden, tasks, repeats, models, params_m, workdir, json_path, no_progress) -> None:  # noqa: ANN001
    """Twin-Merging's batched dynamic merge vs per-sample materialise; dense TIES vs mergekit (time, peak RSS)."""
    _quiet_hf()
    from moerge.bench import merging as mb

    try:
        sizes = tuple(int(b) for b in batches.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {batches!r}", param_hint="--batches") from None
    result = mb.MergeBenchResult()
    tcfg = mb.TwinBenchConfig(hidden=hidden, tasks=tasks, batches=sizes, repeats=repeats)
    dcfg = mb.DenseBenchConfig(models=models, params_m=params_m, workdir=workdir)
    result.config = {"twin": tcfg.__dict__ if twin else None, "dense": dcfg.__dict__ if dense else None, "threads": _threads()}
    if twin:
        result.twin = mb.bench_twin(tcfg, progress=None if not no_progress else False)
    if dense:
        try:
            result.dense = mb.bench_dense(dcfg, progress=None if not no_progress else False)
        except RuntimeError as exc:
            _fail(exc)
    click.echo(mb.markdown(result))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(result.to_json(), fh, indent=2)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ---------------------------------------------------------------------------- registry


@main.command("merge")
@click.option(
    "--method",
    default="ties",
    show_default=True,
    help="average, task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune, svd.",
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
@click.option(
    "--registry",
    "registry_path",
    envvar="MOERGE_REGISTRY",
    default=None,
    type=click.Path(file_okay=False),
    help="Registry holding the named experts (env MOERGE_REGISTRY).",
)
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
    no_progress,
) -> None:  # noqa: ANN001
    """Merge experts into one LoRA or one model with a static merge method, written to --out."""
    _quiet_hf()
    import warnings

    import moerge
    from moerge.registry.importers import MoergeWarning

    params = {"density": density, "lambda": lambda_, "majority_sign_method": majority_sign_method, "seed": seed, "flavor": flavor}
    if config_path is not None:
        given = [
            f"--{k.replace('_', '-')}" for k, v in {**params, "experts": experts, "weights": weights, "base": base}.items() if v
        ]
        if given:
            _fail(ValueError(f"--config gives the method, models and parameters; drop {', '.join(given)}"))
    elif not experts:
        _fail(ValueError("give --experts (with --method) or --config merge.yml"))
    try:
        reg = _open(registry_path) if registry_path else None
        if config_path is not None:
            from moerge.composer.mergekit import load_merge_config, plan_merge

            plan = plan_merge(load_merge_config(Path(config_path)))
            base, names, method, w = plan["base"], plan["experts"], plan["method"], plan["weights"]
            params, dtype = plan["params"], plan["dtype"]
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
                **params,
            )
    except (KeyError, ValueError, OSError, RuntimeError) as exc:
        _fail(exc)
    report = json.loads((path / "moerge_merge.json").read_text())
    click.echo(f"merged {len(names)} experts with {method} into {path} ({report['output']}, {report['seconds']:.1f} s)")
    if report["refactor_error"]:
        auto = f" (auto: each module's smallest rank within {report['rank_tolerance']:g})" if report.get("module_ranks") else ""
        click.echo(f"rank-{report['rank']} re-factoring{auto}: max relative error {max(report['refactor_error'].values()):.3f}")


@main.group()
def retrieval() -> None:
    """Dense retrieval on any BEIR folder: build an index, evaluate an encoder."""


def _beir_index(data: str, encoder: str | None, split: str, rebuild: bool):  # noqa: ANN202
    from moerge.retrieval import Index, index_folder, load_beir

    corpus, queries, qrels = load_beir(data, split=split)
    folder = index_folder(data, encoder)
    if rebuild and folder.exists():
        import shutil

        shutil.rmtree(folder)
    t0 = time.perf_counter()
    index = Index.build_or_load(folder, corpus, encoder)
    return corpus, queries, qrels, index, folder, time.perf_counter() - t0


@retrieval.command("index")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="A BEIR folder.")
@click.option("--encoder", default=None, help="Sentence-transformers folder or hub id [default: the bundled all-MiniLM-L6-v2].")
@click.option("--split", default="test", show_default=True)
@click.option("--rebuild", is_flag=True, help="Rebuild even if a matching index is saved.")
def retrieval_index(data, encoder, split, rebuild) -> None:  # noqa: ANN001
    """Embed the corpus and save a faiss index beside it (DATA/.moerge-index/ENCODER)."""
    from moerge.retrieval import BeirFormatError

    try:
        corpus, _, _, index, folder, secs = _beir_index(data, encoder, split, rebuild)
    except (BeirFormatError, OSError, ValueError) as exc:
        _fail(exc)
    click.echo(f"{len(index)} documents indexed with {index.encoder_id} in {folder} ({secs:.1f} s)")


@retrieval.command("eval")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="A BEIR folder.")
@click.option("--encoder", default=None, help="Sentence-transformers folder or hub id [default: the bundled all-MiniLM-L6-v2].")
@click.option("--split", default="test", show_default=True)
@click.option("--k", default=100, show_default=True, type=click.IntRange(min=1), help="Documents retrieved per query.")
@click.option("--router", default=None, help="router_retriever: route each query to one of the registry's encoder experts.")
@click.option(
    "--registry", "registry_path", default=None, type=click.Path(file_okay=False), help="The experts' registry (with --router)."
)
@click.option(
    "--expert", "experts", multiple=True, help="Experts to route among (repeatable; default: every LoRA of this encoder)."
)
@click.option(
    "--pilots",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="BEIR folders (or a folder of them) whose train splits build RouterRetriever's pilots (repeatable; default: the pilots stored in the registry).",
)
@click.option("--set", "settings", multiple=True, help="Router setting KEY=VALUE (agg=max, sim=dot, ties=first, rebuild=true).")
@click.option("--json", "as_json", is_flag=True, help="Print the result (with per-query scores) as JSON.")
def retrieval_eval(data, encoder, split, k, router, registry_path, experts, pilots, settings, as_json) -> None:  # noqa: ANN001
    """nDCG@10 and recall@100 of an encoder on a BEIR folder's split (trec_eval, through pytrec_eval).

    With --router router_retriever: the base, every expert alone, and the routed encoder (each
    query embedded by the expert its pilots pick), with where the queries went."""
    from moerge.retrieval import BeirFormatError, evaluate

    if router is None:
        if registry_path or experts or pilots or settings:
            _fail(ValueError("--registry, --expert, --pilots and --set go with --router router_retriever"))
        try:
            _, queries, qrels, index, _, _ = _beir_index(data, encoder, split, False)
            result = evaluate(index.search(queries, k=k, encoder=encoder), qrels)
        except (BeirFormatError, OSError, ValueError) as exc:
            _fail(exc)
        if as_json:
            click.echo(json.dumps(result, indent=2))
            return
        click.echo("| encoder | queries | nDCG@10 | recall@100 |\n|---|---:|---:|---:|")
        click.echo(f"| {index.encoder_id} | {len(queries)} | {result['ndcg@10']:.4f} | {result['recall@100']:.4f} |")
        return
    if registry_path is None:
        _fail(ValueError("--router needs --registry: the registry that holds the encoder's LoRA experts"))
    from collections import Counter

    from moerge import compose
    from moerge.retrieval.encoder import encoder_experts

    _quiet_hf()
    try:
        reg = _open(registry_path)
        if experts:
            chosen = reg.select(names=list(experts))
        else:
            names = encoder_experts(reg, encoder)
            if not names:
                raise ValueError(f"registry {reg.root} has no LoRA experts for encoder {encoder or 'all-MiniLM-L6-v2'}")
            chosen = reg.select(names=names)
        _, queries, qrels, index, _, _ = _beir_index(data, encoder, split, False)
        enc = compose(
            encoder,
            chosen,
            router=router,
            registry=reg,
            data=_pilot_folders(pilots) or None,
            device="cpu",
            **_parse_config(settings),
        )
        texts = list(queries.values())
        rows = {"base": enc.embed(texts, "__base__")}
        for e in enc.experts:
            rows[f"expert {e}"] = enc.embed(texts, e)
        routes = enc.route(texts)
        rows[router] = enc.embed(texts)
        results = {name: evaluate(index.search(queries, k=k, embeddings=emb), qrels) for name, emb in rows.items()}
    except (BeirFormatError, OSError, ValueError, KeyError, TypeError) as exc:
        _fail(exc)
    went = Counter(r["expert"] for r in routes)
    if as_json:
        click.echo(json.dumps({"results": results, "routed": dict(went)}, indent=2))
        return
    click.echo(f"| {split} ({len(queries)} queries) | nDCG@10 | recall@100 |\n|---|---:|---:|")
    for name, res in results.items():
        click.echo(f"| {name} | {res['ndcg@10']:.4f} | {res['recall@100']:.4f} |")
    click.echo("routed: " + ", ".join(f"{e} {n}" for e, n in went.most_common()))
    if enc.computed:
        click.echo(f"pilots computed from {', '.join(enc.computed)} and stored in {reg.root}")


def _pilot_folders(folders: tuple[str, ...]) -> dict[str, str]:
    """--pilots folders by name: a BEIR folder, or a folder of BEIR folders (each one dataset)."""
    out = {}
    for f in folders:
        p = Path(f)
        subs = sorted(d for d in p.iterdir() if (d / "corpus.jsonl").is_file()) if not (p / "corpus.jsonl").is_file() else [p]
        if not subs:
            raise ValueError(f"--pilots {f}: neither a BEIR folder (corpus.jsonl) nor a folder of them")
        out.update({d.name: str(d) for d in subs})
    return out


@retrieval.command("suite")
@click.option("--preset", default="retrieval", show_default=True, type=click.Choice(["retrieval", "retrieval-small"]))
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Cache folder (env MOERGE_CACHE).")
@click.option("--rebuild", is_flag=True, help="Rebuild even if cached.")
@click.option("--path", "path_only", is_flag=True, help="Print only the suite's folder (for scripts).")
def retrieval_suite(preset, cache_dir, rebuild, path_only) -> None:  # noqa: ANN001
    """Build (or find) the embedded retrieval suite: six BEIR folders, their indexes, and the
    domain and multi-task query-encoder LoRAs in the suite's registry."""
    _quiet_hf()
    from moerge.zoo.retrieval import load_suite

    suite = load_suite(preset, cache_dir=cache_dir, rebuild=rebuild)
    if path_only:
        click.echo(suite.root)
        return
    click.echo(f"suite {preset} in {suite.root}")
    for d in suite.domains:
        click.echo(f"  {d:9s} {suite.data_path(d)}  " + ", ".join(f"{k} {v}" for k, v in suite.meta["sizes"][d].items()))
    click.echo(f"  registry {suite.root / 'registry'}: {', '.join(suite.experts)}")


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
    _quiet_hf()
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
    _quiet_hf()
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


@main.group()
def registry() -> None:
    """Add, list, show, remove and export experts."""


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
    _quiet_hf()
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
    _quiet_hf()
    try:
        path = _open(registry_path).export(name, dest, version=version, base=base)
    except (KeyError, FileExistsError, FileNotFoundError, ValueError) as exc:
        _fail(exc)
    click.echo(f"exported to {path}")


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
