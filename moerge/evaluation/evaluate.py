"""``moerge.evaluate``: score a registry's LoRA experts on a task set with every method —
base, each expert, the oracle, the routers, the static merges and Twin-Merging — choosing every
hyper-parameter on the validation split and preparing routers from the train split only.

Everything the table needs is cached by :class:`~moerge.evaluation.cache.ScoreCache` per
(method, settings, expert versions, base, task file, split), so a rerun after registering one
more expert computes that expert's rows and the methods that include it, and nothing else."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from moerge.evaluation.cache import ScoreCache
from moerge.evaluation.methods import METHODS, MethodSpec, call_params, parse_grid_overrides, resolve_methods, shown
from moerge.evaluation.metrics import cut_at_stop, metric_fn
from moerge.evaluation.report import MethodRow, QualityReport, method_row, plot_matrix
from moerge.evaluation.tasks import Task, TaskSet, load_task_set
from moerge.progress import progress_bar
from moerge.registry import ExpertRecord, Registry
from moerge.registry.files import config_hash

log = logging.getLogger(__name__)

#: held-in test prompts per task for routing accuracy
ROUTING_EXAMPLES = 50

#: ``routing(spec, composed, prompts)`` → ``{"accuracy": float, ...}``: a routing accuracy of
#: your own for the chosen composition (``prompts``: each held-in task's test prompts); what
#: else it returns lands in ``meta.methods.<name>.routing``. Not cached: it always builds.
RoutingHook = Callable[[MethodSpec, Any, dict[str, list[str]]], dict[str, Any]]


class EvaluationError(ValueError):
    """A pool or task set that cannot be evaluated as asked: the message says what and how to fix it."""


def _records(reg: Registry, experts: Sequence[str] | None) -> list[ExpertRecord]:
    if experts is None:
        records = reg.list(kind="lora")
        if not records:
            raise EvaluationError(f"the registry at {reg.root} has no LoRA expert to evaluate")
        return records
    records = [reg._resolve(e) for e in experts]
    not_lora = [f"{r.ref} ({r.kind})" for r in records if r.kind != "lora"]
    if not_lora:
        raise EvaluationError(f"moerge eval composes LoRA experts; these are not: {', '.join(not_lora)}")
    if not records:
        raise EvaluationError("no expert to evaluate")
    return records


def _check_base(records: Sequence[ExpertRecord], base: str | None) -> tuple[str, str | None]:
    """The base to evaluate on, and its config fingerprint; an expert registered for another base
    is named here, before any model loads."""
    from moerge.registry.importers import resolve_base

    if base is None:
        bases: dict[str, list[str]] = {}
        for r in records:
            bases.setdefault(str(r.base_model), []).append(r.ref)
        if len(bases) != 1 or "None" in bases:
            listing = "; ".join(f"{b}: {', '.join(refs)}" for b, refs in bases.items())
            raise EvaluationError(f"the experts do not name one common base ({listing}); pass base= (--base) or pick experts")
        base = next(iter(bases))
    info = resolve_base(base, required=True)
    assert info is not None
    wrong = [
        f"{r.ref} (base {r.base_model})"
        for r in records
        if r.base_fingerprint and info.fingerprint and r.base_fingerprint != info.fingerprint
    ]
    if wrong:
        raise EvaluationError(
            f"{', '.join(wrong)} {'was' if len(wrong) == 1 else 'were'} registered for another base model than {base} "
            f"(config fingerprint {info.fingerprint}); leave {'it' if len(wrong) == 1 else 'them'} out with experts= (--expert) or pass that base"
        )
    return info.id, info.fingerprint


def _files_signature(base: str) -> list[tuple[str, int, int]]:
    """Size and modification time of a local base's weight files (its weights' identity in the cache key)."""
    folder = Path(base)
    if not folder.is_dir():
        return []
    return [
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.iterdir())
        if p.suffix in (".safetensors", ".bin", ".gguf")
    ]


class _Pool:
    """The pool's experts, their tasks and the task set, rendered to prompts once."""

    def __init__(self, reg: Registry, records: list[ExpertRecord], tasks: TaskSet, render: Callable[[Any], str] | None,
                 limit: int | None, expert_tasks: Mapping[str, Sequence[str]] | None = None) -> None:  # fmt: skip
        self.reg, self.records, self.tasks = reg, records, tasks
        self.names = [r.name for r in records]
        self.limit = limit
        #: expert → the tasks it was trained on (the registry's tags unless ``expert_tasks`` says)
        self.trained = {r.name: list((expert_tasks or {}).get(r.name, r.tasks)) for r in records}
        self.own: dict[str, list[str]] = {t: [n for n in self.names if t in self.trained[n]] for t in tasks.tasks}
        self.prompts: dict[tuple[str, str], list[str]] = {}
        #: what GLIDER embeds for each prompt: a chat example's user message (measured on the real
        #: suite: queries rendered with the chat template's system prompt routed 70.9 % of held-in
        #: test prompts to their own expert, the user messages 98.4 %); None for plain prompts
        self.queries: dict[tuple[str, str], list[str | None]] = {}
        self.targets: dict[tuple[str, str], list[tuple[str, ...]]] = {}
        for name, task in tasks.tasks.items():
            for split in ("train", "validation", "test"):
                examples = task.split(split)
                if split != "train" and limit is not None:
                    examples = examples[:limit]
                self.prompts[name, split] = [e.render(render) for e in examples]
                self.queries[name, split] = [e.query for e in examples]
                self.targets[name, split] = [e.targets for e in examples]

    def check(self, specs: Mapping[str, MethodSpec]) -> None:
        missing = [t for t in self.tasks.held_in if not self.own[t]]
        if missing:
            raise EvaluationError(
                f"held-in task{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                f"{'have' if len(missing) > 1 else 'has'} no expert in the pool (the oracle and the normalisation need one): "
                f"tag the expert trained on it (moerge registry tag NAME --task {missing[0]}; Registry.tag) or make it held_out"
            )
        leaked = [f"{t} ({', '.join(self.own[t])})" for t in self.tasks.held_out if self.own[t]]
        if leaked:
            raise EvaluationError(
                f"held-out task(s) {', '.join(leaked)} have experts trained on them; a held-out task is one no expert saw: "
                "make it held_in or untag the expert"
            )
        needs = [m for m, spec in specs.items() if spec.uses_data]
        if needs:
            for r in self.records:
                if not self.data(r.name):
                    known = [t for t in self.trained[r.name] if t in self.tasks.tasks]
                    why = (
                        f"its tasks {known} have no train.jsonl"
                        if known
                        else f"it is tagged with no task of this set (its tasks: {self.trained[r.name] or 'none'})"
                    )
                    raise EvaluationError(
                        f"{', '.join(needs)} {'is' if len(needs) == 1 else 'are'} prepared from each expert's training "
                        f"examples, and expert {r.ref} has none: {why}. Tag it (moerge registry tag {r.name} --task T) "
                        "or leave those methods out"
                    )

    def data(self, expert: str) -> list[tuple[str, str]]:
        """(prompt, target) pairs from the train splits of the expert's tasks: what routers are prepared from."""
        out = []
        for t in self.trained[expert]:
            if t in self.tasks.tasks:
                out += [(p, ts[0]) for p, ts in zip(self.prompts[t, "train"], self.targets[t, "train"], strict=True)]
        return out

    def data_key(self) -> dict[str, list[str]]:
        return {
            n: [f"{t}:{self.tasks[t].hashes.get('train')}" for t in ts if t in self.tasks.tasks] for n, ts in self.trained.items()
        }

    def pool_key(self) -> list[list[str]]:
        return [[r.ref, r.files.get("adapter_model.safetensors", json.dumps(r.files, sort_keys=True))] for r in self.records]

    def score(self, task: str, split: str, answers: Sequence[str]) -> float:
        spec = self.tasks[task].spec
        fn = metric_fn(spec.metric, spec.normalize)
        targets = self.targets[task, split]
        if not targets:
            return 0.0
        return sum(fn(a, t) for a, t in zip(answers, targets, strict=True)) / len(targets)


def _chat_renderer(base: str, tasks: TaskSet) -> Callable[[Any], str] | None:
    if not any(e.messages for t in tasks.tasks.values() for s in t.splits.values() for e in s):
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if not getattr(tok, "chat_template", None):
        return None

    def render(messages: list[dict[str, str]]) -> str:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return render


@torch.inference_mode()
def _generate_plain(model: Any, tok: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> list[str]:
    from moerge.composer.compose import decode_text, encode_prompts
    from moerge.device import module_device

    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = encode_prompts(tok, prompts[i : i + batch_size], module_device(model))
        gen = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
        )
        out += [decode_text(tok, row, collapse_whitespace=False) for row in gen[:, enc["input_ids"].shape[1] :]]
    return out


def _routing_accuracy(
    composed: Any, prompts: Sequence[str], allowed: torch.Tensor, queries: Sequence[str] | None = None
) -> float:
    """Share of prompt tokens × modules whose top-1 expert is one trained on the prompt's task
    (``allowed``: [B, E] bool; ``queries``: GLIDER's per-prompt query texts)."""
    top, mask = composed.token_routing(list(prompts), None if queries is None else list(queries))  # [M, B, T], [B, T]
    hit = allowed[torch.arange(top.shape[1])[None, :, None], top]  # [M, B, T]
    m = mask[None].expand_as(hit)
    return float((hit & m).sum() / m.sum().clamp(min=1))


class _Run:
    """One evaluation: the cache, the lazily built models and the bookkeeping of what was computed."""

    def __init__(self, pool: _Pool, specs: Mapping[str, MethodSpec], base: str, fingerprint: str | None, device: Any, dtype: Any,
                 cache: ScoreCache, batch_size: int, progress: bool | None, routing: RoutingHook | None = None) -> None:  # fmt: skip
        from moerge.device import resolve_device, resolve_dtype

        self.pool, self.specs, self.base, self.cache = pool, specs, base, cache
        self.batch_size, self.progress, self.routing_hook = batch_size, progress, routing
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.common = {
            "base": base, "base_fingerprint": fingerprint, "base_files": _files_signature(base),
            "device": self.device.type, "dtype": str(self.dtype), "limit": pool.limit,
        }  # fmt: skip
        self.computed: list[str] = []
        self.seconds: dict[str, float] = {}

    def task_key(self, task: str, split: str) -> dict[str, Any]:
        t: Task = self.pool.tasks[task]
        return {
            "task": task,
            "split": split,
            "file": t.hashes.get(split),
            "max_new_tokens": t.spec.max_new_tokens,
            "stop": t.spec.stop,
        }

    def key(self, what: dict[str, Any], task: str, split: str) -> dict[str, Any]:
        return {**self.common, **what, **self.task_key(task, split)}

    def answers(self, task: str, split: str, raw: Sequence[str]) -> list[str]:
        return [cut_at_stop(a, self.pool.tasks[task].spec.stop) for a in raw]

    # --------------------------------------------------------------- base and experts
    def matrix(self, tasks: Sequence[str]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """Base and every expert on every task's test split, in one mixed-expert batch per task
        (rows routed one-hot through the multi-expert layer); only missing entries are generated."""
        from moerge.adapters import attach, detach, load_lora, one_hot, use_weights
        from moerge.composer.compose import load_base

        pool = self.pool
        E = len(pool.names)
        refs = pool.pool_key()
        keys = {(-1, t): self.key({"method": "base"}, t, "test") for t in tasks}
        keys.update({(e, t): self.key({"method": "expert", "expert": refs[e]}, t, "test") for e in range(E) for t in tasks})
        got = {k: self.cache.get(v) for k, v in keys.items()}
        todo = [k for k, v in got.items() if v is None]
        if todo:
            t0 = time.perf_counter()
            model, tok = load_base(self.base, device=self.device, dtype=self.dtype)
            attach(model, [load_lora(r, registry=pool.reg, device=self.device) for r in pool.records])
            try:
                for task in progress_bar(tasks, desc="base and experts", progress=self.progress):
                    rows = [k[0] for k in todo if k[1] == task]
                    if not rows:
                        continue
                    prompts = pool.prompts[task, "test"]
                    n = len(prompts)
                    batch, assign = prompts * len(rows), [e for e in rows for _ in range(n)]
                    raw: list[str] = []
                    for i in range(0, len(batch), self.batch_size):
                        with use_weights(model, one_hot(assign[i : i + self.batch_size], E).to(self.device)):
                            raw += _generate_plain(
                                model,
                                tok,
                                batch[i : i + self.batch_size],
                                self.pool.tasks[task].spec.max_new_tokens,
                                self.batch_size,
                            )
                    for j, e in enumerate(rows):
                        value = {"answers": self.answers(task, "test", raw[j * n : (j + 1) * n])}
                        self.cache.put(keys[e, task], value)
                        got[e, task] = value
                        self.computed.append(f"{'base' if e < 0 else 'expert:' + pool.names[e]}/{task}/test")
            finally:
                detach(model)
                del model
            self.seconds["base and experts"] = time.perf_counter() - t0
        base = {t: pool.score(t, "test", got[-1, t]["answers"]) for t in tasks}
        matrix = {pool.names[e]: {t: pool.score(t, "test", got[e, t]["answers"]) for t in tasks} for e in range(E)}
        return base, matrix

    # --------------------------------------------------------------- methods with a grid
    @contextmanager
    def _builder(self, method: str, params: dict[str, Any]) -> Iterator[Callable[[], Any]]:
        """A function building the method's model for ``params`` on first call (None: nothing built)."""
        built: list[Any] = []

        def get() -> Any:
            if not built:
                built.append(self._build(method, params))
            return built[0]

        try:
            yield get
        finally:
            built.clear()

    def _build(self, method: str, params: dict[str, Any]) -> Any:
        from moerge.composer import compose, merge

        pool = self.pool
        spec = self.specs[method]
        sel = pool.reg.select(names=[r.ref for r in pool.records])
        kwargs = call_params(spec, params)
        t0 = time.perf_counter()
        if spec.family in ("router", "twin"):
            data = {n: pool.data(n) for n in pool.names} if spec.uses_data else None
            router = "twin" if spec.family == "twin" else spec.runs
            built = compose(
                self.base, sel, router, data=data, progress=self.progress, device=self.device, dtype=self.dtype, **kwargs
            )
        elif spec.family == "adamerging":
            from moerge.composer.adamerging import adamerging

            inputs = {t: pool.prompts[t, "validation"] for t in self._all_tasks if pool.prompts[t, "validation"]}
            model = adamerging(self.base, sel, inputs, output="model", device=self.device, dtype=self.dtype,
                               progress=self.progress, **kwargs)  # fmt: skip
            built = (model, model.tokenizer)
        else:
            from transformers import AutoTokenizer

            model = merge(self.base, sel, spec.runs, output="model", device=self.device, progress=self.progress, **kwargs)
            model = model.to(device=self.device, dtype=self.dtype).eval()
            built = (model, AutoTokenizer.from_pretrained(self.base))  # encode_prompts pads it on the left
        self.seconds[f"{method} build"] = self.seconds.get(f"{method} build", 0.0) + time.perf_counter() - t0
        return built

    def _generate(self, built: Any, method: str, params: dict[str, Any], task: str, split: str) -> list[str]:
        spec = self.specs[method]
        prompts = self.pool.prompts[task, split]
        n_new = self.pool.tasks[task].spec.max_new_tokens
        if spec.family in ("merge", "adamerging"):
            model, tok = built
            return _generate_plain(model, tok, prompts, n_new, self.batch_size)
        return self._live(built, method, params).generate(
            prompts,
            self._queries(method, [(task, split, None)]),
            max_new_tokens=n_new,
            batch_size=self.batch_size,
            collapse_whitespace=False,
        )

    def _live(self, built: Any, method: str, params: dict[str, Any]) -> Any:
        """The composition with the grid point's routing-time settings (α, top-k) applied."""
        live = {k: v for k, v in params.items() if k in self.specs[method].live}
        if live:
            built.router.config = built.router.config.model_copy(update=live)
        return built

    def method_key(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        spec = self.specs[method]
        key: dict[str, Any] = {
            "method": spec.runs,
            "family": spec.family,
            "params": call_params(spec, params),
            "pool": self.pool.pool_key(),
        }
        if spec.uses_data:
            key["data"] = self.pool.data_key()
        if spec.family == "adamerging":  # learnt on every task's unlabeled validation prompts
            key["inputs"] = {t: self.pool.tasks[t].hashes.get("validation") for t in self._all_tasks}
        if spec.runs == "glider" and self._chat:
            key["query"] = "user message"  # answers cached before chat queries were embedded alone are not reused
        return key

    @property
    def _all_tasks(self) -> list[str]:
        return self.pool.tasks.held_in + self.pool.tasks.held_out

    @property
    def _chat(self) -> bool:
        return any(q is not None for qs in self.pool.queries.values() for q in qs)

    def _queries(self, method: str, prompts_of: Sequence[tuple[str, str, int | None]]) -> list[str] | None:
        """GLIDER's per-input query texts for (task, split, first n) prompts: each chat example's user
        message, each plain prompt itself; None for other methods or a pool of plain prompts."""
        if self.specs[method].runs != "glider" or not self._chat:
            return None
        out: list[str] = []
        for task, split, n in prompts_of:
            pairs = list(zip(self.pool.prompts[task, split], self.pool.queries[task, split], strict=True))[:n]
            out += [q if q is not None else p for p, q in pairs]
        return out

    def run_method(self, method: str, overrides: Mapping[str, Sequence[Any]] | None) -> dict[str, Any]:
        """Choose the grid point on validation (held-in tasks), then score it on every test split."""
        pool, spec = self.pool, self.specs[method]
        points = spec.points(overrides)
        if spec.family == "lorahub":
            return self._per_task(method, points)
        val_tasks = [t for t in pool.tasks.held_in if pool.prompts[t, "validation"]]
        t0 = time.perf_counter()
        out: dict[str, Any] = {"grid": {k: list(v) for k, v in {**spec.grid, **(overrides or {})}.items()}}
        if len(points) > 1 and not val_tasks:
            out["skipped"] = (
                f"no validation data to choose {', '.join(out['grid'])} from {len(points)} grid points: give the held-in "
                "tasks a validation.jsonl, or set one value per hyper-parameter"
            )
            return out
        # group grid points that share one build (they differ only in settings read at routing time)
        groups: dict[str, list[dict[str, Any]]] = {}
        for p in points:
            groups.setdefault(
                json.dumps({k: v for k, v in p.items() if k not in spec.live}, sort_keys=True, default=str), []
            ).append(p)
        tried = []
        if len(points) > 1:
            for group in groups.values():
                with self._builder(method, group[0]) as get:
                    for p in group:
                        scores = {
                            t: pool.score(t, "validation", self._cached(get, method, p, t, "validation")) for t in val_tasks
                        }
                        tried.append({"params": p, "validation": scores, "mean": sum(scores.values()) / len(scores)})
            chosen = max(tried, key=lambda x: x["mean"])["params"]  # max keeps the first of equals: grid order
        else:
            chosen = points[0]
        out["validation"] = tried
        out["chosen"] = chosen
        with self._builder(method, chosen) as get:
            tasks = self._all_tasks
            answers = {
                t: self._cached(get, method, chosen, t, "test")
                for t in progress_bar(tasks, desc=spec.label, progress=self.progress)
            }
            out["per_task"] = {t: pool.score(t, "test", a) for t, a in answers.items()}
            if spec.family in ("router", "twin") and self.routing_hook is not None:
                held_in = {t: pool.prompts[t, "test"] for t in pool.tasks.held_in}
                out["routing"] = self.routing_hook(spec, self._live(get(), method, chosen), held_in)
                out["routing_accuracy"] = out["routing"]["accuracy"]
            elif spec.family in ("router", "twin"):
                out["routing_accuracy"] = self._routing(get, method, chosen)
            if spec.family == "adamerging":
                key = {**self.common, **self.method_key(method, chosen), "what": "coefficients"}
                learnt = self.cache.get(key)
                if learnt is None:
                    rep = get()[0].adamerging_report
                    learnt = {"coefficients": rep.coefficients, "entropy": [rep.entropy[0], rep.entropy[-1]]}
                    self.cache.put(key, learnt)
                out["learnt"] = learnt
            if spec.family == "twin":
                key = {**self.common, **self.method_key(method, chosen), "what": "stored"}
                stored = self.cache.get(key)
                if stored is None:
                    stored = dict(get().router.stored)
                    self.cache.put(key, stored)
                out["stored"] = stored
        self.seconds[method] = time.perf_counter() - t0
        return out

    def _per_task(self, method: str, points: list[dict[str, Any]]) -> dict[str, Any]:
        """A method prepared per task from that task's first validation examples (LoRAHub): one
        model per task, scored on its test split. Its settings are fixed: the validation
        examples it learns from leave no split to choose them on."""
        from moerge.composer.lorahub import lorahub

        pool, spec = self.pool, self.specs[method]
        t0 = time.perf_counter()
        out: dict[str, Any] = {"grid": {}, "validation": [], "chosen": points[0]}
        if len(points) > 1:
            out["skipped"] = (
                f"{spec.label} learns from each task's validation examples, which leaves no split to choose its settings "
                "on: give one value per setting"
            )
            return out
        tasks = self._all_tasks
        bare = [t for t in tasks if not pool.prompts[t, "validation"]]
        if bare:
            out["skipped"] = (
                f"{spec.label} learns each task's weights from its validation examples; these tasks have none: {bare}"
            )
            return out
        params = call_params(spec, points[0])
        shots = int(params.pop("shots"))
        sel = pool.reg.select(names=[r.ref for r in pool.records])
        out["per_task"], out["weights"], out["loss"] = {}, {}, {}
        for t in progress_bar(tasks, desc=spec.label, progress=self.progress):
            examples = [(p, ts[0]) for p, ts in zip(pool.prompts[t, "validation"], pool.targets[t, "validation"], strict=True)]
            examples = examples[:shots]
            key = self.key({**self.method_key(method, points[0]), "examples": config_hash(examples)}, t, "test")
            hit = self.cache.get(key)
            if hit is None:
                tb = time.perf_counter()
                model = lorahub(self.base, sel, examples, output="model", device=self.device, dtype=self.dtype,
                                progress=False, **params)  # fmt: skip
                rep = model.lorahub_report
                self.seconds[f"{method} build"] = self.seconds.get(f"{method} build", 0.0) + time.perf_counter() - tb
                raw = _generate_plain(model, model.tokenizer, pool.prompts[t, "test"], pool.tasks[t].spec.max_new_tokens,
                                      self.batch_size)  # fmt: skip
                hit = {"answers": self.answers(t, "test", raw), "weights": rep.weights,
                       "loss": {"at_zero": rep.loss_at_zero, "at_weights": rep.loss}}  # fmt: skip
                del model
                self.cache.put(key, hit)
                self.computed.append(f"{method}[{shown(points[0]) or '-'}]/{t}/test")
            out["per_task"][t] = pool.score(t, "test", hit["answers"])
            out["weights"][t], out["loss"][t] = hit["weights"], hit["loss"]
        self.seconds[method] = time.perf_counter() - t0
        return out

    def _cached(self, get: Callable[[], Any], method: str, params: dict[str, Any], task: str, split: str) -> list[str]:
        key = self.key(self.method_key(method, params), task, split)
        hit = self.cache.get(key)
        if hit is None:
            hit = {"answers": self.answers(task, split, self._generate(get(), method, params, task, split))}
            self.cache.put(key, hit)
            self.computed.append(f"{method}[{shown(params) or '-'}]/{task}/{split}")
        return hit["answers"]

    def _routing(self, get: Callable[[], Any], method: str, params: dict[str, Any]) -> float:
        pool = self.pool
        key = {**self.common, **self.method_key(method, params), "what": "routing", "n": ROUTING_EXAMPLES,
               "tasks": [self.task_key(t, "test") for t in pool.tasks.held_in]}  # fmt: skip
        hit = self.cache.get(key)
        if hit is None:
            prompts, allowed = [], []
            for t in pool.tasks.held_in:
                ps = pool.prompts[t, "test"][:ROUTING_EXAMPLES]
                prompts += ps
                allowed += [[n in pool.own[t] for n in pool.names]] * len(ps)
            built = self._live(get(), method, params)
            queries = self._queries(method, [(t, "test", ROUTING_EXAMPLES) for t in pool.tasks.held_in])
            hit = {"accuracy": _routing_accuracy(built, prompts, torch.tensor(allowed), queries)}
            self.cache.put(key, hit)
            self.computed.append(f"{method}[{shown(params) or '-'}]/routing")
        return hit["accuracy"]


def _leaks(pool: _Pool, spec: MethodSpec) -> int:
    """How many test prompts occur in what a method is prepared from: the experts' training
    prompts (routers trained on them) and, for GLIDER, the expert descriptions."""
    tests = [p for t in pool.tasks.tasks for p in pool.prompts[t, "test"]]
    prep: set[str] = set()
    if spec.uses_data:
        prep = {p for n in pool.names for p, _ in pool.data(n)}
    texts = [r.description for r in pool.records] if spec.runs == "glider" else []
    return sum(p in prep or any(p in x for x in texts) for p in tests)


def _bytes(pool: _Pool) -> tuple[int, int]:
    """(every expert's LoRA factors, one dense ΔW per module) in fp32 bytes."""
    from moerge.adapters import load_lora

    loras = [load_lora(r, registry=pool.reg) for r in pool.records]
    experts = 4 * sum(f.A.numel() + f.B.numel() for e in loras for f in e.modules.values())
    shapes = {m: (f.B.shape[0], f.A.shape[1]) for e in loras for m, f in e.modules.items()}
    return experts, 4 * sum(a * b for a, b in shapes.values())


def evaluate(
    registry: Registry | str | Path,
    tasks: TaskSet | str | Path,
    *,
    base: str | None = None,
    methods: Sequence[str] | str | None = None,
    grid: Mapping[str, Sequence[Any]] | Sequence[str] | None = None,
    experts: Sequence[str] | None = None,
    device: Any = "auto",
    dtype: Any = "auto",
    limit: int | None = None,
    out: str | Path | None = None,
    json_path: str | Path | None = None,
    cache_dir: str | Path | None = "auto",
    batch_size: int = 64,
    progress: bool | None = None,
    expert_tasks: Mapping[str, Sequence[str]] | None = None,
    routing: RoutingHook | None = None,
) -> QualityReport:
    """Score the registry's LoRA experts (or ``experts``) on the task set at ``tasks`` with
    ``methods`` (default: all of :data:`~moerge.evaluation.methods.METHODS`) and return the table.

    Every hyper-parameter is chosen from its declared grid (``grid`` overrides axes:
    ``{"glider.alpha": [1, 10, 100]}`` or ``["glider.alpha=1,10,100"]``) by the mean score over the
    held-in tasks' validation splits; routers are prepared from the train splits of each expert's
    tasks (``Registry.register(..., tasks=[...])`` / :meth:`Registry.tag`). ``limit``: the first
    N validation and test examples per task. ``out``: write ``report.md``, ``results.json`` (or
    ``json_path``) and ``cross_task.png`` there. ``cache_dir``: where scores are cached
    (``"auto"``: ``out/cache``, none without ``out``; ``None``: no cache).

    ``methods`` may also hold :class:`~moerge.evaluation.methods.MethodSpec` instances (a
    variant with its own settings and grid); ``expert_tasks`` (expert → tasks) replaces the
    registry's task tags; ``routing`` replaces the routing accuracy (:data:`RoutingHook`)."""
    t_start = time.perf_counter()
    reg = registry if isinstance(registry, Registry) else Registry(registry, check=True)
    specs = resolve_methods(methods)
    overrides = parse_grid_overrides(grid, {**METHODS, **specs})
    unused = [m for m in overrides if m not in specs]
    if unused:
        raise EvaluationError(
            f"grid settings for {', '.join(unused)}, which {'is' if len(unused) == 1 else 'are'} not among the methods {list(specs)}"
        )
    families = {s.family for s in specs.values()}
    task_set = tasks if isinstance(tasks, TaskSet) else load_task_set(tasks)
    if limit is not None and limit < 1:
        raise EvaluationError(f"limit must be ≥ 1, got {limit}")
    if "symbolic" in families:
        return _evaluate_symbolic(reg, task_set, specs, overrides, experts, expert_tasks, limit, device, dtype, batch_size,
                                  progress, out, json_path, t_start)  # fmt: skip
    records = _records(reg, experts)
    base_id, fingerprint = _check_base(records, base)
    pool = _Pool(reg, records, task_set, _chat_renderer(base_id, task_set), limit, expert_tasks)
    pool.check(specs)
    if cache_dir == "auto":
        cache_dir = Path(out) / "cache" if out is not None else None
    cache = ScoreCache(cache_dir)
    run = _Run(pool, specs, base_id, fingerprint, device, dtype, cache, batch_size, progress, routing)
    held_in, held_out = task_set.held_in, task_set.held_out
    all_tasks = held_in + held_out

    base_scores, matrix = run.matrix(all_tasks)
    report = QualityReport(
        held_in=held_in, held_out=held_out, experts=pool.names, matrix=matrix, rows=[],
        groups=task_set.held_out_groups(), own_experts={t: pool.own[t] for t in held_in},
    )  # fmt: skip
    own = report.own_scores()
    meta: dict[str, Any] = {}

    def add(row: MethodRow, spec: MethodSpec) -> None:
        row.test_prompts_in_preparation = _leaks(pool, spec)
        report.rows.append(row)

    if "base" in families:
        add(method_row("base", base_scores, held_in, held_out, own, "the base model alone"), METHODS["base"])
    if "oracle" in families:
        oracle = {t: own[t] for t in held_in}
        oracle.update({t: max(matrix[e][t] for e in pool.names) for t in held_out})
        add(method_row("oracle", oracle, held_in, held_out, own, METHODS["oracle"].notes), METHODS["oracle"])
    if "experts" in families:
        trained = {n: [t for t in ts if t in task_set.tasks] for n, ts in pool.trained.items()}
        singles = [
            method_row(
                f"expert:{e}", matrix[e], held_in, held_out, own, f"trained on {', '.join(trained[e]) or 'no task of the set'}"
            )
            for e in pool.names
        ]
        best = max(
            singles,
            key=lambda r: (r.held_in_normalized, 0.0 if r.held_out_accuracy != r.held_out_accuracy else r.held_out_accuracy),
        )
        add(
            MethodRow(**{**best.__dict__, "name": "best single expert", "notes": best.name.removeprefix("expert:")}),
            METHODS["experts"],
        )
        for r in singles:
            add(r, METHODS["experts"])
    sizes: tuple[int, int] | None = None  # (every expert's LoRA factors, one dense ΔW per module), fp32 bytes
    for m, spec in specs.items():
        if spec.family not in ("router", "merge", "twin", "lorahub", "adamerging"):
            continue
        res = run.run_method(m, overrides.get(m))
        meta[m] = {k: v for k, v in res.items() if k != "per_task"}
        if "skipped" in res:
            log.warning("%s: %s", m, res["skipped"])
            continue
        choice = shown(res["chosen"])
        how = "chosen on validation" if len(spec.points(overrides.get(m))) > 1 else "fixed"
        row = method_row(
            spec.label, res["per_task"], held_in, held_out, own, f"{spec.notes}; {choice or 'no parameters'} ({how})"
        )
        row.chosen = res["chosen"]
        row.routing_accuracy = res.get("routing_accuracy")
        if spec.family in ("merge", "twin") and sizes is None:
            sizes = _bytes(pool)  # loads every LoRA: only for a table with merges
        if spec.family == "merge":
            row.experts_bytes, row.stored_bytes = sizes
        elif spec.family == "twin":
            st = res["stored"]
            row.stored_bytes, row.experts_bytes = 4 * (st["twin_params"] + st["shared_params"] + st["router_params"]), sizes[0]
        add(row, spec)
    report.meta = {
        "registry": str(reg.root),
        "tasks": str(task_set.root),
        "base": base_id,
        "experts": [r.ref for r in records],
        "own_experts": pool.own,
        "expert_tasks": pool.trained,
        "methods": meta,
        "skipped": {m: v["skipped"] for m, v in meta.items() if "skipped" in v},
        "limit": limit,
        "n_test": {t: len(pool.prompts[t, "test"]) for t in all_tasks},
        "n_validation": {t: len(pool.prompts[t, "validation"]) for t in all_tasks},
        "device": str(run.device),
        "dtype": str(run.dtype),
        "threads": torch.get_num_threads(),
        "computed": run.computed,
        "cache": {"folder": str(cache.root) if cache.root else None, "hits": cache.hits, "misses": cache.misses},
        "seconds": {**run.seconds, "total": time.perf_counter() - t_start},
    }
    if out is not None:
        write_report(report, out, json_path)
    return report


def _evaluate_symbolic(reg: Registry, task_set: TaskSet, specs: Mapping[str, MethodSpec],
                       overrides: Mapping[str, Mapping[str, Sequence[Any]]], experts: Sequence[str] | None,
                       expert_tasks: Mapping[str, Sequence[str]] | None, limit: int | None, device: Any, dtype: Any,
                       batch_size: int, progress: bool | None, out: str | Path | None, json_path: str | Path | None,
                       t_start: float) -> QualityReport:  # fmt: skip
    """Symbolic-MoE and its baselines over the registry's whole-model experts (:mod:`.symbolic`);
    ``symbolic_moe``'s settings (``seed``, ``k``, ``aggregator``) hold one value each, since
    nothing of it is chosen from a grid."""
    from moerge.device import resolve_device
    from moerge.evaluation.symbolic import evaluate_symbolic

    other = [n for n, s in specs.items() if s.family != "symbolic"]
    if other:
        raise EvaluationError(
            f"Symbolic-MoE's methods recruit whole-model experts (kind 'model') and the others compose LoRA experts on a base: "
            f"run {', '.join(n for n, s in specs.items() if s.family == 'symbolic')} apart from {', '.join(other)}"
        )
    if experts is None:
        records = reg.list(kind="model")
    else:
        records = [reg._resolve(e) for e in experts]
        wrong = [f"{r.ref} ({r.kind})" for r in records if r.kind != "model"]
        if wrong:
            raise EvaluationError(f"Symbolic-MoE recruits whole models (kind 'model'); these are not: {', '.join(wrong)}")
    if len(records) < 2:
        raise EvaluationError(f"Symbolic-MoE recruits among whole-model experts; the registry at {reg.root} has {len(records)}")
    settings = _symbolic_settings(reg, overrides)
    chat = [e for t in task_set.tasks.values() for s in t.splits.values() for e in s if e.messages]
    turns = [e.where for e in chat if [r for r, _ in e.messages or ()] != ["user"]]
    if turns:
        raise EvaluationError(
            f"{turns[0]}: Symbolic-MoE asks every model one question through the model's own chat template; a chat "
            "example must be one user message (no system prompt or earlier turns)"
        )
    if chat:  # each model wraps the user message in its own template (moerge.symbolic.execute.generate)
        plain = [r.ref for r in records if not (r.extra.get("model") or {}).get("chat_template")]
        if plain:
            raise EvaluationError(
                f"{chat[0].where}: the tasks are chat messages, and model expert(s) {', '.join(plain)} have no chat "
                "template to put them in; give those tasks plain prompts or the models a chat template"
            )
    pool = _Pool(reg, records, task_set, (lambda msgs: msgs[-1]["content"]) if chat else None, limit, expert_tasks)
    pool.check(specs)
    dev = resolve_device(device)
    report = evaluate_symbolic(pool, specs, device=dev, dtype=dtype, batch_size=batch_size, progress=progress, **settings)
    report.meta.update({
        "registry": str(reg.root), "tasks": str(task_set.root), "experts": [r.ref for r in records], "own_experts": pool.own,
        "expert_tasks": pool.trained, "limit": limit, "n_test": {t: len(pool.prompts[t, "test"]) for t in task_set.tasks},
        "device": str(dev), "threads": torch.get_num_threads(), "computed": [], "skipped": {},
        "cache": {"folder": None, "hits": 0, "misses": 0, "note": "answers are not cached for Symbolic-MoE; its profiles are, in the registry"},
        "seconds": {"total": time.perf_counter() - t_start},
    })  # fmt: skip
    if out is not None:
        write_report(report, out, json_path)
    return report


def _symbolic_settings(reg: Registry, overrides: Mapping[str, Mapping[str, Sequence[Any]]]) -> dict[str, Any]:
    """``symbolic_moe``'s settings with their overrides, each one value, the aggregator a registered whole model."""
    settings = dict(METHODS["symbolic_moe"].fixed)
    for param, values in overrides.get("symbolic_moe", {}).items():
        if len(values) != 1:
            raise EvaluationError(
                f"symbolic_moe.{param} takes one value (nothing of Symbolic-MoE is chosen from a grid), got {list(values)}"
            )
        settings[param] = values[0]
    for param, least in (("seed", 0), ("k", 1)):
        value = settings[param]
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise EvaluationError(f"symbolic_moe.{param} must be an integer ≥ {least}, got {value!r}")
    agg = settings["aggregator"]
    if agg is not None:
        try:
            record = reg._resolve(str(agg))
        except KeyError as exc:
            raise EvaluationError(f"symbolic_moe.aggregator: {exc.args[0] if exc.args else agg}") from None
        if record.kind != "model":
            raise EvaluationError(
                f"symbolic_moe.aggregator must be a whole model (kind 'model'); {record.ref} is {record.kind!r}"
            )
        settings["aggregator"] = record.ref
    return settings


def write_report(report: QualityReport, out_dir: str | Path, json_path: str | Path | None = None) -> dict[str, Path]:
    """report.md, results.json (or ``json_path``) and cross_task.png under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_matrix(report, out / "cross_task.png")
    meta = report.meta
    skipped = "".join(f"\n- **{m}** not run: {why}" for m, why in meta.get("skipped", {}).items())
    if "symbolic" in meta:
        sym = meta["symbolic"]
        skipped += (f"\n\nSymbolic-MoE: k = {sym['k']}, aggregator {sym['aggregator']}, {sym['model_loads']} model loads "
                    f"({sym['distinct_models']} distinct models) for the test queries.")  # fmt: skip
    n = meta.get("n_test", {})
    md = out / "report.md"
    md.write_text(
        f"# moerge eval — {meta.get('tasks')} on {len(report.experts)} experts of {meta.get('registry')}\n\n"
        f"Base `{meta.get('base', 'none: whole-model experts')}`, {meta.get('device')} {meta.get('dtype', '')}; test prompts per task: "
        + ", ".join(f"{t} {k}" for t, k in n.items())
        + ".\n\n"
        f"{report.markdown()}\n\n"
        "Held-in normalised: mean over held-in tasks of 100 × score / (the best score of the experts trained on the task). "
        "Held-out: mean score over the held-out tasks. Hyper-parameters: chosen by the mean score over the held-in "
        "tasks' validation splits; routers are prepared from the train splits only.\n"
        f"{skipped}\n\n## Cross-task matrix (score %)\n\n{report.matrix_markdown()}\n\n![cross-task matrix](cross_task.png)\n\n"
        f"Computed {len(meta.get('computed', []))} entries, {meta.get('cache', {}).get('hits', 0)} from the cache, in "
        f"{meta.get('seconds', {}).get('total', float('nan')):.0f} s.\n",
        encoding="utf-8",
    )
    js = Path(json_path) if json_path else out / "results.json"
    js.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(report.to_json(), indent=2, default=str))
    return {"markdown": md, "json": js, "png": png}
