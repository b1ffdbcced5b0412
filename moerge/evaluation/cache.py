"""Scores cached per (method, its settings, expert versions, base, task file, split): a rerun
after one more expert or one more task computes only what changed. One JSON file per entry,
written atomically; an unreadable entry is treated as missing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from moerge.registry.files import atomic_write_json


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


class ScoreCache:
    """``get``/``put`` by a key dict; ``None`` as the folder: a cache that keeps nothing."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root).expanduser() if root is not None else None
        self.hits = 0
        self.misses = 0

    def _path(self, key: dict[str, Any]) -> Path:
        assert self.root is not None
        h = key_hash(key)
        return self.root / h[:2] / f"{h}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        if self.root is not None:
            try:
                entry = json.loads(self._path(key).read_text())
                if entry.get("key") == json.loads(json.dumps(key, sort_keys=True, default=str)):
                    self.hits += 1
                    return entry["value"]
            except (OSError, ValueError, KeyError):
                pass
        self.misses += 1
        return None

    def put(self, key: dict[str, Any], value: dict[str, Any]) -> None:
        if self.root is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"key": key, "value": value})
