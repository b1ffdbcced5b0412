"""Running whole-model experts the way Symbolic-MoE does (spec §3.6): every (query, recruited
model) pair of a whole test set is grouped by model, each model is **loaded once**, answers all
its prompts in batches, and is freed before the next; the aggregator is one more load. The naive
alternative — load each recruited model for each query — is here too, for ``moerge bench``.

Models come from the registry (kind ``model``, :meth:`~moerge.registry.Registry.model_folder`)
and may differ in architecture and tokenizer: each uses its own tokenizer and, when it has one,
its chat template. Generation is greedy unless ``temperature`` > 0 (then seeded sampling).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moerge.progress import progress_bar
from moerge.symbolic.recruit import Recruitment, plan_by_model

#: the final aggregation prompt (spec §3.5, the released ``aggregate.py``: responses, then the question)
AGGREGATE_PROMPT = (
    "You have been provided with a set of responses from various open-source models to the latest user query. "
    "Your task is to synthesize these responses into a single, high-quality response. It is crucial to critically "
    "evaluate the information provided in these responses, recognizing that some of it may be biased or incorrect. "
    "Your response should not simply replicate the given answers but should offer a refined, accurate, and "
    "comprehensive reply to the instruction.\n\n{responses}\n\nQuestion: {question}\n{answer_format}"
)


def strip_reasoning(text: str) -> str:
    """An R1-style response without its reasoning: the text after the last ``</think>``."""
    return text.rsplit("</think>", 1)[-1].strip()


def aggregate_prompt(question: str, responses: Sequence[str], answer_format: str = "") -> str:
    """The synthesis prompt over the recruited experts' responses (``### Model i's response:``)."""
    body = "\n\n".join(f"### Model {i + 1}'s response:\n{strip_reasoning(r)}" for i, r in enumerate(responses))
    return AGGREGATE_PROMPT.format(responses=body, question=question, answer_format=answer_format).strip()


def compact_aggregate_prompt(question: str, responses: Sequence[str], answer_format: str = "", words: int = 10) -> str:
    """A compact synthesis prompt for small word-level models (the zoo's aggregator): the
    question, then each response's first ``words`` words separated by ``:``, then ``=>`` —
    ``reverse the letters : a b c => c b a : a b c : C B A =>``. ``answer_format`` is ignored."""
    body = " : ".join(" ".join(r.split()[:words]) for r in responses)
    return f"{question} {body} =>"


@dataclass
class LoadedModel:
    name: str
    model: Any
    tokenizer: Any
    chat: bool


def load_model_expert(registry: Any, name: str, device: str = "cpu", dtype: Any = "auto") -> LoadedModel:
    """A registered whole-model expert with its own tokenizer (left padding for batched
    generation); ``dtype="auto"``: bfloat16 on a CUDA card, float32 on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moerge.device import resolve_dtype
    from moerge.progress import hf_bars

    dtype = resolve_dtype(dtype, device)

    folder = registry.model_folder(name)
    with hf_bars():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return LoadedModel(name, model, tok, bool(getattr(tok, "chat_template", None)))


def free(loaded: LoadedModel | None) -> None:
    """Drop a model before the next one loads. On a GPU also collect cycles and empty the
    allocator's cache, so the memory really goes back; on the CPU dropping the references is
    enough (a full ``gc.collect`` costs ~0.2 s with torch loaded — more than loading a small model)."""
    if loaded is None:
        return
    on_gpu = loaded.model is not None and next(loaded.model.parameters()).is_cuda
    loaded.model = None
    if on_gpu:
        gc.collect()
        torch.cuda.empty_cache()


@torch.inference_mode()
def generate(
    loaded: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """Each prompt's continuation (the prompt put through the model's chat template when it has one)."""
    tok, model = loaded.tokenizer, loaded.model
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        if loaded.chat
        else p
        for p in prompts
    ]
    out: list[str] = []
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id}
    if temperature > 0:
        torch.manual_seed(seed)
        kw.update(do_sample=True, temperature=temperature)
    else:
        kw.update(do_sample=False)
    dev = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        enc = tok(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=not loaded.chat)
        enc = {k: v.to(dev) for k, v in enc.items()}
        ids = model.generate(**enc, **kw)
        new = ids[:, enc["input_ids"].shape[1] :]
        out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    return out


@dataclass
class RunStats:
    model_loads: int = 0
    distinct_models: int = 0
    load_s: float = 0.0
    generate_s: float = 0.0
    #: model → how many prompts it answered
    prompts: dict[str, int] = field(default_factory=dict)
    #: (query, model) answers taken from ``known`` instead of generated
    reused: int = 0


Loader = Callable[[str], LoadedModel]


def run_batched(
    recruited: Mapping[str, Recruitment],
    prompts: Mapping[str, str],
    loader: Loader,
    progress: bool | None = None,
    known: Mapping[str, Mapping[str, str]] | None = None,
    **gen: Any,
) -> tuple[dict[str, list[str]], RunStats]:
    """Every recruited model answers its queries, grouped by model (one load each, models in
    order of first appearance); returns query → the k answers in recruitment order, and stats.

    ``known``: model → {query: answer} already generated for these same prompts with these same
    (greedy) settings — those pairs are reused, and a model with nothing left to answer is not
    loaded (``stats.reused`` counts them)."""
    if known and gen.get("temperature", 0.0) > 0:
        raise ValueError("known answers are reused only for greedy generation; with temperature > 0 each draw is new")
    known = known or {}
    plan = plan_by_model(recruited)
    answers: dict[str, list[str]] = {q: [""] * len(r.experts) for q, r in recruited.items()}
    stats = RunStats(distinct_models=len(plan))
    for name, every_pair in progress_bar(list(plan.items()), desc="experts (one load each)", progress=progress):
        have = known.get(name, {})
        pairs = [(q, i) for q, i in every_pair if q not in have]
        for q, i in every_pair:
            if q in have:
                answers[q][i] = have[q]
        stats.reused += len(every_pair) - len(pairs)
        if not pairs:
            continue
        t = time.perf_counter()
        loaded = loader(name)
        stats.model_loads += 1
        stats.load_s += time.perf_counter() - t
        t = time.perf_counter()
        outs = generate(loaded, [prompts[q] for q, _ in pairs], **gen)
        stats.generate_s += time.perf_counter() - t
        for (q, i), text in zip(pairs, outs, strict=True):
            answers[q][i] = text
        stats.prompts[name] = len(pairs)
        free(loaded)
    return answers, stats


def run_per_query(
    recruited: Mapping[str, Recruitment], prompts: Mapping[str, str], loader: Loader, progress: bool | None = None, **gen: Any
) -> tuple[dict[str, list[str]], RunStats]:
    """The naive loop: for each query, load each recruited model, answer, free it."""
    answers: dict[str, list[str]] = {}
    stats = RunStats(distinct_models=len({m for r in recruited.values() for m in r.experts}))
    for q, r in progress_bar(list(recruited.items()), desc="queries (a load per recruited model)", progress=progress):
        answers[q] = []
        for name in r.experts:
            t = time.perf_counter()
            loaded = loader(name)
            stats.model_loads += 1
            stats.load_s += time.perf_counter() - t
            t = time.perf_counter()
            answers[q] += generate(loaded, [prompts[q]], **gen)
            stats.generate_s += time.perf_counter() - t
            stats.prompts[name] = stats.prompts.get(name, 0) + 1
            free(loaded)
    return answers, stats


#: how an aggregator is asked: (question, the recruited responses, answer format) → its prompt
AggregateTemplate = Callable[[str, Sequence[str], str], str]


def aggregate(
    questions: Mapping[str, str],
    answers: Mapping[str, Sequence[str]],
    loader: Loader,
    aggregator: str,
    answer_format: str = "",
    template: AggregateTemplate = aggregate_prompt,
    **gen: Any,
) -> tuple[dict[str, str], RunStats]:
    """The aggregator's final answer per query (one load over all queries). ``template`` builds
    its prompt: the paper's synthesis prompt by default; the zoo's tiny aggregator is trained on
    a compact one (:func:`compact_aggregate_prompt`)."""
    t = time.perf_counter()
    loaded = loader(aggregator)
    stats = RunStats(model_loads=1, distinct_models=1, load_s=time.perf_counter() - t)
    qs = list(questions)
    t = time.perf_counter()
    outs = generate(loaded, [template(questions[q], answers[q], answer_format) for q in qs], **gen)
    stats.generate_s = time.perf_counter() - t
    stats.prompts[aggregator] = len(qs)
    free(loaded)
    return dict(zip(qs, outs, strict=True)), stats


def _answer_remote(
    registry_path: str, name: str, prompts: list[str], gen: dict[str, Any], threads: int | None, device: str, dtype: Any = "auto"
) -> list[str]:
    """In a Ray worker process: load one model expert, answer all its prompts, return. The
    process exits after the call (``max_calls=1``), which frees the model's memory for sure."""
    from moerge.registry import Registry

    if threads:
        torch.set_num_threads(threads)
    loaded = load_model_expert(Registry(registry_path), name, device=device, dtype=dtype)
    return generate(loaded, prompts, **gen)


def run_batched_ray(
    recruited: Mapping[str, Recruitment],
    prompts: Mapping[str, str],
    registry_path: str,
    max_resident: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    threads: int | None = None,
    progress: bool | None = None,
    dtype: Any = "auto",
    **gen: Any,
) -> tuple[dict[str, list[str]], RunStats]:
    """:func:`run_batched` on Ray: one task per recruited model (its own process, asking for
    ``num_cpus``/``num_gpus``), at most ``max_resident`` models loaded at once across the cluster
    — so a cluster answers with different models on different nodes at once. The registry path
    must be visible where the tasks run (a shared disk, or a node-local copy at the same path)."""
    import ray

    from moerge.runtime import ensure_ray

    if max_resident < 1:
        raise ValueError(f"max_resident must be ≥ 1, got {max_resident}")
    ensure_ray()
    plan = plan_by_model(recruited)
    task = ray.remote(max_calls=1)(_answer_remote).options(num_cpus=num_cpus, num_gpus=num_gpus)
    device = "cuda" if num_gpus else "cpu"
    answers: dict[str, list[str]] = {q: [""] * len(r.experts) for q, r in recruited.items()}
    stats = RunStats(distinct_models=len(plan))
    todo = list(plan.items())
    running: dict[Any, str] = {}
    bar = progress_bar(total=len(todo), desc="experts on Ray (one task each)", progress=progress)
    t = time.perf_counter()
    while todo or running:
        while todo and len(running) < max_resident:
            name, pairs = todo.pop(0)
            running[task.remote(registry_path, name, [prompts[q] for q, _ in pairs], gen, threads, device, dtype)] = name
            stats.model_loads += 1
        done, _ = ray.wait(list(running), num_returns=1)
        name = running.pop(done[0])
        for (q, i), text in zip(plan[name], ray.get(done[0]), strict=True):
            answers[q][i] = text
        stats.prompts[name] = len(plan[name])
        bar.update(1)
    bar.close()
    stats.generate_s = time.perf_counter() - t  # loads included: they happen inside the tasks
    return answers, stats
