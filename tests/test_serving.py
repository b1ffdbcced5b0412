"""Serving without Ray: the scheduling logic (batch selection, the batching queue, LRU
residency, placement) and the engine and worker in-process on the small zoo."""

from __future__ import annotations

import asyncio
import time

import pytest

from moerge.serving import (
    BASE,
    BadRequest,
    BatchQueue,
    GenerationParams,
    Limits,
    Placement,
    Residency,
    ServeRequest,
    ServeResult,
    group_requests,
    select_batch,
)

GREEDY = GenerationParams(max_new_tokens=12)


def req(experts=(), comp=None, **params) -> ServeRequest:
    names = (experts,) if isinstance(experts, str) else experts
    return ServeRequest("p", tuple((n, 1.0) for n in names), comp, GenerationParams(**params) if params else GREEDY)


# ------------------------------------------------------------------------------- batching


def test_select_batch_takes_the_head_then_compatible_requests_within_capacity():
    q = [req("a"), req("b", temperature=0.7), req("b"), req("c"), req("d"), req("a"), req(comp="glider"), req("e")]
    # capacity 3: a, b, c fit; d would make 4 distinct; a again fits; the sampled b and the composition differ in key
    assert select_batch(q, max_batch=10, capacity=3) == [0, 2, 3, 5]
    assert select_batch(q, max_batch=2, capacity=None) == [0, 2]
    assert select_batch(q[6:], max_batch=10) == [0]  # a composition batches only with itself
    assert select_batch([], 4) == []
    # max_new_tokens may differ inside a batch; sampling settings may not
    assert select_batch([req("a", max_new_tokens=3), req("a", max_new_tokens=9), req("a", temperature=0.5)], 8) == [0, 1]


def test_batch_queue_fills_to_max_batch_or_closes_at_the_oldest_requests_deadline():
    async def scenario():
        q = BatchQueue(max_batch=3, max_wait_s=0.2, capacity=2)
        for name in ["a", "b", "a", "c"]:
            q.put(req(name))
        full = await q.next_batch()  # three compatible at once: no waiting
        assert [i.request.experts[0][0] for i in full] == ["a", "b", "a"]
        t = time.monotonic()
        rest = await q.next_batch()  # only "c": waits until its deadline, then goes alone
        waited = time.monotonic() - t
        assert [i.request.experts[0][0] for i in rest] == ["c"] and len(q) == 0
        late = asyncio.get_running_loop().call_later(0.05, lambda: q.put(req("d")))
        q.put(req("e"))
        two = await q.next_batch()  # "d" arrives within "e"'s wait and joins it
        late.cancel()
        return waited, [i.request.experts[0][0] for i in two]

    waited, two = asyncio.run(scenario())
    assert 0.1 < waited < 2.0
    assert two == ["e", "d"]


def test_batch_queue_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_batch"):
        BatchQueue(max_batch=0)
    with pytest.raises(ValueError, match="max_wait_s"):
        BatchQueue(max_wait_s=-1)


def test_residency_evicts_least_recently_used_but_never_what_the_batch_needs():
    r = Residency(3)
    slots, loads, evicted = r.acquire(["a", "b", "c"])
    assert loads == [("a", 0), ("b", 1), ("c", 2)] and not evicted
    r.acquire(["a"])  # a becomes most recent: b is now the oldest
    slots, loads, evicted = r.acquire(["d", "c"])
    assert evicted == ["b"] and loads == [("d", 1)] and slots == {"d": 1, "c": 2}
    assert r.resident == ["a", "d", "c"]
    with pytest.raises(ValueError, match="max_resident"):
        r.acquire(["w", "x", "y", "z"])
    r.release("d")
    assert r.acquire(["e"])[1] == [("e", 1)]  # d's slot was freed


def test_group_requests_keys_by_what_must_be_resident_and_splits_hot_groups():
    rs = [req("a"), req("b"), req("a"), req(("a", "b")), req(comp="g"), req("a"), req("a")]
    groups = group_requests(rs, max_group=2)
    assert groups == [
        ((None, frozenset({"a"})), [0, 2]),
        ((None, frozenset({"a"})), [5, 6]),
        ((None, frozenset({"b"})), [1]),
        ((None, frozenset({"a", "b"})), [3]),
        (("g", frozenset()), [4]),
    ]


def test_placement_prefers_affinity_then_least_outstanding_and_replicates_hot_experts():
    p = Placement(workers=3, capacity=2, replicate_at=4)
    w = p.choose({"a"})
    p.assign(w, {"a"}, 1)
    assert p.choose({"a"}) == w  # affinity: a is resident there
    other = p.choose({"b"})
    assert other != w  # nobody holds b: the least-outstanding worker
    p.assign(w, {"a"}, 3)  # w now has 4 outstanding: a is hot
    spare = p.choose({"a"})
    assert spare not in (w,) and p.workers[spare].outstanding < 4  # replicated onto a less busy worker
    p.assign(spare, {"a"}, 1)
    assert {i for i, v in enumerate(p.workers) if "a" in v.resident} == {w, spare}
    p.done(w, 4, resident=["a", "c"])  # the worker's own report wins
    assert list(p.workers[w].resident) == ["a", "c"] and p.workers[w].outstanding == 0
    p.failed(w, 0)
    assert not p.workers[w].resident  # restarted empty
    assert p.choose({"a"}, exclude=[spare]) != spare
    # the mirror keeps at most `capacity` experts, least recently used dropped first
    p.assign(0, {"x"}, 0), p.assign(0, {"y"}, 0), p.assign(0, {"z"}, 0)
    assert list(p.workers[0].resident) == ["y", "z"]


def test_request_checks_name_the_problem():
    limits = Limits(max_new_tokens=64, max_prompt_chars=20)
    with pytest.raises(BadRequest, match="non-empty"):
        ServeRequest("  ").check(limits)
    with pytest.raises(BadRequest, match="30 characters"):
        ServeRequest("x" * 30).check(limits)
    with pytest.raises(BadRequest, match="max_new_tokens must be between 1 and 64"):
        ServeRequest("x", params=GenerationParams(max_new_tokens=0)).check(limits)
    with pytest.raises(BadRequest, match="weight"):
        ServeRequest("x", (("a", 0.0),)).check(limits)
    with pytest.raises(BadRequest, match="twice"):
        ServeRequest("x", (("a", 1.0), ("a", 1.0))).check(limits)
    with pytest.raises(BadRequest, match="either experts or a composition"):
        ServeRequest("x", (("a", 1.0),), "glider").check(limits)


# -------------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def engine(small_zoo):
    from moerge.serving import ExpertEngine
    from moerge.serving.workers import composition_spec

    spec = composition_spec(str(small_zoo.registry_path), "arrow")
    return ExpertEngine(small_zoo.registry_path, max_resident=3, compositions={"arrow": spec}, threads=1)


def _prompts(zoo, tasks, n):
    return [(t, e.prompt, e.target) for t in tasks for e in zoo.test_split(t)[:n]]


@pytest.mark.slow
def test_engine_mixed_batch_equals_single_expert_batches_and_cuts_each_row(engine, small_zoo):
    rows = _prompts(small_zoo, small_zoo.held_in[:3], 3)
    mixed = [ServeRequest(p, ((t, 1.0),), params=GenerationParams(max_new_tokens=3 + i % 4)) for i, (t, p, _) in enumerate(rows)]
    got = engine.run(mixed)
    assert all(r.error is None for r in got)
    assert {r.distinct_experts for r in got} == {3} and {r.batch_size for r in got} == {len(rows)}
    for t in small_zoo.held_in[:3]:
        mine = [(g, q) for g, q in zip(got, mixed, strict=True) if q.experts[0][0] == t]
        full = engine.run([ServeRequest(q.prompt, ((t, 1.0),), params=GREEDY) for _, q in mine])
        for (g, q), alone in zip(mine, full, strict=True):
            # greedy rows are independent: the mixed row is the expert alone, cut at its own max_new_tokens
            # (the zoo's tokenizer has one token per word)
            assert g.text == " ".join(alone.text.split()[: q.params.max_new_tokens])
            assert g.completion_tokens == min(q.params.max_new_tokens, alone.completion_tokens)
            assert g.experts == [(t, 1.0)]
    accuracy = sum(
        r.text == target
        for r, (_, _, target) in zip(
            engine.run([ServeRequest(p, ((t, 1.0),), params=GREEDY) for t, p, _ in rows]), rows, strict=True
        )
    ) / len(rows)
    assert accuracy >= 0.8  # the experts do their tasks through the slot path


@pytest.mark.slow
def test_engine_loads_on_demand_evicts_lru_and_fails_unknown_experts_alone(engine, small_zoo):
    tasks = small_zoo.held_in
    before = engine.stats["loads"]
    for t in tasks[:5]:  # 5 experts through 3 slots
        assert engine.run([ServeRequest("sort the letters : b a =>", ((t, 1.0),), params=GREEDY)])[0].error is None
    assert engine.stats["loads"] >= before + 2 and len(engine.resident) == 3
    assert [ref.partition("@")[0] for ref in engine.resident] == tasks[2:5]
    out = engine.run(
        [
            ServeRequest("reverse : a b =>", (("nope", 1.0),), params=GREEDY),
            ServeRequest("reverse : a b =>", ((tasks[0], 1.0),), params=GREEDY),
            ServeRequest("reverse : a b =>", (("sort-dense", 1.0),), params=GREEDY),
            ServeRequest("x " * 600, ((tasks[0], 1.0),), params=GREEDY),
            ServeRequest("reverse : a b =>", ((BASE, 1.0),), params=GREEDY),
        ]
    )
    assert out[0].status == 404 and "nope" in out[0].error
    assert out[1].error is None and out[1].text
    assert out[2].status == 400 and "dense" in out[2].error
    assert out[3].status == 400 and "tokens" in out[3].error
    assert out[4].error is None and out[4].experts == [(BASE, 1.0)]


@pytest.mark.slow
def test_engine_weighted_experts_and_compositions_report_who_served(engine, small_zoo):
    t0, t1 = small_zoo.held_in[:2]
    r = engine.run([ServeRequest("sort the letters : c a b =>", ((t0, 0.5), (t1, 0.5)), params=GREEDY)])[0]
    assert r.error is None and r.experts == [(t0, 0.5), (t1, 0.5)]
    prompts = [p for _, p, _ in _prompts(small_zoo, small_zoo.held_in[:2], 2)]
    out = engine.run([ServeRequest(p, composition="arrow", params=GREEDY) for p in prompts])
    for o in out:
        assert o.error is None and o.composition == "arrow"
        shares = [w for _, w in o.experts]
        assert shares == sorted(shares, reverse=True) and 0.9 < sum(shares) <= 1.0001
    usage = engine.usage("arrow", prompts[:2])
    assert len(usage) == 2 and all(u[0][1] >= u[-1][1] for u in usage)


@pytest.mark.slow
def test_engine_compiled_decode_pads_to_a_bucket_and_answers_as_eager(engine, small_zoo, monkeypatch):
    """compile=True: 3 mixed requests and 3 composition requests run as a bucket of 4 (a dummy
    row) through the static-cache compiled decode, and answer exactly as eager does (the eager
    backend stands in for inductor/CUDA graphs on CI)."""
    from moerge import decoding
    from moerge.serving import engine as engine_mod

    real = decoding.compile_kwargs
    monkeypatch.setattr(engine_mod, "compile_kwargs", lambda device: real(device, backend="eager", fullgraph=True))
    rows = _prompts(small_zoo, small_zoo.held_in[:3], 1)
    mixed = [ServeRequest(p, ((t, 1.0),), params=GREEDY) for t, p, _ in rows]
    comp = [ServeRequest(p, composition="arrow", params=GREEDY) for _, p, _ in rows]
    eager = engine.run(mixed), engine.run(comp)
    engine.compile = True
    try:
        compiled = engine.run(mixed), engine.run(comp)
    finally:
        engine.compile = False
    for want, got in zip(eager, compiled, strict=True):
        assert [r.text for r in got] == [r.text for r in want]
        assert [r.experts for r in got] == [r.experts for r in want]
        assert all(r.error is None and r.batch_size == 3 for r in got)


@pytest.mark.slow
def test_worker_batches_concurrent_requests_into_one_generate(small_zoo):
    from moerge.serving.workers import ExpertWorker, WorkerConfig

    worker = ExpertWorker(WorkerConfig(str(small_zoo.registry_path), max_resident=4, max_batch=8, max_wait_s=0.2))
    rows = _prompts(small_zoo, small_zoo.held_in[:4], 2)

    async def traffic():
        calls = [worker.submit([ServeRequest(p, ((t, 1.0),), params=GREEDY)]) for t, p, _ in rows]
        return await asyncio.gather(*calls)

    answers = asyncio.run(traffic())
    results = [res[0][0] for res in answers]
    assert {r.batch_size for r in results} == {8}  # eight separate calls, one mixed batch
    assert {r.distinct_experts for r in results} == {4}
    assert worker.engine.stats["batches"] == 1
    assert sorted(answers[-1][1]) == sorted(small_zoo.held_in[:4])  # resident experts reported back


@pytest.mark.slow
def test_a_streamed_request_gets_its_text_step_by_step_inside_a_shared_batch(small_zoo):
    """Streamed and plain requests share one generate; the streamed one's pieces are handed out
    while the batch decodes (one per token for the zoo's word-level tokenizer) and join to its
    text. When they reach the reader depends on the machine's speed (the decoding thread may finish
    before the event loop runs again), so the step-by-step claim is checked where the engine hands
    each piece over: before its batch returns."""
    from moerge.serving.workers import ExpertWorker, WorkerConfig

    worker = ExpertWorker(WorkerConfig(str(small_zoo.registry_path), max_resident=4, max_batch=8, max_wait_s=0.2))
    rows = _prompts(small_zoo, small_zoo.held_in[:2], 2)
    handed: list[str] = []  # what the engine did, in order, from its own thread
    run = worker.engine.run

    def traced(reqs, sinks=None):  # noqa: ANN001, ANN202
        wrapped = {i: (lambda text, s=s: handed.append(f"piece {text!r}") or s(text)) for i, s in (sinks or {}).items()}
        out = run(reqs, wrapped or None)
        handed.append(f"batch of {len(reqs)} returned")
        return out

    worker.engine.run = traced
    params = GenerationParams(max_new_tokens=6)

    async def traffic():
        plain = [worker.submit([ServeRequest(p, ((t, 1.0),), params=params)]) for t, p, _ in rows[1:]]
        t, p, _ = rows[0]
        items = []

        async def consume():
            async for item in worker.stream(ServeRequest(p, ((t, 1.0),), params=params)):
                items.append(item)

        await asyncio.gather(consume(), *plain)
        return items, [
            r[0][0]
            for r in await asyncio.gather(*[worker.submit([ServeRequest(p, ((t, 1.0),), params=params)]) for t, p, _ in rows[:1]])
        ]

    items, [alone] = asyncio.run(traffic())
    pieces = [i for i in items if isinstance(i, str)]
    final = items[-1]
    assert isinstance(final, ServeResult) and final.error is None and final.batch_size == len(rows)
    assert len(pieces) == final.completion_tokens >= 2
    assert handed[: len(pieces) + 1] == [*(f"piece {x!r}" for x in pieces), f"batch of {len(rows)} returned"]
    assert " ".join("".join(pieces).split()) == final.text == alone.text


def test_stop_sequences_cut_a_stream_where_they_cut_the_whole_text():
    from moerge.serving.app import stop_cut

    def streamed(pieces, stops):
        sent, held = "", ""
        for k, piece in enumerate(pieces):
            held += piece
            cut, safe = stop_cut(held, stops, final=k == len(pieces) - 1)
            if cut >= 0:
                return sent + held[:cut]
            sent, held = sent + held[:safe], held[safe:]
        return sent + held

    for text, stops in [("abcxyzdef", ["xyz"]), ("abcxyzdef", ["yz", "cxy"]), ("xyz", ["xyz", "y"]), ("hello", ["lo w"])]:
        whole_cut, _ = stop_cut(text, stops, final=True)
        expect = text[:whole_cut] if whole_cut >= 0 else text
        for size in (1, 2, 3):
            assert streamed([text[i : i + size] for i in range(0, len(text), size)], stops) == expect, (text, stops, size)


@pytest.mark.slow
def test_deploy_settings_from_a_composed_model_a_spec_or_a_registry(small_zoo, tmp_path):
    import moerge
    from moerge.serving.app import build_settings

    comp = moerge.compose(experts=small_zoo.registry.select(kind="lora"), router="arrow")
    s = build_settings(comp, replicas=2)
    assert s.compositions == {"arrow": comp.spec.model_dump(mode="json")} and s.default_composition == "arrow"
    assert s.registry == str(small_zoo.registry_path) and s.replicas == 2 and s.router is None
    spec = comp.save(tmp_path / "mine.json")
    assert build_settings(str(spec)).default_composition == "mine"
    s = build_settings(str(small_zoo.registry_path), router="retrieval", data=small_zoo.expert_data)
    assert s.router == "retrieval" and not s.compositions and s.default_composition is None
    assert set(s.router_data) == set(small_zoo.held_in) and all(isinstance(x, str) for x in s.router_data["sort"])
    with pytest.raises(KeyError, match="unknown router"):
        build_settings(str(small_zoo.registry_path), router="nope")
    with pytest.raises(ValueError, match="cannot read composition spec"):
        (tmp_path / "bad.json").write_text("{")
        build_settings(composition=tmp_path / "bad.json")


def test_window_batcher_runs_concurrent_jobs_together_and_gives_every_job_the_error():
    import asyncio

    from moerge.serving.batching import WindowBatcher

    windows = []

    def run(jobs):
        windows.append(list(jobs))
        if "boom" in jobs:
            raise RuntimeError("boom")
        return [j.upper() for j in jobs]

    batcher = WindowBatcher(run, max_batch=10, max_wait_s=0.2)

    async def traffic():
        together = await asyncio.gather(*(batcher.submit(j) for j in ("a", "b", "c")))
        failed = await asyncio.gather(batcher.submit("x"), batcher.submit("boom"), return_exceptions=True)
        return together, failed

    together, failed = asyncio.run(traffic())
    assert together == ["A", "B", "C"] and windows[0] == ["a", "b", "c"]
    assert all(isinstance(f, RuntimeError) for f in failed) and windows[1] == ["x", "boom"]
    full = WindowBatcher(run, max_batch=2, max_wait_s=5.0)  # size reached: the window closes at once

    async def two():
        return await asyncio.gather(full.submit("p", size=2), full.submit("q"))

    assert asyncio.run(two()) == ["P", "Q"] and windows[2] == ["p"] and windows[3] == ["q"]


def test_conversations_render_with_the_template_given_else_the_tokenizers_and_errors_say_the_way_out():
    from moerge.serving.types import BadRequest
    from moerge.serving.workers import render_conversations
    from moerge.zoo.control import build_tokenizer

    tok = build_tokenizer()  # a word-level tokenizer without a chat template
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a b"}]
    with pytest.raises(BadRequest, match="no chat template.*--chat-template"):
        render_conversations(tok, [chat])
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    assert render_conversations(tok, [chat, chat[1:]], template) == [
        "<system>be brief<user>a b<assistant>",
        "<user>a b<assistant>",
    ]
    tok.chat_template = template.replace("<", "[")  # the tokenizer's own, unless one is given
    assert render_conversations(tok, [chat[1:]]) == ["[user>a b[assistant>"]
    assert render_conversations(tok, [chat[1:]], template) == ["<user>a b<assistant>"]
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('conversations start with the user') }}{% endif %}"
    with pytest.raises(BadRequest, match="cannot render these messages.*start with the user"):
        render_conversations(tok, [chat], strict)
