"""``moerge bench real``: the methods on the real LM (SmolLM2-135M-Instruct from its GGUF) and the
real-language suite, through :func:`moerge.evaluate` like a user's own pool (issue 27).

The experts are built once and cached (:func:`moerge.zoo.real.build_pool`); the evaluator chooses
every hyper-parameter on the validation splits and caches its answers, so a rerun recomputes only
what changed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

#: the methods of a full run: baselines, routers, merges, and Symbolic-MoE over the experts as whole models
METHODS = ("base", "experts", "oracle", "phatgoose", "glider", "arrow", "retrieval", "average", "task_arithmetic", "ties", "twin",
           "symbolic_moe", "majority_vote", "best_single")  # fmt: skip


#: what ``moerge bench real`` runs unless told otherwise, so that a cold run fits an hour on 2 CPU
#: cores (docs/zoo.md): the first 16 validation and test prompts of each task, and PHATGOOSE's gates
#: (GLIDER trains the same) 30 steps of 8 prompts per expert — the library's default, 100 steps of
#: 32, costs about 2 h per router seed on that machine. ``--full`` drops both.
BUDGET_LIMIT = 16
BUDGET_GRID = ("phatgoose.steps=30", "phatgoose.batch_size=8", "glider.steps=30", "glider.batch_size=8")


def budget_grid(grid: Sequence[str]) -> list[str]:
    """``grid`` with :data:`BUDGET_GRID`'s settings added where it does not set them itself."""
    given = {g.split("=", 1)[0].strip() for g in grid}
    return list(grid) + [b for b in BUDGET_GRID if b.split("=", 1)[0] not in given]


def run(
    preset: Any = None,
    methods: Sequence[str] = METHODS,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    device: Any = "cpu",
    dtype: Any = "float32",
    batch_size: int = 32,
    out: str | Path | None = None,
    json_path: str | Path | None = None,
    progress: bool | None = None,
    grid: Sequence[str] | None = None,
) -> Any:
    """Build (or find) the experts, then score ``methods`` on the suite; returns the evaluator's
    report. ``grid``: ``METHOD.PARAM=V1,V2`` overrides, as ``moerge eval --set`` takes them (a
    router's own setting too, e.g. ``phatgoose.steps=30`` for a CPU budget).

    Symbolic-MoE's methods (``symbolic_moe``, ``majority_vote``, ``best_single``) run over the
    experts as whole models (:func:`moerge.zoo.real.whole_models`: each LoRA folded into the base)
    with the base as the aggregator unless ``symbolic_moe.aggregator`` names another; their rows
    join the table, normalised by the LoRA experts' own scores when those are scored too."""
    from moerge.evaluation import evaluate, load_task_set, write_report
    from moerge.evaluation.methods import resolve_methods
    from moerge.evaluation.report import method_row
    from moerge.zoo.real import WHOLE_BASE, build_pool, whole_models
    from moerge.zoo.real_tasks import TASKS

    specs = resolve_methods(list(methods))  # an unknown name is refused before any expert is trained
    symbolic = [m for m, spec in specs.items() if spec.family == "symbolic"]
    lora = [m for m in specs if m not in symbolic]
    pool = build_pool(preset, cache_dir=cache_dir, progress=progress)
    # a run on some experts: their tasks, and the held-out tasks drawing on those alone
    names = [t.name for t in TASKS if t.name in pool.experts or (t.uses and set(t.uses) <= set(pool.experts))]
    tasks = load_task_set(pool.tasks_path, names)
    grid = list(grid or [])
    sym_grid = [g for g in grid if g.split(".", 1)[0] in symbolic]
    common = dict(device=device, dtype=dtype, limit=limit, batch_size=batch_size, progress=progress)
    report = None
    if lora:
        report = evaluate(pool.registry_path, tasks, base=str(pool.gguf), methods=lora, grid=[g for g in grid if g not in sym_grid],
                          experts=pool.experts, expert_tasks={t: [t] for t in pool.experts},
                          cache_dir=pool.root / "eval-cache", **common)  # fmt: skip
    if symbolic:
        models = whole_models(pool, cache_dir=cache_dir, progress=progress)
        if not any(g.startswith("symbolic_moe.aggregator=") for g in sym_grid):
            sym_grid.append(f"symbolic_moe.aggregator={WHOLE_BASE}")
        sym = evaluate(pool.registry_path, tasks, methods=symbolic, grid=sym_grid, experts=models, **common)
        if report is None:
            report = sym
        else:  # one table: the whole models' rows normalised as the LoRA methods' are
            own = report.own_scores()
            for row in sym.rows:
                joined = method_row(row.name, row.per_task, report.held_in, report.held_out, own, row.notes)
                joined.test_prompts_in_preparation = row.test_prompts_in_preparation
                report.rows.append(joined)
            report.meta["symbolic"] = sym.meta["symbolic"] | {
                "matrix": sym.matrix,
                "seconds_total": sym.meta["seconds"]["total"],
                "folded_vs_lora": _folded_vs_lora(sym.matrix, report.matrix, report.held_in + report.held_out),
            }  # fmt: skip
    assert report is not None  # methods is never empty: resolve_methods refuses that
    report.meta["real"] = {"root": str(pool.root), "preset": asdict(pool.preset) | {"tasks": list(pool.experts)},
                           "experts": pool.meta.get("experts", {}), "descriptions": pool.meta.get("descriptions", {})}  # fmt: skip
    if out is not None:
        write_report(report, out, json_path)
    return report


def _folded_vs_lora(
    whole: dict[str, dict[str, float]], lora: dict[str, dict[str, float]], tasks: Sequence[str]
) -> dict[str, Any]:
    """How far each whole model (its LoRA folded into the base) scores from the same expert run as
    a LoRA on the base, over every task: the largest gap (points) and how many entries differ."""
    from moerge.zoo.real import WHOLE_PREFIX

    gaps = [abs(100 * (row[t] - lora[m.removeprefix(WHOLE_PREFIX)][t])) for m, row in whole.items()
            if m.removeprefix(WHOLE_PREFIX) in lora for t in tasks]  # fmt: skip
    return {"entries": len(gaps), "differ": sum(g > 0 for g in gaps), "max_gap": max(gaps, default=0.0)}


def _held_in_suite() -> Any:
    """The real suite's held-in tasks as ``moerge bench real`` exports them (seed 0), read into memory."""
    import tempfile

    from moerge.evaluation import load_task_set
    from moerge.zoo.real_tasks import HELD_IN, export_real_task_set

    with tempfile.TemporaryDirectory() as tmp:
        return load_task_set(export_real_task_set(Path(tmp) / "tasks", seed=0, tasks=HELD_IN))


def descriptions(
    seeds: Sequence[int] = (0, 1, 2),
    k: int = 3,
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """GLIDER's expert texts on the real suite, hand-written vs written by the base itself.

    For each seed the base (SmolLM2-135M-Instruct, un-adapted) is shown ``k`` training prompts
    of each held-in task, drawn with that seed, and writes the task's instruction
    (:class:`~moerge.routers.glider.HFDescriber`, spec §2.3). Each set of texts is scored by what
    GLIDER's global router does with it at a large α: every held-in validation and test prompt's
    user message is embedded (MiniLM) and sent to the expert whose text is nearest (top-1
    cosine); the accuracy is the share sent to its own task's expert. Neither the describer nor
    the texts see a validation or test prompt. Needs no trained expert."""
    import random
    import time

    import torch

    from moerge.bench.spread import mean_sd
    from moerge.composer.compose import load_base
    from moerge.progress import progress_bar
    from moerge.routers.embedding import DEFAULT_EMBEDDER, load_embedder
    from moerge.routers.glider import HFDescriber
    from moerge.zoo.real import base_folder, render_chat
    from moerge.zoo.real_tasks import HELD_IN, TASKS

    if not seeds or k < 1:
        raise ValueError(f"descriptions need at least one seed and k ≥ 1, got seeds={list(seeds)}, k={k}")
    t0 = time.perf_counter()
    ts = _held_in_suite()
    user = {(t, s): [e.query for e in ts.tasks[t].splits[s]] for t in HELD_IN for s in ("train", "validation", "test")}
    embedder = load_embedder(DEFAULT_EMBEDDER)
    queries = {s: torch.nn.functional.normalize(embedder.encode([q for t in HELD_IN for q in user[t, s]]), dim=-1)
               for s in ("validation", "test")}  # fmt: skip
    truth = {s: torch.tensor([i for i, t in enumerate(HELD_IN) for _ in user[t, s]]) for s in ("validation", "test")}

    def routed(texts: dict[str, str], against: dict[str, torch.Tensor] = queries) -> dict[str, float]:
        r = torch.nn.functional.normalize(embedder.encode([texts[t] for t in HELD_IN]), dim=-1)
        return {s: 100 * float(((against[s] @ r.T).argmax(-1) == truth[s]).float().mean()) for s in against}

    written = {t.name: t.description for t in TASKS if t.name in HELD_IN}
    base, tok = load_base(str(base_folder(cache_dir)), device="cpu", dtype="float32")
    # the same prompts as the evaluator hands them to a router today: rendered with the chat template
    # (its system prompt and markers around the user message)
    rendered = {s: torch.nn.functional.normalize(embedder.encode([render_chat(tok, e) for t in HELD_IN for e in ts.tasks[t].splits[s]]), dim=-1)
                for s in queries}  # fmt: skip
    describer = HFDescriber(base, tok, k=k)
    runs: dict[str, Any] = {}
    for seed in progress_bar(list(seeds), desc="descriptions by the base model", progress=progress):
        shown = {t: random.Random(f"describe:{t}:{seed}").sample(user[t, "train"], k) for t in HELD_IN}
        texts = {t: describer.describe(shown[t]) for t in HELD_IN}
        runs[str(seed)] = {"texts": texts, "shown": shown, "accuracy": routed(texts)}

    def spread(values: list[float]) -> dict[str, Any]:
        mean, sd = mean_sd(values)
        return {"mean": mean, "sd": sd, "values": values}

    return {
        "k": k,
        "seeds": list(seeds),
        "n": {s: len(truth[s]) for s in truth},
        "written": {"texts": written, "accuracy": routed(written), "accuracy_rendered_prompts": routed(written, rendered)},
        "model": {"runs": runs, "accuracy": {s: spread([r["accuracy"][s] for r in runs.values()]) for s in queries}},
        "seconds": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
    }


def descriptions_table(r: dict[str, Any]) -> str:
    """The markdown of :func:`descriptions`: routing accuracy per source of text, then the texts."""
    n, m = r["n"], r["model"]["accuracy"]
    seeds = len(r["seeds"])
    lines = [
        f"GLIDER's global router alone (top-1 cosine, user message vs expert text), held-in prompts; "
        f"n = {n['validation']} validation, {n['test']} test prompts; the model's texts: mean ± sd over {seeds} draws of "
        f"{r['k']} training prompts per task\n",
        "| expert texts | validation routing (%) | test routing (%) |",
        "|---|---:|---:|",
        f"| hand-written (the suite's) | {r['written']['accuracy']['validation']:.1f} | {r['written']['accuracy']['test']:.1f} |",
        f"| hand-written, query = the prompt rendered with the chat template | "
        f"{r['written']['accuracy_rendered_prompts']['validation']:.1f} | {r['written']['accuracy_rendered_prompts']['test']:.1f} |",
        f"| written by the base model | {m['validation']['mean']:.1f} ± {m['validation']['sd']:.1f} | "
        f"{m['test']['mean']:.1f} ± {m['test']['sd']:.1f} |",
        "",
        "| task | hand-written | written by the base model (first draw) |",
        "|---|---|---|",
    ]
    first = next(iter(r["model"]["runs"].values()))["texts"]
    for task, text in r["written"]["texts"].items():
        lines.append(f"| `{task}` | {text} | {first[task].replace('|', '/')} |")
    return "\n".join(lines)


def base_knowledge(
    limit: int | None = None, max_new_tokens: int = 32, batch_size: int = 16, cache_dir: str | Path | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:  # fmt: skip
    """What the base already knows of each held-in task's test answers, in any wording: its greedy
    answer to every test prompt (the suite's chat prompts, ``max_new_tokens``) scored by exact
    match — what ``moerge eval`` scores — and by "contains" (any accepted answer inside its
    sentence, both normalised as the suite says). An expert is trained on other entities than the
    test's, so it can teach the answer's form, and bring out what the base knows; the contains
    score bounds what that can reach."""
    import time

    import torch

    from moerge.composer.compose import load_base
    from moerge.evaluation.evaluate import _generate_plain
    from moerge.evaluation.metrics import metric_fn
    from moerge.progress import progress_bar
    from moerge.zoo.real import base_folder, render_chat
    from moerge.zoo.real_tasks import HELD_IN

    t0 = time.perf_counter()
    base, tok = load_base(str(base_folder(cache_dir)), device="cpu", dtype="float32")
    out: dict[str, Any] = {"tasks": {}, "max_new_tokens": max_new_tokens, "limit": limit}
    ts = _held_in_suite()
    for name in progress_bar(list(HELD_IN), desc="the base on each task", progress=progress):
        task = ts.tasks[name]
        examples = task.split("test")[:limit]
        prompts = [render_chat(tok, e) for e in examples]
        answers = [a.split("\n")[0] for a in _generate_plain(base, tok, prompts, max_new_tokens, batch_size)]
        scores = {m: metric_fn(m, task.spec.normalize) for m in ("exact_match", "contains")}
        out["tasks"][name] = {
            "n": len(examples),
            **{
                m: 100 * sum(f(a, e.targets) for a, e in zip(answers, examples, strict=True)) / len(examples)
                for m, f in scores.items()
            },
            "examples": [
                {"prompt": e.query, "answer": a, "targets": list(e.targets)}
                for e, a in list(zip(examples, answers, strict=True))[:3]
            ],
        }
    out["seconds"], out["threads"] = round(time.perf_counter() - t0, 1), torch.get_num_threads()
    return out


def knowledge_table(r: dict[str, Any]) -> str:
    """The markdown of :func:`base_knowledge`: one row per held-in task, with one answer shown."""
    lines = [
        f"The base alone on each held-in task's test prompts (greedy, up to {r['max_new_tokens']} tokens, first line)\n",
        "| task | n | exact match (%) | contains an answer (%) | e.g. asked | the base answered |",
        "|---|---:|---:|---:|---|---|",
    ]
    for task, v in r["tasks"].items():
        ex = v["examples"][0] if v["examples"] else {"prompt": "", "answer": ""}
        lines.append(
            f"| `{task}` | {v['n']} | {v['exact_match']:.1f} | {v['contains']:.1f} | {ex['prompt']} | {ex['answer'].replace('|', '/')} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ serving


def serving(
    preset: Any = None,
    concurrency: Sequence[int] = (1, 8, 32),
    requests: int = 32,
    router: str = "retrieval",
    replicas: int = 1,
    max_batch: int = 16,
    max_wait_ms: float = 20.0,
    threads: int | None = None,
    port: int = 8766,
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """The real LM's experts served by ``moerge serve``'s app and asked through the ``openai``
    client over loopback HTTP, as a user's application would: each held-in test question as a
    chat (the user message alone; the server renders the base's chat template). Per concurrency,
    ``requests`` questions (the tasks in turn) named to their own expert, then once more with
    ``model="auto"`` at the highest concurrency (the server's ``router`` reads the user message);
    every answer scored as ``moerge eval`` scores it (the task's metric, normalisation and stop
    strings), with requests/s, completion tokens/s and p50/p99 latency. The experts come from
    :func:`moerge.zoo.real.build_pool` (trained once, cached)."""
    import asyncio
    import os
    import statistics
    import time

    from openai import AsyncOpenAI

    from moerge.evaluation import load_task_set
    from moerge.evaluation.metrics import cut_at_stop, metric_fn
    from moerge.progress import progress_bar
    from moerge.runtime import ensure_ray
    from moerge.serving.app import deploy
    from moerge.zoo.real import build_pool

    if not concurrency or min(concurrency) < 1 or requests < 1:
        raise ValueError(f"concurrency levels and requests must be ≥ 1, got {list(concurrency)} and {requests}")
    pool = build_pool(preset, cache_dir=cache_dir, progress=progress)
    ts = load_task_set(pool.tasks_path, pool.experts)
    tests = {t: ts.tasks[t].split("test") for t in pool.experts}
    rows = [(t, tests[t][i // len(pool.experts)]) for i in range(requests) for t in [pool.experts[i % len(pool.experts)]]
            if i // len(pool.experts) < len(tests[t])]  # fmt: skip
    scorers = {t: metric_fn(ts.tasks[t].spec.metric, ts.tasks[t].spec.normalize) for t in pool.experts}
    bank = {t: [e.query for e in ts.tasks[t].split("train")] for t in pool.experts}  # retrieval's bank: user messages

    ensure_ray()
    t0 = time.perf_counter()
    dep = deploy(str(pool.registry_path), router=router, data=bank, port=port, name="moerge-bench-real", replicas=replicas,
                 max_batch=max_batch, max_wait_s=max_wait_ms / 1000, threads=threads)  # fmt: skip
    startup = time.perf_counter() - t0

    async def drive(model_of: Any, conc: int, rows: list[tuple[str, Any]] = rows) -> dict[str, Any]:
        client = AsyncOpenAI(base_url=f"{dep.url}/v1", api_key="unused", max_retries=0, timeout=600)
        sem = asyncio.Semaphore(conc)
        lat: list[float] = []
        out: list[dict[str, Any]] = []

        async def one(task: str, ex: Any) -> None:
            spec = ts.tasks[task].spec
            async with sem:
                t = time.perf_counter()
                r = await client.chat.completions.create(model=model_of(task), messages=[{"role": "user", "content": ex.query}],
                                                         max_tokens=spec.max_new_tokens, temperature=0)  # fmt: skip
                lat.append(time.perf_counter() - t)
            text = r.choices[0].message.content or ""
            experts = [e["name"] for e in (r.choices[0].model_extra or {}).get("experts", [])]
            out.append({"task": task, "question": ex.query, "answer": text, "tokens": r.usage.completion_tokens,
                        "right": scorers[task](cut_at_stop(text, spec.stop), ex.targets), "experts": experts})  # fmt: skip

        start = time.perf_counter()
        try:
            await asyncio.gather(*(one(t, e) for t, e in rows))
        finally:
            await client.close()
        wall = time.perf_counter() - start
        lat.sort()
        return {
            "requests": len(out),
            "concurrency": conc,
            "accuracy": round(100 * sum(o["right"] for o in out) / len(out), 1),
            "per_task": {t: round(100 * statistics.mean(o["right"] for o in out if o["task"] == t), 1) for t in pool.experts},
            "routed_to_own_expert": round(100 * statistics.mean(o["experts"][:1] == [o["task"]] for o in out), 1),
            "req_per_s": round(len(out) / wall, 2),
            "completion_tokens_per_s": round(sum(o["tokens"] for o in out) / wall, 1),
            "p50_s": round(lat[len(lat) // 2], 2),
            "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
            "examples": out[:3],
            "answers": out,
        }

    workloads = [("explicit", c) for c in sorted(set(concurrency))] + [(f"auto ({router})", max(concurrency))]
    results = []
    try:
        # warm-up, not measured: one question per expert loads every expert into the worker(s)
        asyncio.run(drive(lambda t: t, len(pool.experts), [(t, tests[t][-1]) for t in pool.experts]))
        for name, conc in progress_bar(workloads, desc="real LM over HTTP", progress=progress):
            model_of = (lambda t: t) if name == "explicit" else (lambda t: "auto")
            results.append({"workload": name, **asyncio.run(drive(model_of, conc))})
    finally:
        dep.shutdown()
    base = next(r["req_per_s"] for r in results if r["workload"] == "explicit" and r["concurrency"] == min(concurrency))
    for r in results:
        r["vs_lowest_concurrency"] = round(r["req_per_s"] / base, 2)
    # the same questions answered in this process by PEFT (each expert's adapter on the base,
    # greedy, through the chat template): what the server should have said
    reference = _peft_answers(pool, rows, ts, progress)
    for r in results:
        same = [" ".join(a["answer"].split()) == " ".join(reference[a["question"], a["task"]].split()) for a in r["answers"]]
        r["same_as_peft"] = f"{sum(same)}/{len(same)}"
        del r["answers"]
    return {"experts": pool.experts, "pool": str(pool.root), "startup_s": round(startup, 1), "router": router,
            "replicas": replicas, "max_batch": max_batch, "max_wait_ms": max_wait_ms, "threads": threads,
            "cpus": os.cpu_count(), "rows": results}  # fmt: skip


def _peft_answers(pool: Any, rows: Sequence[tuple[str, Any]], ts: Any, progress: bool | None) -> dict[tuple[str, str], str]:
    """(question, task) → the answer of PEFT's ``PeftModel`` with that task's expert, greedy, one
    batch per expert (left padding), through the base's chat template."""
    import torch
    from peft import PeftModel

    from moerge.composer.compose import load_base
    from moerge.progress import progress_bar

    base, tok = load_base(str(pool.gguf), device="cpu", dtype="float32")
    tok.padding_side = "left"
    model = None
    out: dict[tuple[str, str], str] = {}
    for task in progress_bar(list(dict.fromkeys(t for t, _ in rows)), desc="PEFT reference", progress=progress):
        folder = str(pool.root / "lora" / task)
        if model is None:
            model = PeftModel.from_pretrained(base, folder, adapter_name=task).eval()
        else:
            model.load_adapter(folder, adapter_name=task)
        model.set_adapter(task)
        exs = [e for t, e in rows if t == task]
        chats = [[{"role": "user", "content": e.query}] for e in exs]  # the conversation the client sent
        enc = tok(
            [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats],
            return_tensors="pt",
            padding=True,
        )  # fmt: skip  (encoded as the server encodes a prompt)
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=ts.tasks[task].spec.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)  # fmt: skip
        for e, row in zip(exs, ids[:, enc["input_ids"].shape[1] :], strict=True):
            out[e.query, task] = tok.decode(row, skip_special_tokens=True)
    return out


def serving_table(r: dict[str, Any]) -> str:
    """The markdown of :func:`serving`: one row per workload."""
    lines = [
        f"The real LM served ({len(r['experts'])} experts, {r['replicas']} worker(s), batches up to {r['max_batch']}; "
        f"app start {r['startup_s']} s), asked with the openai client over loopback HTTP\n",
        "| workload | concurrency | n | exact match (%) | same answer as PEFT | routed to its own expert (%) | req/s | ×lowest | completion tok/s | p50 s | p99 s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in r["rows"]:
        lines.append(
            f"| {w['workload']} | {w['concurrency']} | {w['requests']} | {w['accuracy']:.1f} | {w.get('same_as_peft', '–')} | {w['routed_to_own_expert']:.1f} | "
            f"{w['req_per_s']:.2f} | {w['vs_lowest_concurrency']:.2f} | {w['completion_tokens_per_s']:.1f} | {w['p50_s']:.2f} | {w['p99_s']:.2f} |"
        )
    return "\n".join(lines)
