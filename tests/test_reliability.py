"""Issue 13, the registry: each defect found by trying to break it, reproduced and fixed.

Crashes are put exactly between two steps of a write with ``MOERGE_FAILPOINT`` (the process
dies there with ``os._exit``, as under kill -9), not by timing luck."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import free_port

from moerge.cli import main
from moerge.registry import Registry
from moerge.registry.importers import MoergeWarning, UnsafeSourceError
from moerge.registry.schema import InvalidNameError
from moerge.registry.store import RegistryIndexError, RegistryLockedError


def _in_subprocess(code: str, failpoint: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOERGE_FAILPOINT": failpoint or ""}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def _edited_adapter(tmp_path: Path, lora_folder: Path, **changes) -> Path:
    folder = tmp_path / f"adapter-{len(list(tmp_path.glob('adapter-*')))}"
    shutil.copytree(lora_folder, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


# ------------------------------------------------------------- 1, 6: values and names


def test_non_finite_numbers_are_refused_and_an_old_bad_record_cannot_brick_the_registry(tmp_path, lora_folder):
    reg = Registry(tmp_path / "reg")
    with pytest.raises(ValueError, match="metric 'acc' must be finite"):
        reg.register(lora_folder, "x", metrics={"acc": float("nan")})
    r = CliRunner().invoke(
        main, ["registry", "add", str(lora_folder), "--name", "x", "--metric", "acc=inf", "--registry", str(reg.root)]
    )
    assert r.exit_code == 2 and "must be finite" in r.output
    bad = _edited_adapter(tmp_path, lora_folder, lora_alpha=float("nan"))
    assert '"lora_alpha": NaN' in (bad / "adapter_config.json").read_text()
    with pytest.raises(ValueError, match="lora_alpha must be finite"):
        reg.register(bad, "x")
    assert reg.list() == [] and reg.verify()["ok"]
    # a record written by an older version with a NaN (stored as null) is skipped with a warning and removable
    good = reg.register(lora_folder, "good")
    reg.register(lora_folder, "old")
    with sqlite3.connect(reg.root / "index.sqlite") as con:
        raw = json.loads(con.execute("SELECT record FROM experts WHERE name='old'").fetchone()[0])
        raw["metrics"] = {"acc": None}
        con.execute("UPDATE experts SET record=? WHERE name='old'", (json.dumps(raw),))
    con.close()
    with pytest.warns(MoergeWarning, match="old@1 .* unreadable"):
        assert [r.ref for r in reg.list()] == [good.ref]
    assert [p["kind"] for p in reg.verify()["problems"]] == ["unreadable record"]
    assert [r.version for r in reg.remove("old")] == [1] and reg.verify()["ok"]


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"r": 4.9}, "r must be a whole number, got 4.9"),
        ({"target_modules": 5}, "target_modules must be a module name or a list"),
        ({"base_model_name_or_path": 123}, "base_model_name_or_path must be a string"),
        ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern.*whole number"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
    ],
)
def test_adapter_configs_are_validated_strictly(tmp_path, lora_folder, changes, match):
    reg = Registry(tmp_path / "reg")
    with pytest.raises(ValueError, match=match):
        reg.register(_edited_adapter(tmp_path, lora_folder, **changes), "x")
    assert reg.list() == []


@pytest.mark.parametrize("name", ["ok\n", "ok\r", "a b", "\nok"])
def test_names_with_control_characters_are_refused(tmp_path, lora_folder, name):
    with pytest.raises(InvalidNameError):
        Registry(tmp_path / "reg").register(lora_folder, name)


# ------------------------------------------------------------- 2, 3: removal and versions


def test_a_removal_that_crashes_before_its_commit_loses_nothing(tmp_path, lora_folder):
    reg = Registry(tmp_path / "reg")
    rec = reg.register(lora_folder, "x")
    reg.put_group_artifact(["x"], "router", {"k": 1}, {"w": torch.ones(3)})
    code = f"from moerge.registry import Registry; Registry({str(reg.root)!r}).remove('x')"
    assert _in_subprocess(code, "remove:before-commit").returncode == 86  # died with the folder moved aside
    assert any((reg.root / ".staging").iterdir())
    again = Registry(reg.root)  # opening puts the folder back: the index still lists it
    assert again.get("x").ref == rec.ref and again.load_tensors("x")
    assert again.get_group_artifact(["x"], "router", {"k": 1}) is not None
    assert again.verify()["ok"] and not any((reg.root / ".staging").iterdir())
    assert _in_subprocess(code, "remove:after-commit").returncode == 86
    after = Registry(reg.root)
    assert "x" not in after and not (reg.root / "experts" / "x" / "1").exists() and after.verify()["ok"]


def test_a_failed_commit_of_a_removal_puts_the_files_back(tmp_path, lora_folder, monkeypatch):
    reg = Registry(tmp_path / "reg")
    reg.register(lora_folder, "x")

    def fail(point: str) -> None:
        if point == "remove:before-commit":
            raise sqlite3.OperationalError("disk I/O error (simulated)")

    monkeypatch.setattr("moerge.registry.store._failpoint", fail)
    with pytest.raises(sqlite3.OperationalError, match="simulated"):
        reg.remove("x")
    assert reg.get("x").version == 1 and reg.load_tensors("x") and reg.verify()["ok"]


def test_version_numbers_are_never_given_again_not_even_after_losing_the_index(tmp_path, lora_folder):
    reg = Registry(tmp_path / "reg")
    assert [reg.register(lora_folder, "x").version for _ in range(3)] == [1, 2, 3]
    reg.remove("x", version=3)
    assert reg.register(lora_folder, "x").version == 4  # 3 meant other weights: never again
    reg.remove("x")
    assert reg.register(lora_folder, "x").version == 5
    reg.remove("x")
    (reg.root / "index.sqlite").unlink()
    for extra in ("index.sqlite-wal", "index.sqlite-shm"):
        (reg.root / extra).unlink(missing_ok=True)
    assert Registry(reg.root).register(lora_folder, "x").version == 6  # the on-disk tombstone remembers


# ------------------------------------------------------------------ 4, 5: sources, staging


@pytest.mark.parametrize("kind", ["lora", "model"])
def test_symlinks_leading_outside_the_source_are_refused(tmp_path, lora_folder, llama_folder, kind):
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    src = tmp_path / "with-link"
    shutil.copytree(lora_folder if kind == "lora" else llama_folder, src)
    if kind == "model":  # a whole-model expert needs its tokenizer
        from moerge.zoo.tokenizer import build_tokenizer

        build_tokenizer().save_pretrained(src)
    (src / "notes.txt").symlink_to(secret)
    reg = Registry(tmp_path / "reg")
    with pytest.raises(UnsafeSourceError, match=r"notes.txt is a symlink to .*secret.txt, outside"):
        reg.register(src, "x", kind=kind)
    assert not any(p.read_bytes() == b"password" for p in reg.root.rglob("*") if p.is_file())
    (src / "notes.txt").unlink()
    (src / "README.md").write_text("inside")
    (src / "notes.txt").symlink_to(src / "README.md")  # inside the folder: fine
    rec = reg.register(src, "x", kind=kind)
    if kind == "model":  # stored whole: the link is stored as the file it points to
        assert (reg.path(rec) / "notes.txt").read_text() == "inside"
    assert not any(p.is_symlink() for p in reg.path(rec).rglob("*"))


def test_a_crashed_registration_leaves_no_staging_and_its_orphan_is_reported(tmp_path, lora_folder):
    reg = Registry(tmp_path / "reg")
    code = f"from moerge.registry import Registry; Registry({str(reg.root)!r}).register({str(lora_folder)!r}, 'x')"
    assert _in_subprocess(code, "register:before-commit").returncode == 86
    assert any((reg.root / ".staging").glob("stage-*"))  # the dead process's scratch
    again = Registry(reg.root)
    assert not any((reg.root / ".staging").iterdir())  # cleaned at open
    assert "x" not in again
    report = again.verify()
    assert [(p["kind"], p["ref"]) for p in report["problems"]] == [("orphan", "x@1")]
    assert again.register(lora_folder, "x").version == 2
    r = CliRunner().invoke(main, ["registry", "verify", "--registry", str(reg.root)])
    assert r.exit_code == 1 and "orphan: x@1" in r.output
    r = CliRunner().invoke(main, ["registry", "verify", "--repair", "--registry", str(reg.root)])
    assert r.exit_code == 0 and "repaired" in r.output and again.verify()["ok"]


def test_a_live_registration_keeps_its_staging_folder(tmp_path, lora_folder):
    reg = Registry(tmp_path / "reg")
    with reg._stage() as stage:
        Registry(reg.root)  # another open while this one stages
        assert stage.exists()


# ------------------------------------------------------------------- 7: the index


def test_an_emptied_or_damaged_index_is_named_at_open_and_rebuilt_without_losing_a_version(tmp_path, lora_folder):
    reg = Registry(tmp_path / "reg")
    for _ in range(2):
        reg.register(lora_folder, "a")
    reg.register(lora_folder, "b")
    reg.remove("a", version=1)
    reg.put_artifact("b", "probe", {"k": 1}, {"v": torch.arange(3.0)})
    reg.put_group_artifact(["a", "b"], "router", {"k": 2}, {"w": torch.ones(2)})
    before = {r.ref: r for r in reg.list(all_versions=True)}
    (reg.root / "index.sqlite").write_bytes(b"")  # truncated to 0 bytes
    for extra in ("index.sqlite-wal", "index.sqlite-shm"):
        (reg.root / extra).unlink(missing_ok=True)
    with pytest.raises(
        RegistryIndexError,
        match=r"not the one this registry's files belong to .* lists 0 expert version\(s\), 2 are on disk.*rebuild-index",
    ):
        Registry(reg.root)
    (reg.root / "index.sqlite").write_bytes(b"SQLite format 3\x00" + os.urandom(3000))
    with pytest.raises(RegistryIndexError, match="is damaged"):
        Registry(reg.root)
    r = CliRunner().invoke(main, ["registry", "list", "--registry", str(reg.root)])
    assert r.exit_code == 2 and "rebuild-index" in r.output
    r = CliRunner().invoke(main, ["registry", "rebuild-index", "--registry", str(reg.root)])
    assert r.exit_code == 0 and "indexed 2 version(s), 1 artifact(s), 1 group artifact(s)" in r.output, r.output
    rebuilt = Registry(reg.root)
    assert {r.ref: r for r in rebuilt.list(all_versions=True)} == before
    assert torch.equal(rebuilt.get_artifact("b", "probe", {"k": 1})["v"], torch.arange(3.0))
    assert rebuilt.get_group_artifact(["a", "b"], "router", {"k": 2}) is not None
    assert rebuilt.verify()["ok"] and rebuilt.register(lora_folder, "a").version == 3
    assert list(reg.root.glob("index.sqlite.damaged-*"))  # the old index is kept


# --------------------------------------------------------------- 8, 9: locks, connections


def test_a_frozen_writer_is_named_and_the_wait_gives_up(tmp_path, lora_folder):
    reg = Registry(tmp_path / "reg")
    code = (
        "import time\nfrom moerge.registry import Registry\n"
        f"reg = Registry({str(reg.root)!r})\n"
        "with reg._write('a frozen writer'):\n    print('locked', flush=True)\n    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        with pytest.raises(RegistryLockedError, match=rf"locked by pid {holder.pid} .*a frozen writer.*gave up after"):
            Registry(reg.root, lock_timeout=1.0).register(lora_folder, "x")
        assert time.monotonic() - start < 30
        with pytest.warns(MoergeWarning, match=rf"waiting for the registry lock .* pid {holder.pid}"):
            with pytest.raises(RegistryLockedError):
                Registry(reg.root, lock_timeout=2.5).register(lora_folder, "x")
    finally:
        holder.kill()
        holder.wait()
    assert Registry(reg.root).register(lora_folder, "x").version == 1  # the lock died with its holder


def _open_index_fds(root: Path) -> int:
    return sum(
        1 for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(root / "index.sqlite"))
    )


def _read_many(root: str, n: int, out) -> None:  # noqa: ANN001
    try:
        reg = Registry(root)
        for _ in range(n):
            reg.list()
            reg.get("x")
        out.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        out.put(repr(exc))


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts open files through /proc")
def test_connections_close_with_each_operation_and_forked_readers_are_safe(tmp_path, lora_folder):
    reg = Registry(tmp_path / "reg")
    reg.register(lora_folder, "x")
    reg.list()
    reg.get("x")
    reg.put_artifact("x", "probe", {}, {"v": torch.ones(1)})
    assert _open_index_fds(reg.root) == 0  # nothing waits for the garbage collector
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    kids = [ctx.Process(target=_read_many, args=(str(reg.root), 40, out)) for _ in range(3)]
    for k in kids:
        k.start()
    for _ in range(5):  # the parent writes while forked children read
        reg.register(lora_folder, "x")
    for k in kids:
        k.join(timeout=120)
    assert [out.get(timeout=5) for _ in kids] == ["ok"] * 3
    assert reg.verify()["ok"] and len(reg.versions("x")) == 6


# ------------------------------------------------------------------------- the server


def test_serve_refuses_to_bind_beyond_loopback_without_an_api_key(tmp_path):
    r = CliRunner().invoke(main, ["serve", "--zoo", "small", "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "--api-key" in r.output and "MOERGE_API_KEY" in r.output


@pytest.mark.slow
def test_the_server_tells_the_truth_about_its_workers_and_outlives_them(tmp_path, small_zoo):
    """A key-protected server with one worker: probes stay open; the worker frozen (SIGSTOP)
    makes /healthz and /readyz 503 and requests 503 (not a hang), and it serves again once
    thawed; a request that reached it before anyone noticed gets 504 at its deadline; killed four
    times (Ray's old limit was three restarts) it is re-created each time."""
    import signal as sig

    import httpx

    reg_path = tmp_path / "reg"
    Registry(small_zoo.registry_path).snapshot(reg_path)
    port = free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-c", "from moerge.cli import main; main()", "serve", "--registry", str(reg_path), "--port", str(port)]
    cmd += ["--num-cpus", "0.5", "--threads", "1", "--request-timeout", "8", "--max-wait-ms", "1"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MOERGE_API_KEY": "s3cret"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=fh, env=env)
    url, key = f"http://127.0.0.1:{port}", {"Authorization": "Bearer s3cret"}
    task = small_zoo.held_in[1]
    prompt = small_zoo.test_split(task)[0].prompt

    def health() -> httpx.Response:
        return httpx.get(f"{url}/healthz", timeout=10)

    def wait_for(state: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                body = health().json()
                if body.get("status") == state:
                    return body
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"server never became {state}: " + log.read_text()[-3000:])

    def generate(**kw) -> httpx.Response:
        return httpx.post(f"{url}/v1/generate", json={"prompt": prompt, "expert": task, **kw}, headers=key, timeout=30)

    try:
        body = wait_for("ok")
        pid = body["workers"][0]["pid"]
        assert httpx.post(f"{url}/v1/generate", json={"prompt": prompt, "expert": task}, timeout=30).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.get(f"{url}/v1/experts", headers=wrong, timeout=30).status_code == 401
        assert generate().status_code == 200 and httpx.get(f"{url}/readyz", timeout=10).json()["ready"]

        os.kill(pid, sig.SIGSTOP)  # frozen: alive to the OS, useless to clients
        try:
            start = time.monotonic()  # sent before the watcher notices: it reaches the frozen worker
            r = generate()
            assert r.status_code == 504 and "8 s deadline" in r.json()["error"]["message"]
            assert 7 < time.monotonic() - start < 20  # answered at its deadline, not hung
            body = wait_for("unavailable", timeout=30)
            assert body["workers"][0]["state"] == "unresponsive" and health().status_code == 503
            assert httpx.get(f"{url}/readyz", timeout=10).status_code == 503
            start = time.monotonic()
            r = generate()
            assert r.status_code == 503 and "no worker can serve" in r.json()["error"]["message"]
            assert time.monotonic() - start < 5
        finally:
            os.kill(pid, sig.SIGCONT)
        wait_for("ok", timeout=30)
        assert generate().status_code == 200

        for _ in range(4):  # supervised: re-created however often it dies, with a growing back-off
            pid = wait_for("ok")["workers"][0]["pid"]
            os.kill(pid, sig.SIGKILL)
            time.sleep(1)
            body = wait_for("ok", timeout=120)
            assert body["workers"][0]["pid"] != pid
        stats = httpx.get(f"{url}/v1/stats", headers=key, timeout=30).json()
        assert stats["workers"][0]["restarts_in_a_row"] == 4  # waited 0.25 + 0.5 + 1 + 2 s before loading
        r = generate()
        assert r.status_code == 200 and r.json()["results"][0]["text"]
        stats = httpx.get(f"{url}/v1/stats", headers=key, timeout=30).json()
        assert stats["workers"][0]["restarts_in_a_row"] == 0  # serving again: the back-off starts afresh

        proc.send_signal(sig.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_soak_with_workers_killed_and_frozen_loses_no_request(small_zoo):  # the zoo it serves, built first
    """Issue 13's soak, at half its 2,000 requests: 1,000 at concurrency 32 against `moerge serve`
    (two workers) while a worker is killed three times and frozen once: each request answered or
    failed with a message within its deadline, none lost; healthy at the end; exit 0 on SIGTERM.
    Every fault still lands mid-traffic (the driver holds back while one is due, the next test);
    the full 2,000 is `moerge bench soak`'s default (docs/serving.md). Half the requests took the
    test from 81 to 65 s of a 2-core `.ci/run`."""
    from moerge.bench import soak

    n = 1000
    r = soak.run(soak.SoakConfig(requests=n, concurrency=32, kills=3, freezes=1))
    print(soak.table(r))
    assert r["requests"] == n and r["lost"] == 0, r["lost_examples"]
    assert r["answered"] + sum(r["failed_clearly"].values()) == n
    assert len(r["faults"]) == 4 and not any("skipped" in f for f in r["faults"]), r["faults"]
    assert r["healthy_at_end"] and r["exit_code"] == 0
    assert r["max_ms"] <= 1000 * (r["config"]["request_timeout_s"] + r["config"]["grace_s"])
    # invariants that hold at any machine speed (issue 26: a count of answered requests does not —
    # how many land in a dead window depends on how fast a worker restarts on a loaded machine):
    # every request has exactly one outcome, and every refusal says why with a retriable status
    assert not any("no message" in k for k in r["failed_clearly"]), r["failure_examples"]  # every failure says why
    assert set(r["failed_clearly"]) <= {"429", "503", "504"}, r["failure_examples"]
    assert r["answered"] > 0  # the server served through the faults


def test_soak_faults_wait_for_a_live_worker_and_land_mid_traffic(monkeypatch):
    """The soak's schedule on a machine where workers restart slowly: after each kill no worker
    answers for a while (here 0.6 s, longer than the rest of the run takes). Every fault still
    lands — on a worker that answers, with requests still to send — because the driver holds back
    while a fault is due; nothing is skipped, every request is answered once."""
    import asyncio
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from moerge.bench import soak

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["content-length"]))
            body = b'{"results": [{"text": "ok"}]}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # noqa: ANN002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    down_until = [0.0]
    faults_at: list[tuple[str, int]] = []  # (signal, requests done when it was sent)
    res, lat = soak.SoakResult(config={}), []
    monkeypatch.setattr(soak, "_health", lambda _url: {"workers": [] if time.monotonic() < down_until[0]
                                                      else [{"state": "ok", "pid": 4242, "worker": 0}]})  # fmt: skip

    def fake_kill(pid, sig):  # noqa: ANN001, ANN202
        faults_at.append((sig, len(lat)))
        if sig == soak.signal.SIGKILL:
            down_until[0] = time.monotonic() + 0.6

    monkeypatch.setattr(soak.os, "kill", fake_kill)
    cfg = soak.SoakConfig(requests=200, concurrency=8, kills=3, freezes=1, freeze_s=0.1, startup_timeout_s=10)
    stop, done = threading.Event(), []
    injected = [threading.Event() for _ in soak._fault_order(cfg)]
    t = threading.Thread(
        target=soak._faults, args=(url, cfg, stop, done, lambda: len(lat) + res.lost, time.monotonic(), injected)
    )
    t.start()
    try:
        asyncio.run(
            soak._drive(
                url, [{"prompt": "p"}] * cfg.requests, cfg, res, lat, list(zip(soak._thresholds(cfg), injected, strict=True))
            )
        )
    finally:
        stop.set()
        t.join(timeout=10)
        server.shutdown()
    assert len(done) == 4 and not any("skipped" in d for d in done), done
    kills = [n for sig, n in faults_at if sig == soak.signal.SIGKILL]
    assert len(kills) == 3 and all(n < cfg.requests for n in kills)  # mid-traffic: requests still to come
    assert [sig for sig, _ in faults_at].count(soak.signal.SIGSTOP) == 1
    assert res.answered == cfg.requests and res.lost == 0 and len(lat) == cfg.requests


@pytest.mark.slow
def test_a_worker_on_a_node_without_the_registry_gets_experts_and_base_through_ray(tmp_path, small_zoo):
    """No shared disk needed: a two-node Ray cluster (ray.cluster_utils.Cluster on this
    machine); the worker runs on the second node with registry and base paths that do not exist
    there. It mirrors both through the head node's RegistryService (verified by sha256) and
    answers as a local worker would; an expert registered after it started is fetched on first use."""
    reg = tmp_path / "reg"
    Registry(small_zoo.registry_path).snapshot(reg)
    example = small_zoo.test_split("sort")[0]
    cache = tmp_path / "far-node-cache"
    script = Path(__file__).parent / "scripts" / "two_nodes.py"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    args = [str(reg), str(small_zoo.base_path), str(small_zoo.lora_path("sort")), example.prompt, example.target, str(cache)]
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["worker_node"] != out["head_node"]
    assert out["worker_registry"].startswith(str(cache)) and out["worker_base"].startswith(str(cache))
    assert out["text"] == example.target and out["late_error"] is None and out["late_text"] == example.target
    mirrored = Registry(out["worker_registry"])
    assert mirrored.verify()["ok"] and {r.name for r in mirrored.list()} >= {"sort", "late"}


@pytest.mark.skipif(shutil.which("ss") is None, reason="lists listening sockets with ss")
def test_the_local_ray_listens_on_loopback_only():
    """`moerge serve`'s local Ray: every port it opens (GCS, raylet, workers, agents) is on
    127.0.0.1; before, 12 listened on the machine's interfaces."""
    code = (
        "import json, subprocess\n"
        "def ls():\n"
        "    out = subprocess.run(['ss', '-ltnH'], capture_output=True, text=True).stdout\n"
        "    return {l.split()[3] for l in out.splitlines()}\n"
        "before = ls()\n"
        "import ray\nfrom moerge.runtime import ensure_ray\nensure_ray(1)\n"
        "ray.get(ray.remote(lambda: 1).remote())\n"
        "print(json.dumps(sorted(ls() - before)))\nray.shutdown()\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    new = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(new) >= 5
    assert all(a.startswith(("127.", "[::ffff:127.", "[::1]")) for a in new), new
