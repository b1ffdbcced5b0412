"""``moerge bench soak``: many requests at high concurrency against a real ``moerge serve``
process while its workers are killed and frozen; every request must come back answered (200)
or clearly failed (a 4xx/5xx with a message) within its deadline — none lost — and the server
must be healthy at the end.

The server runs as a subprocess on a copy of the small zoo's registry (two workers, so one can
die while the other serves). Faults are spaced through the run: ``kills`` SIGKILLs and
``freezes`` SIGSTOPs (each thawed after ``freeze_s``), each on the worker ``/healthz`` reports.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moerge.registry import Registry


@dataclass
class SoakConfig:
    requests: int = 2000
    concurrency: int = 32
    kills: int = 3
    freezes: int = 1
    freeze_s: float = 4.0
    replicas: int = 2
    #: the server's per-request deadline; a client waits this plus ``grace_s`` before calling a request lost
    request_timeout_s: float = 10.0
    grace_s: float = 10.0
    max_new_tokens: int = 8
    preset: str = "small"
    startup_timeout_s: float = 240.0


@dataclass
class SoakResult:
    config: dict[str, Any]
    requests: int = 0
    answered: int = 0
    failed_clearly: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    lost_examples: list[str] = field(default_factory=list)
    #: up to three messages per failing status, as the client saw them
    failure_examples: dict[str, list[str]] = field(default_factory=dict)
    wall_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    faults: list[str] = field(default_factory=list)
    healthy_at_end: bool = False
    final_health: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    startup_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(url: str) -> dict[str, Any]:
    import httpx

    try:
        r = httpx.get(f"{url}/healthz", timeout=10)
        return {"code": r.status_code, **r.json()}
    except (httpx.HTTPError, ValueError) as exc:
        return {"code": 0, "status": f"no answer ({type(exc).__name__})", "workers": []}


def _wait_ok(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        h = _health(url)
        if h.get("status") == "ok":
            return h
        time.sleep(0.5)
    raise TimeoutError(f"the server was not healthy within {timeout:g} s: {log.read_text()[-2000:]}")


def _fault_order(cfg: SoakConfig) -> list[str]:
    order = ["kill"] * cfg.kills
    for j in range(cfg.freezes):
        order.insert(min(len(order), 1 + 2 * j), "freeze")
    return order


def _thresholds(cfg: SoakConfig) -> list[float]:
    """Fault i is due when this many requests are done (even steps: i+1 of n+1 parts)."""
    n = len(_fault_order(cfg))
    return [cfg.requests * (i + 1) / (n + 1) for i in range(n)]


def _faults(
    url: str, cfg: SoakConfig, stop: threading.Event, done: list[str], progress: Any, start_at: float,
    injected: list[threading.Event],
) -> None:  # fmt: skip
    """Kills and freezes at even steps of the run's progress, each on a worker that answers.

    A fault waits (up to ``startup_timeout_s``) for a worker to answer — after a kill the pool may
    still be restarting — and the driver issues at most ``concurrency`` requests past a fault's
    step until it is injected (``injected``): so every fault lands mid-traffic on a live worker
    however fast this machine restarts workers. Before, a slow restart let the requests run out
    first and the last fault was skipped."""
    try:
        for i, (what, due) in enumerate(zip(_fault_order(cfg), _thresholds(cfg), strict=True)):
            try:
                while progress() < due:
                    if stop.wait(0.05):
                        return
                deadline = time.monotonic() + cfg.startup_timeout_s
                workers: list[dict[str, Any]] = []
                while not workers and time.monotonic() < deadline and not stop.is_set():
                    workers = [w for w in _health(url).get("workers", []) if w.get("state") == "ok" and w.get("pid")]
                    if not workers:
                        time.sleep(0.2)
                if not workers:
                    done.append(f"{what}: skipped (no worker answered within {cfg.startup_timeout_s:g} s)")
                    continue
                w = workers[i % len(workers)]
                t = round(time.monotonic() - start_at, 1)
                if what == "kill":
                    os.kill(w["pid"], signal.SIGKILL)
                    done.append(f"{t} s: killed worker {w['worker']}")
                else:
                    os.kill(w["pid"], signal.SIGSTOP)
                    done.append(f"{t} s: froze worker {w['worker']} for {cfg.freeze_s:g} s")
                    injected[i].set()  # traffic flows on while the worker is frozen
                    stop.wait(cfg.freeze_s)
                    os.kill(w["pid"], signal.SIGCONT)
            finally:
                injected[i].set()
    finally:  # whatever happens here, the driver is never left waiting on a fault
        for ev in injected:
            ev.set()


async def _drive(
    url: str, bodies: list[dict[str, Any]], cfg: SoakConfig, res: SoakResult, lat: list[float],
    gates: list[tuple[float, threading.Event]] = (),
) -> None:  # fmt: skip
    """Send ``bodies`` at ``cfg.concurrency``; request j waits while a gate (step, event) with
    j ≥ step + concurrency is not yet set (a fault due at that step, not yet injected)."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for j, b in enumerate(bodies):
        queue.put_nowait((j, b))
    limit = cfg.request_timeout_s + cfg.grace_s

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            j, body = queue.get_nowait()
            while any(j >= step + cfg.concurrency and not ev.is_set() for step, ev in gates):
                await asyncio.sleep(0.02)
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/generate", json=body, timeout=limit)
                ms = 1000 * (time.perf_counter() - t0)
                lat.append(ms)
                if r.status_code == 200 and r.json()["results"][0]["text"] is not None:
                    res.answered += 1
                else:
                    message = (
                        r.json().get("error", {}).get("message", "")
                        if r.headers.get("content-type", "").startswith("application/json")
                        else ""
                    )
                    key = f"{r.status_code}" + (" (no message)" if not message else "")
                    res.failed_clearly[key] = res.failed_clearly.get(key, 0) + 1
                    seen = res.failure_examples.setdefault(key, [])
                    if len(seen) < 3:
                        seen.append(message[:200])
                    if not message:
                        res.lost += 1
                        res.lost_examples.append(f"HTTP {r.status_code} without a message")
            except (httpx.HTTPError, ValueError) as exc:
                res.lost += 1
                if len(res.lost_examples) < 5:
                    res.lost_examples.append(f"{type(exc).__name__}: {exc}"[:200])

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=cfg.concurrency)) as client:
        await asyncio.gather(*(worker(client) for _ in range(cfg.concurrency)))


def run(cfg: SoakConfig | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Start a server, soak it with faults, stop it with SIGTERM; returns the figures."""
    from moerge import zoo as zoo_mod

    cfg = cfg or SoakConfig()
    z = zoo_mod.load(cfg.preset, progress=progress)
    res = SoakResult(config=asdict(cfg))
    tasks = z.held_in
    bodies = []
    for i in range(cfg.requests):
        t = tasks[i % len(tasks)]
        split = z.test_split(t)
        bodies.append({"prompt": split[(i // len(tasks)) % len(split)].prompt, "expert": t, "max_new_tokens": cfg.max_new_tokens})
    with tempfile.TemporaryDirectory(prefix="moerge-soak-") as tmp:
        reg = Path(tmp) / "reg"
        Registry(z.registry_path).snapshot(reg)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = Path(tmp) / "server.log"
        cmd = [sys.executable, "-c", "from moerge.cli import main; main()", "serve", "--registry", str(reg), "--port", str(port)]
        cmd += ["--replicas", str(cfg.replicas), "--num-cpus", str(round(0.9 / cfg.replicas, 2)), "--threads", "1"]
        cmd += ["--request-timeout", str(cfg.request_timeout_s), "--max-resident", "8"]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=fh, env=env)
        try:
            t0 = time.monotonic()
            _wait_ok(url, proc, cfg.startup_timeout_s, log)
            res.startup_s = round(time.monotonic() - t0, 1)
            asyncio.run(_drive(url, bodies[: min(32, len(bodies))], cfg, SoakResult(config={}), []))  # warm-up: experts loaded
            stop, lat = threading.Event(), []
            injected = [threading.Event() for _ in _fault_order(cfg)]
            start = time.monotonic()
            injector = threading.Thread(
                target=_faults, args=(url, cfg, stop, res.faults, lambda: len(lat) + res.lost, start, injected), daemon=True
            )
            injector.start()
            asyncio.run(_drive(url, bodies, cfg, res, lat, list(zip(_thresholds(cfg), injected, strict=True))))
            res.wall_s = round(time.monotonic() - start, 1)
            stop.set()
            injector.join(timeout=cfg.freeze_s + 5)
            res.requests = len(bodies)
            lat.sort()
            if lat:
                res.p50_ms = round(lat[len(lat) // 2], 1)
                res.p99_ms = round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1)
                res.max_ms = round(lat[-1], 1)
            try:
                res.final_health = _wait_ok(url, proc, 120, log)
                res.healthy_at_end = True
            except (TimeoutError, RuntimeError):
                res.final_health = _health(url)
            proc.send_signal(signal.SIGTERM)
            res.exit_code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return res.to_json()


def table(r: dict[str, Any]) -> str:
    c = r["config"]
    failed = ", ".join(f"{k}: {v}" for k, v in sorted(r["failed_clearly"].items())) or "none"
    rows = [
        "| what | figure |",
        "|---|---|",
        f"| requests (concurrency {c['concurrency']}) | {r['requests']} |",
        f"| answered (200) | {r['answered']} |",
        f"| failed clearly (status: count) | {failed} |",
        f"| lost (no answer within deadline + {c['grace_s']:g} s, or a failure without a message) | {r['lost']} |",
        f"| faults | {'; '.join(r['faults']) or 'none'} |",
        f"| wall | {r['wall_s']} s |",
        f"| latency p50 / p99 / max | {r['p50_ms']} / {r['p99_ms']} / {r['max_ms']} ms |",
        f"| healthy at the end; exit code after SIGTERM | {r['healthy_at_end']}; {r['exit_code']} |",
    ]
    return "\n".join(rows)
