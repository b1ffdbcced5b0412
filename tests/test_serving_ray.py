"""Serving on a real local Ray cluster (one per test session, 2 CPUs, fractional-CPU workers,
the small zoo): the pool's placement and routing, a worker killed mid-traffic, and the Ray
Serve app over HTTP with a real client (success and 4xx paths, a bounded load)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from conftest import free_port

from moerge.registry import Registry
from moerge.serving import BASE, GenerationParams, ServeRequest

# one worker runs the module: one Ray cluster and one Serve app for all of it, not one per xdist worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray-serve")]
GREEDY = GenerationParams(max_new_tokens=12)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from moerge.runtime import ensure_ray

    ensure_ray(2, log_to_driver=False)  # a local Ray of its own, on loopback
    yield
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
    ray.shutdown()


def _rows(zoo, per_task):
    return [(t, e.prompt, e.target) for t in zoo.held_in for e in zoo.test_split(t)[:per_task]]


def _pool(zoo, **kw):
    from moerge.serving.workers import ExpertPool, WorkerConfig

    opts = {"max_resident": 4, "max_batch": 8, "max_wait_s": 0.02}
    router = kw.pop("router", None)
    opts.update(kw)
    pool = ExpertPool(WorkerConfig(str(zoo.registry_path), threads=1, **opts), replicas=2, router=router, num_cpus=0.5)
    pool.ready()
    return pool


def test_pool_places_experts_with_affinity_routes_and_keeps_request_order(ray_cluster, small_zoo):
    pool = _pool(small_zoo, router="retrieval")
    try:
        rows = _rows(small_zoo, 3)
        reqs = [ServeRequest(p, ((t, 1.0),), params=GREEDY) for t, p, _ in rows]
        out = pool.generate(reqs)
        assert [r.id for r in out] == [q.id for q in reqs]
        assert sum(r.text == target for r, (_, _, target) in zip(out, rows, strict=True)) / len(rows) >= 0.8
        served_by: dict[str, set[int]] = {}
        for r in out:
            served_by.setdefault(r.experts[0][0], set()).add(r.worker)
        assert all(len(ws) == 1 for ws in served_by.values())  # affinity: one worker per expert
        assert {w for ws in served_by.values() for w in ws} == {0, 1}  # both workers used
        assert max(r.distinct_experts for r in out) > 1  # mixed-expert batches ran
        # a second wave goes where the experts already are: no new loads
        info = asyncio.run(pool.ainfo())
        loads = sum(w["stats"]["loads"] for w in info["workers"])
        pool.generate([ServeRequest(p, ((t, 1.0),), params=GREEDY) for t, p, _ in rows[:8]])
        info = asyncio.run(pool.ainfo())
        assert sum(w["stats"]["loads"] for w in info["workers"]) == loads
        # routed: the retrieval router picks one expert per request
        routed = pool.generate([ServeRequest(p, params=GREEDY) for _, p, _ in rows[:6]])
        assert all(r.error is None and len(r.experts) == 1 and r.experts[0][1] == 1.0 for r in routed)
        # unknown experts fail fast, naming the expert; the base model is servable
        bad = pool.generate([ServeRequest("x : a =>", (("no-such-expert", 1.0),), params=GREEDY)])[0]
        assert bad.status == 404 and "no-such-expert" in bad.error
        base = pool.generate([ServeRequest("x : a =>", ((BASE, 1.0),), params=GREEDY)])[0]
        assert base.error is None and base.experts == [(BASE, 1.0)]
    finally:
        pool.shutdown()


def test_a_worker_killed_mid_traffic_loses_no_request(ray_cluster, small_zoo):
    import ray

    pool = _pool(small_zoo, max_wait_s=1.0, max_batch=64)  # requests wait in the queues when the kill comes
    try:
        rows = _rows(small_zoo, 2)
        reqs = [ServeRequest(p, ((t, 1.0),), params=GREEDY) for t, p, _ in rows]

        async def traffic():
            task = asyncio.ensure_future(pool.agenerate(reqs))
            await asyncio.sleep(0.4)
            ray.kill(pool.workers[0], no_restart=False)  # Ray restarts it; the pool retries what it held
            return await asyncio.wait_for(task, timeout=120)

        out = asyncio.run(traffic())
        assert [r.id for r in out] == [q.id for q in reqs]
        for r in out:
            assert (r.error is None and r.text) or (r.status == 503 and "died" in r.error)
        assert pool.retries >= 1 and any(r.retried for r in out)
        assert sum(r.error is None for r in out) >= len(out) // 2
        # the killed worker is back (restarted empty) and serves again
        assert asyncio.run(pool.await_alive(0)) > 0
        again = pool.generate([ServeRequest(p, ((t, 1.0),), params=GREEDY) for t, p, _ in rows[:4]])
        assert all(r.error is None for r in again)
    finally:
        pool.shutdown()


#: a chat template for the zoo (whose word-level tokenizer has none): the user messages, as the prompt
CHAT_TEMPLATE = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"


@pytest.fixture(scope="module")
def server(ray_cluster, small_zoo, tmp_path_factory):
    from moerge.serving import Limits
    from moerge.serving.app import deploy
    from moerge.serving.workers import composition_spec

    spec_path = tmp_path_factory.mktemp("comp") / "arrow.json"
    spec_path.write_text(json.dumps(composition_spec(str(small_zoo.registry_path), "arrow")))
    dep = deploy(
        str(small_zoo.registry_path),
        router="retrieval",
        data=small_zoo.expert_data,  # retrieval's example bank: the experts' training inputs
        composition=spec_path,
        port=free_port(),
        name="moerge-test",
        replicas=1,
        num_cpus=0.5,
        max_resident=8,
        max_batch=16,
        limits=Limits(max_prompt_chars=400),
        chat_template=CHAT_TEMPLATE,  # the zoo's tokenizer has none
    )
    yield dep
    dep.shutdown()


def test_http_api_success_paths(server, small_zoo):
    import httpx

    task, prompt, target = _rows(small_zoo, 1)[1]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        listed = c.get("/v1/experts").json()
        assert {e["name"] for e in listed["experts"]} >= set(small_zoo.held_in)
        assert listed["compositions"][0]["name"] == "arrow"
        r = c.post("/v1/generate", json={"prompt": prompt, "expert": task})
        assert r.status_code == 200
        res = r.json()["results"][0]
        assert res["text"] == target and res["experts"] == [{"name": task, "weight": 1.0}]
        r = c.post("/v1/generate", json={"prompts": [prompt, prompt], "experts": {task: 0.5, small_zoo.held_in[0]: 0.5}})
        assert r.status_code == 200 and len(r.json()["results"]) == 2
        rows = _rows(small_zoo, 2)
        r = c.post("/v1/generate", json={"prompts": [p for _, p, _ in rows]})  # routed by retrieval
        routed = r.json()["results"]
        assert r.status_code == 200 and all(len(x["experts"]) == 1 for x in routed)
        assert sum(x["experts"][0]["name"] == t for x, (t, _, _) in zip(routed, rows, strict=True)) / len(rows) >= 0.9
        r = c.post("/v1/generate", json={"prompt": prompt, "model": "arrow", "max_new_tokens": 4})
        res = r.json()["results"][0]
        assert r.status_code == 200 and res["composition"] == "arrow" and res["completion_tokens"] <= 4
        decision = c.post("/v1/route", json={"prompts": [prompt]}).json()["decisions"][0]
        assert decision["granularity"] == "sequence" and decision["experts"][0]["weight"] == 1.0
        shares = c.post("/v1/route", json={"prompt": prompt, "model": "arrow"}).json()["decisions"][0]
        assert shares["granularity"] == "token-share" and abs(sum(e["weight"] for e in shares["experts"]) - 1) < 0.05
        # the OpenAI completions shape, with `model` naming an expert
        r = c.post("/v1/completions", json={"model": task, "prompt": prompt, "max_tokens": 12, "temperature": 0})
        body = r.json()
        assert r.status_code == 200 and body["object"] == "text_completion"
        assert body["choices"][0]["text"] == target and body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        stats = c.get("/v1/stats").json()
        assert stats["requests"] >= 8 and len(stats["workers"]) == 1


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "malformed JSON"),
        (b'{"prompt": ""}', 400, "non-empty"),
        (b'{"prompt": "sort : b a =>", "expert": "nope"}', 404, "nope"),
        (b'{"prompt": "' + b"a " * 300 + b'"}', 400, "characters"),
        (b'{"prompt": "sort : b a =>", "max_new_tokens": 1000000}', 400, "max_new_tokens"),
        (b'{"prompt": "sort : b a =>", "max_new_tokenz": 3}', 400, "max_new_tokenz"),
        (b'{"prompt": "a", "prompts": ["b"]}', 400, "exactly one"),
        (b'{"prompt": "a", "model": "no-such-composition"}', 404, "no-such-composition"),
        # values a batch cannot survive are refused per request, before batching (issue 13 #13)
        (b'{"prompt": "sort : b a =>", "experts": {"sort": 1e308}}', 400, "weights must be in (0, 100]"),
        (b'{"prompt": "sort : b a =>", "experts": {"sort": Infinity}}', 400, "finite"),
        (b'{"prompt": "sort : b a =>", "seed": 1180591620717411303424, "temperature": 1}', 400, "seed must be an integer"),
        (b'{"prompt": "sort : b a =>", "expert": ""}', 400, "non-empty name"),
        (b'{"prompt": "' + b"a" * 1_100_000 + b'"}', 413, "the limit is 1000000"),
    ],
)
def test_http_bad_input_gets_4xx_with_a_message(server, body, status, needle):
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/generate", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        assert needle in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"model": "sort", "prompt": "sort : b a =>", "n": 2})
        assert r.status_code == 400 and "n=2" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"model": "nope", "prompt": "sort : b a =>", "stream": True})
        assert r.status_code == 404 and "nope" in r.json()["error"]["message"]  # before any stream starts
        assert c.get("/healthz").status_code == 200  # still serving


def test_streaming_with_the_openai_client_matches_the_whole_answer(server, small_zoo):
    """stream=true as OpenAI's clients send it: text_completion chunks over server-sent
    events, several per answer (tokens flow as the batch decodes), joining to the text a
    non-streamed request gets; stop sequences and include_usage honoured; /v1/generate too."""
    import httpx
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    task, prompt, target = _rows(small_zoo, 1)[1]
    whole = client.completions.create(model=task, prompt=prompt, max_tokens=12, temperature=0)
    chunks = list(
        client.completions.create(
            model=task, prompt=prompt, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert sum(1 for t in texts if t) >= 2  # pieces, not one block at the end
    assert " ".join("".join(texts).split()) == whole.choices[0].text == target
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    words = target.split()
    if len(words) >= 2:  # a stop sequence inside the answer cuts the stream where it cuts the whole text
        stop = " " + words[1]
        cut = client.completions.create(model=task, prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
        streamed = client.completions.create(model=task, prompt=prompt, max_tokens=12, temperature=0, stop=[stop], stream=True)
        pieces = list(streamed)
        assert "".join(c.choices[0].text for c in pieces) == cut.choices[0].text == target.split(stop)[0]
        assert pieces[-1].choices[0].finish_reason == "stop"
    two = list(client.completions.create(model=task, prompt=[prompt, prompt], max_tokens=12, temperature=0, stream=True))
    for i in (0, 1):
        assert " ".join("".join(c.choices[0].text for c in two if c.choices[0].index == i).split()) == target
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/generate", json={"prompt": prompt, "expert": task, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert parsed[-1]["result"]["text"] == target and sum("text" in e for e in parsed) >= 2


def test_chat_completions_with_the_openai_client_render_the_template_and_route_on_the_user_message(server, small_zoo):
    """/v1/chat/completions as OpenAI's client sends it: the conversation rendered with the chat
    template (here: the user messages), so the answer is the completion of the rendered prompt;
    "auto" routes on the last user message, not the system prompt; a stream's deltas join to
    the whole answer, the first carrying the role; bad conversations get a 400 that says why."""
    import httpx
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    task, prompt, _ = _rows(small_zoo, 1)[2]
    system = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
    plain = client.completions.create(model=task, prompt=prompt, max_tokens=12, temperature=0)
    chat = client.chat.completions.create(
        model=task, messages=[system, {"role": "user", "content": prompt}], max_tokens=12, temperature=0
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == plain.choices[0].text
    assert (
        chat.choices[0].finish_reason == plain.choices[0].finish_reason and chat.usage.prompt_tokens == plain.usage.prompt_tokens
    )
    # routed: the decision is the router's on the user message alone (the system prompt is not read)
    routed = client.chat.completions.create(
        model="auto", messages=[system, {"role": "user", "content": prompt}], max_completion_tokens=12, temperature=0
    )
    with httpx.Client(base_url=server.url, timeout=60) as c:
        decision = c.post("/v1/route", json={"prompt": prompt}).json()["decisions"][0]["experts"]
    assert routed.choices[0].model_extra["experts"] == decision
    parts = [{"type": "text", "text": prompt[:5]}, {"type": "text", "text": prompt[5:]}]  # content as text parts
    assert client.chat.completions.create(model=task, messages=[{"role": "user", "content": parts}], max_tokens=12,
                                          temperature=0).choices[0].message.content == plain.choices[0].text  # fmt: skip
    chunks = list(client.chat.completions.create(model=task, messages=[{"role": "user", "content": prompt}], max_tokens=12,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))  # fmt: skip
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert chunks[0].object == "chat.completion.chunk" and deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    for messages, needle in (
        ([system], "no user message"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text content parts"),
        ([{"role": "tool", "content": prompt}], "role"),
        ([], "messages"),
    ):
        with pytest.raises(BadRequestError, match=needle):
            client.chat.completions.create(model=task, messages=messages, max_tokens=4)


def test_http_bounded_load_batches_across_requests(server, small_zoo):
    import httpx

    rows = _rows(small_zoo, 8)[:64]

    async def load():
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:

            async def one(t, p):
                async with sem:
                    return await c.post("/v1/generate", json={"prompt": p, "expert": t})

            return await asyncio.gather(*(one(t, p) for t, p, _ in rows))

    t0 = time.monotonic()
    responses = asyncio.run(asyncio.wait_for(load(), timeout=120))
    assert time.monotonic() - t0 < 120
    assert all(r.status_code == 200 for r in responses)
    results = [r.json()["results"][0] for r in responses]
    assert sum(r["text"] == target for r, (_, _, target) in zip(results, rows, strict=True)) / len(rows) >= 0.8
    assert max(r["batch_size"] for r in results) > 1  # concurrent HTTP requests shared batches
    assert max(r["distinct_experts"] for r in results) > 1  # … with different experts in one batch


def test_internal_errors_answer_500_with_an_id():
    from moerge.serving.app import respond

    async def broken():
        raise RuntimeError("boom")

    errors: dict[int, int] = {}
    resp = asyncio.run(respond(broken, errors))
    body = json.loads(resp.body)
    assert resp.status_code == 500 and body["error"]["id"] in body["error"]["message"]
    assert "boom" not in body["error"]["message"]  # internals stay in the log
    assert errors == {500: 1}


def test_embeddings_endpoint_in_openais_shape(server, tmp_path):
    """/v1/embeddings on Ray Serve with the real OpenAI client (which asks for base64): an
    expert, the base and ``auto``; an unknown model is a 404 naming it; /v1/search returns hits."""

    import httpx
    import openai
    import torch

    from moerge import compose
    from moerge.registry import Registry
    from moerge.serving.embeddings import deploy_embeddings
    from moerge.zoo.retrieval import load_suite

    suite = load_suite("retrieval-small", progress=False)
    Registry(suite.root / "registry").snapshot(tmp_path / "registry")
    reg = Registry(tmp_path / "registry")
    enc = compose(None, reg.select(names=suite.domains), router="router_retriever",
                  data={d: suite.data_path(d) for d in suite.domains})  # fmt: skip
    port = int(server.url.rsplit(":", 1)[1])  # one Serve HTTP proxy per cluster: mount beside the other app
    dep = deploy_embeddings(reg.root, port=port, route_prefix="/emb", name="moerge-emb-test", num_cpus=0.5,
                            experts=list(suite.domains), search={"jargon": str(suite.data_path("jargon"))})  # fmt: skip
    try:
        texts = ["a program that runs in the background", "hacker slang for a bug"]
        client = openai.OpenAI(base_url=f"{dep.url}/v1", api_key="unused", max_retries=0)
        got = client.embeddings.create(model="jargon", input=texts)
        torch.testing.assert_close(torch.tensor([d.embedding for d in got.data]), enc.embed(texts, "jargon"), atol=1e-5, rtol=0)
        auto = client.embeddings.create(model="auto", input=texts[0])
        assert len(auto.data) == 1 and len(auto.data[0].embedding) == enc.dim
        with httpx.Client(base_url=dep.url, timeout=60) as c:
            assert c.get("/healthz").json()["status"] == "ok"
            r = c.post("/v1/embeddings", json={"model": "auto", "input": texts})
            assert r.status_code == 200 and [d["expert"] for d in r.json()["data"]] == [x["expert"] for x in enc.route(texts)]
            r = c.post("/v1/embeddings", json={"model": "jargn", "input": "x"})
            assert (
                r.status_code == 404
                and "unknown model 'jargn'" in r.json()["error"]["message"]
                and "jargon" in r.json()["error"]["message"]
            )
            assert c.post("/v1/embeddings", json={"model": "auto", "input": []}).status_code == 400
            r = c.post("/v1/search", json={"query": "slang for a bug", "k": 3})
            assert r.status_code == 200 and len(r.json()["results"][0]["hits"]) == 3
            assert {m["id"] for m in c.get("/v1/models").json()["data"]} == {*suite.domains, "__base__", "auto"}
    finally:
        dep.shutdown()


def test_symbolic_moe_served_with_batch_windows(server, small_zoo, tmp_path):
    """model="symbolic-moe" on Ray Serve: concurrent requests inside one batch window are
    recruited together (each recruited model loaded once, then the aggregator), the OpenAI
    client gets the aggregator's answer, and bad requests get 4xx naming what was wrong."""

    import httpx
    import openai

    from moerge.serving.symbolic import deploy_symbolic
    from moerge.zoo.symbolic import load_pool

    pool = load_pool(small_zoo, progress=False)
    Registry(pool.root / "registry").snapshot(tmp_path / "registry")
    port = int(server.url.rsplit(":", 1)[1])
    dep = deploy_symbolic(tmp_path / "registry", pool.validation(), port=port, route_prefix="/sym", name="moerge-sym-test",
                          models=pool.models, aggregator=pool.aggregator, instruction_sep=" : ", aggregate_template="compact",
                          max_new_tokens=10, max_wait_s=1.0, num_cpus=0.5, threads=1)  # fmt: skip
    try:
        test = list(pool.test().values())
        prompts = [test[i]["question"] for i in (0, 20, 40, 60)]

        async def together():
            async with httpx.AsyncClient(base_url=dep.url, timeout=60) as c:
                return await asyncio.gather(
                    *(c.post("/v1/generate", json={"model": "symbolic-moe", "prompt": p}) for p in prompts)
                )

        answers = asyncio.run(together())
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        results = [r.json()["results"][0] for r in answers]
        with httpx.Client(base_url=dep.url, timeout=60) as c:
            stats = c.get("/v1/stats").json()["workers"][0]
            assert stats["windows"] == 1 and stats["questions"] == 4  # one window for the four requests
            last = stats["last_window"]
            assert last["model_loads"] == last["distinct_models"] + 1 == results[0]["window"]["model_loads"]
            assert c.get("/healthz").json()["status"] == "ok"
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["symbolic-moe"]
            r = c.post("/v1/completions", json={"model": "symbolic-mo", "prompt": prompts[0]})
            assert r.status_code == 404 and "symbolic-moe" in r.json()["error"]["message"]
            r = c.post("/v1/completions", json={"model": "symbolic-moe", "prompt": prompts[0], "stream": True})
            assert r.status_code == 400 and "stream" in r.json()["error"]["message"]
            assert c.post("/v1/generate", json={"model": "symbolic-moe", "prompts": []}).status_code == 400
            alone = c.post("/v1/generate", json={"model": "symbolic-moe", "prompt": prompts[0]}).json()["results"][0]
        client = openai.OpenAI(base_url=f"{dep.url}/v1", api_key="unused", max_retries=0)
        got = client.completions.create(model="symbolic-moe", prompt=prompts[0], max_tokens=10, temperature=0)
        assert got.choices[0].text == alone["text"]  # alone in its window, greedy: the same recruitment and answer
        assert got.usage.completion_tokens > 0
    finally:
        dep.shutdown()
