"""The scheduling logic of serving, in plain Python (no Ray, no torch), so it is unit-tested on
its own: which queued requests form the next batch, which resident expert a worker evicts, and
on which worker a group of requests runs.

- :func:`select_batch` — a worker's next batch: the oldest request first, then every queued
  request that can share its ``generate`` call (same composition and decoding mode) while the
  batch's distinct experts still fit the worker's resident slots.
- :class:`BatchQueue` — the asyncio queue a worker drains: up to ``max_batch`` requests, or
  whatever came within ``max_wait_s`` of the oldest one's arrival.
- :class:`WindowBatcher` — a plain micro-batching window for services whose batch is not a
  ``generate`` over LoRA experts (the embeddings and Symbolic-MoE workers): jobs of concurrent
  callers collected for ``max_wait_s`` or until ``max_batch`` items, run together in a thread.
- :class:`Residency` — least-recently-used expert slots of one worker.
- :class:`Placement` — the dispatcher's view of every worker: which experts it holds (a mirror
  of its LRU), how many requests it has outstanding, whether it is alive; it places a group
  of requests where its experts are resident, replicates hot experts onto idle workers and
  takes the least-outstanding replica.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from moerge.serving.types import ServeRequest


def select_batch(queue: Sequence[ServeRequest], max_batch: int, capacity: int | None = None) -> list[int]:
    """Indices (in arrival order) of the requests that form the next batch: the head always,
    then those with the head's batch key while the batch has room and its distinct experts fit
    ``capacity`` slots. Later requests may overtake an incompatible one; the head never waits."""
    if not queue:
        return []
    head = queue[0]
    key = head.batch_key()
    taken, experts = [0], set(head.expert_names)
    for i in range(1, len(queue)):
        if len(taken) >= max_batch:
            break
        req = queue[i]
        if req.batch_key() != key:
            continue
        union = experts | req.expert_names
        if capacity is not None and len(union) > capacity:
            continue
        taken.append(i)
        experts = union
    return taken


@dataclass
class _Item:
    request: ServeRequest
    future: asyncio.Future
    #: a streamed request's text pieces, in order (None: not streamed)
    chunks: asyncio.Queue | None = None


class BatchQueue:
    """A worker's queue: ``put`` a request and await its future; the worker loop calls
    :meth:`next_batch` and resolves the futures. A batch closes when it is full or when
    ``max_wait_s`` has passed since its oldest request arrived (not since the call), so a
    request never waits longer than ``max_wait_s`` for company."""

    def __init__(self, max_batch: int = 16, max_wait_s: float = 0.01, capacity: int | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be ≥ 0, got {max_wait_s}")
        self.max_batch, self.max_wait_s, self.capacity = max_batch, max_wait_s, capacity
        self._items: list[_Item] = []
        self._arrived = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, request: ServeRequest, chunks: asyncio.Queue | None = None) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._items.append(_Item(request, fut, chunks))
        self._arrived.set()
        return fut

    async def next_batch(self) -> list[_Item]:
        while not self._items:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._items[0].request.arrived + self.max_wait_s
        while True:
            picked = select_batch([i.request for i in self._items], self.max_batch, self.capacity)
            left = deadline - time.monotonic()
            if len(picked) >= self.max_batch or left <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=left)
            except asyncio.TimeoutError:
                pass
        chosen = set(picked)
        batch = [self._items[i] for i in picked]
        self._items = [it for i, it in enumerate(self._items) if i not in chosen]
        return batch


class WindowBatcher:
    """Jobs from concurrent callers, collected for up to ``max_wait_s`` after the first (or until
    their sizes reach ``max_batch``), then run together by ``run(jobs) -> results`` (in job
    order) in a thread; an exception reaches every job of the window. Each running event loop
    gets its own queue (a new loop — another ``asyncio.run`` — starts a new drainer)."""

    def __init__(self, run: Any, max_batch: int, max_wait_s: float) -> None:
        self.run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self._queue: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, job: Any, size: int = 1) -> Any:
        """``job``'s result, computed in the window it joins (``size``: its items, e.g. texts)."""
        loop = asyncio.get_running_loop()
        if self._queue is None or self._loop is not loop:
            self._queue, self._loop = asyncio.Queue(), loop
            self._drainer = loop.create_task(self._drain(self._queue))
        future = loop.create_future()
        await self._queue.put((job, size, future))
        return await future

    async def _drain(self, queue: asyncio.Queue) -> None:
        while True:
            window = [await queue.get()]
            deadline = time.monotonic() + self.max_wait_s
            size = window[0][1]
            while size < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=left)
                except asyncio.TimeoutError:
                    break
                window.append(item)
                size += item[1]
            try:
                results = await asyncio.to_thread(self.run, [job for job, _, _ in window])
            except Exception as exc:  # noqa: BLE001 - every waiting caller gets the error
                for _, _, future in window:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, _, future), result in zip(window, results, strict=True):
                if not future.done():
                    future.set_result(result)


class Residency:
    """Which expert sits in which of ``capacity`` slots, least recently used first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"max_resident must be at least 1, got {capacity}")
        self.capacity = capacity
        self.slots: OrderedDict[str, int] = OrderedDict()

    def __contains__(self, name: object) -> bool:
        return name in self.slots

    @property
    def resident(self) -> list[str]:
        """Least recently used first."""
        return list(self.slots)

    def acquire(self, names: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, int]], list[str]]:
        """Slots for ``names`` (all of one batch): marks them most recently used, evicting the
        least recently used experts the batch does not need. Returns (name → slot, the
        (name, slot) pairs to load, the evicted names)."""
        wanted = list(dict.fromkeys(names))
        if len(wanted) > self.capacity:
            raise ValueError(f"a batch needs {len(wanted)} experts but only {self.capacity} can be resident (max_resident)")
        free = sorted(set(range(self.capacity)) - set(self.slots.values()))
        loads, evicted = [], []
        for name in wanted:
            if name in self.slots:
                self.slots.move_to_end(name)
                continue
            if free:
                slot = free.pop(0)
            else:
                victim = next(n for n in self.slots if n not in wanted)
                slot = self.slots.pop(victim)
                evicted.append(victim)
            self.slots[name] = slot
            loads.append((name, slot))
        return {n: self.slots[n] for n in wanted}, loads, evicted

    def release(self, name: str) -> None:
        """Forget ``name`` (its load failed); its slot is free again."""
        self.slots.pop(name, None)


def group_requests(requests: Sequence[ServeRequest], max_group: int | None = None) -> list[tuple[Hashable, list[int]]]:
    """Request indices grouped by what must be resident to serve them (a composition, or a set
    of experts), in order of first appearance; groups longer than ``max_group`` are split so a
    hot expert's traffic can spread over replicas."""
    groups: dict[Hashable, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault((r.composition, r.expert_names), []).append(i)
    out = []
    for key, idx in groups.items():
        step = max_group or len(idx)
        out += [(key, idx[j : j + step]) for j in range(0, len(idx), step)]
    return out


@dataclass
class WorkerView:
    resident: OrderedDict[str, None] = field(default_factory=OrderedDict)
    outstanding: int = 0
    alive: bool = True
    served: int = 0


class Placement:
    """The dispatcher's view of ``workers`` workers with ``capacity`` expert slots each.

    :meth:`choose` picks a worker for a group needing ``experts``: among live workers that
    hold all of them, the least-outstanding — unless even that one has ``replicate_at`` or
    more requests outstanding and some worker without them is less busy, which then loads
    them too (a hot expert is replicated). When nobody holds them: the least-outstanding
    worker, preferring one with free slots."""

    def __init__(self, workers: int, capacity: int, replicate_at: int = 8) -> None:
        if workers < 1:
            raise ValueError(f"need at least one worker, got {workers}")
        self.capacity, self.replicate_at = capacity, replicate_at
        self.workers = [WorkerView() for _ in range(workers)]

    def choose(self, experts: Iterable[str], exclude: Iterable[int] = ()) -> int:
        need = set(experts)
        banned = set(exclude)
        live = [w for w, v in enumerate(self.workers) if v.alive and w not in banned]
        if not live:
            live = [w for w, v in enumerate(self.workers) if w not in banned] or list(range(len(self.workers)))
        views = self.workers
        holders = [w for w in live if need <= views[w].resident.keys()]

        def load(w: int) -> tuple[int, int]:
            return views[w].outstanding, len(views[w].resident)

        if holders:
            best = min(holders, key=lambda w: views[w].outstanding)
            others = [w for w in live if w not in holders]
            if views[best].outstanding >= self.replicate_at and others:
                spare = min(others, key=load)
                if views[spare].outstanding < views[best].outstanding:
                    return spare
            return best
        return min(live, key=load)

    def assign(self, worker: int, experts: Iterable[str], n: int) -> None:
        """``n`` requests needing ``experts`` go to ``worker``: mirror its LRU, count them."""
        v = self.workers[worker]
        for name in experts:
            v.resident[name] = None
            v.resident.move_to_end(name)
        while len(v.resident) > self.capacity:
            v.resident.popitem(last=False)
        v.outstanding += n

    def done(self, worker: int, n: int, resident: Sequence[str] | None = None) -> None:
        """``n`` requests came back from ``worker``; ``resident`` (LRU first) is its own report."""
        v = self.workers[worker]
        v.outstanding = max(0, v.outstanding - n)
        v.served += n
        v.alive = True
        if resident is not None:
            v.resident = OrderedDict((name, None) for name in resident)

    def failed(self, worker: int, n: int) -> None:
        """``worker`` died with ``n`` requests: Ray restarts it empty."""
        v = self.workers[worker]
        v.outstanding = max(0, v.outstanding - n)
        v.resident.clear()

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            {"worker": w, "resident": list(v.resident), "outstanding": v.outstanding, "alive": v.alive, "served": v.served}
            for w, v in enumerate(self.workers)
        ]
