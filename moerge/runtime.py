"""Process-level runtime shared by every layer that starts Ray work (serving, Symbolic-MoE's
batched execution, benchmarks): kept low in the stack so none of them reaches up into another."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def ensure_ray(num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Start a local Ray (no dashboard, small object store) unless one is running or
    ``RAY_ADDRESS`` points at a cluster. ``log_to_driver``: the workers' stderr (their
    warnings and errors, see :func:`actor_logging`) is printed here."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=log_to_driver)
        return
    # A local Ray is a one-machine cluster: keep its GCS, raylet and worker ports on loopback.
    # Ray binds them to the node's address, which it takes from the network unless it believes it
    # cannot form clusters (its Windows/macOS rule, read here at call time); say so for this start.
    from ray._private import ray_constants

    clustered = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if clustered is not None and os.environ.get("MOERGE_RAY_LOOPBACK", "1") != "0":
        ray_constants.ENABLE_RAY_CLUSTER = False
    # address="local": a new instance for this process. Without it Ray joins the last cluster
    # started on this machine (it reads /tmp/ray/ray_current_cluster) — another user's `moerge
    # serve`, or a test's — and then refuses num_cpus (measured under two pytest-xdist workers).
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            object_store_memory=80 * 1024**2,
            log_to_driver=log_to_driver,
        )
    finally:
        if clustered is not None:
            ray_constants.ENABLE_RAY_CLUSTER = clustered


def default_cache_dir() -> Path:
    """``$MOERGE_CACHE``, else ``$XDG_CACHE_HOME/moerge``, else ``~/.cache/moerge``."""
    env = os.environ.get("MOERGE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "moerge"


def quiet_hf() -> None:
    """transformers' and PEFT's warnings and progress bars off (a CLI's own output is the report)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import warnings

    # PEFT calls a transformers helper that transformers 5 deprecated: nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


def zoo_seed() -> int | None:
    """``$MOERGE_ZOO_SEED``: the seed the embedded suites are built with when asked for by preset
    name (the zoo, the retrieval, control and Symbolic-MoE suites; each seed cached apart), so
    every process — a CLI, a server, a test's subprocess — builds the same ones. None: the presets'
    own seed (0)."""
    value = os.environ.get("MOERGE_ZOO_SEED", "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"MOERGE_ZOO_SEED must be an integer, got {value!r}") from None


def seeded(preset: T) -> T:
    """A named suite preset (a dataclass with a ``seed``) with :func:`zoo_seed` as its seed when
    ``$MOERGE_ZOO_SEED`` is set; as given otherwise."""
    from dataclasses import replace

    seed = zoo_seed()
    return preset if seed is None else replace(preset, seed=seed)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created with its folder) while the block runs: one
    process builds or converts something cached, the others wait and then find it built."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
