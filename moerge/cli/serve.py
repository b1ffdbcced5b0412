"""``moerge serve``: the OpenAI-style HTTP app on Ray (generation, embeddings, Symbolic-MoE)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import click

from moerge.cli.options import (
    COMPOSITION_OPTION,
    CONFIG_FILE_OPTION,
    NO_SOURCE,
    THREADS_OPTION,
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
    "--chat-template",
    default=None,
    type=click.Path(dir_okay=False, exists=True),
    help="A Jinja chat template file for /v1/chat/completions [default: the base tokenizer's own].",
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
    chat_template,
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
    /v1/completions, /v1/chat/completions; GET /v1/experts, /healthz). With --embeddings: an encoder's experts
    (POST /v1/embeddings, /v1/search; GET /v1/models, /healthz). With --symbolic: Symbolic-MoE
    over whole models (model "symbolic-moe"; questions arriving within --max-wait-ms are recruited
    together and answered batch-by-model)."""
    quiet_hf()
    symbolic_given = [n for n, v in (("--validation", validation), ("--skills", skills), ("--annotator", annotator),
                                     ("--aggregator", aggregator), ("--model", symbolic_models)) if v]  # fmt: skip
    if chat_template and (embeddings or symbolic):
        _fail(ValueError("--chat-template goes with the generation server (not --embeddings or --symbolic)"))
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
            chat_template=Path(chat_template).read_text() if chat_template else None,
        )
        click.echo("starting Ray Serve and loading workers …", err=True)
        from moerge.runtime import ensure_ray

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
        from moerge.runtime import ensure_ray

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
        from moerge.runtime import ensure_ray

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
    if os.environ.get("RAY_ADDRESS"):  # on a cluster the app would outlive this process: delete it there
        ray_serve.shutdown()
    # Every request is answered or given up on by now. The drain's own handle calls above leave Ray
    # Serve a callback per answered call (it advances the reply's generator once its value is ready);
    # when one fires while Ray shuts down, Serve logs a stack trace for a call that had already
    # returned (seen once in CI, under load). Nothing of ours is left to report, so Serve's driver-side
    # logger is quietened for the teardown; the workers' own lines still reach this console.
    logging.getLogger("ray.serve").setLevel(logging.CRITICAL)
    # a local Ray (ensure_ray started it for this process): stopping it stops the app and its workers
    # with it, the requests in flight being answered above (Serve's own shutdown first took ~3 s more)
    ray.shutdown()
    click.echo("stopped", err=True)
