"""Build the demo's zoo-independent suites in a second process while the first builds the zoo
(``moerge demo`` on ≥ 2 free cores): the retrieval suite with its cached scores, and the
token-routing control suite. Each process gets one torch thread, so the two together use the
two cores that one process would (the zoo's small-op training gains only 1.3× from a second
thread; a second process doubles the work done). Builds are cached, locked and atomic, so the
demo's own ``load_*`` calls find them finished, wait on the lock while they build, or build
them itself if this process failed (its log is kept beside the cache).

    python -m moerge.bench.prebuild [--cache DIR] [--retrieval PRESET] [--control PRESET]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def _retrieval(preset: Any) -> Any:
    """A retrieval preset by name (as load_suite resolves it) or as given."""
    from moerge.zoo.retrieval import named_preset

    return named_preset(preset) if isinstance(preset, str) else preset


def _control(preset: Any) -> Any:
    """A control preset by name (as load_control resolves it) or as given."""
    from moerge.zoo.control import named_preset

    return named_preset(preset) if isinstance(preset, str) else preset


def cached(cache: Path, retrieval: Any, control: Any) -> bool:
    """Whether every named suite (a preset name or a preset, e.g. another seed's) is already built under ``cache``."""
    if retrieval is not None:
        p = _retrieval(retrieval)
        if not (cache / "retrieval" / f"{p.name}-{p.key()}" / "meta.json").exists():
            return False
    if control is not None:
        c = _control(control)
        if not (cache / "control" / f"{c.name}-{c.key()}" / "meta.json").exists():
            return False
    return True


class Background:
    """The prebuild process, started beside the caller, which gives up one of its threads
    while it runs (:meth:`poll` gives it back once the process has ended)."""

    def __init__(self, cache: Path, retrieval: Any, control: Any, threads: int) -> None:
        from moerge.device import set_threads

        self.threads = threads
        self.returncode: int | None = None  # the process's, once it has ended
        cache.mkdir(parents=True, exist_ok=True)
        self.log = cache / "prebuild.log"
        args = [sys.executable, "-m", "moerge.bench.prebuild", "--cache", str(cache)]
        if retrieval is not None:
            r = _retrieval(retrieval)
            args += ["--retrieval", r.name, "--retrieval-seed", str(r.lora.seed)]
        if control is not None:
            c = _control(control)
            args += ["--control", c.name, "--control-seed", str(c.seed)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        with open(self.log, "w") as log:
            self.proc: subprocess.Popen[Any] | None = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        set_threads(max(1, threads - 1))

    def poll(self) -> bool:
        """True once the process has ended (then the caller has its threads back)."""
        if self.proc is not None and self.proc.poll() is not None:
            self._done()
        return self.proc is None

    def wait(self) -> None:
        if self.proc is not None:
            self.proc.wait()
            self._done()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        self._done()

    def _done(self) -> None:
        from moerge.device import set_threads

        if self.proc is not None:
            self.returncode = self.proc.returncode
            self.proc = None
            set_threads(self.threads)


def maybe_start(cache: Path, retrieval: Any, control: Any, threads: int) -> Background | None:
    """A :class:`Background` for the suites not yet built, when there are ≥ 2 threads to share."""
    if threads < 2 or (retrieval is None and control is None) or cached(cache, retrieval, control):
        return None
    return Background(cache, retrieval, control, threads)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m moerge.bench.prebuild", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=None)
    ap.add_argument("--retrieval", default=None, help="a retrieval preset: its suite and the bench's cached scores")
    ap.add_argument("--retrieval-seed", type=int, default=0, help="the retrieval suite's query LoRAs' seed")
    ap.add_argument("--control", default=None, help="a control preset")
    ap.add_argument("--control-seed", type=int, default=0, help="the control suite's seed")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from moerge.runtime import quiet_hf

    quiet_hf()
    if a.control:  # the smaller first: the demo needs it last, but it is quick
        from dataclasses import replace

        from moerge.zoo.control import load_control

        load_control(replace(_control(a.control), seed=a.control_seed), cache_dir=a.cache, progress=False)
        print(f"control suite {a.control!r} ready", flush=True)
    if a.retrieval:
        from dataclasses import replace

        from moerge.bench import retrieval as retrieval_bench
        from moerge.zoo.retrieval import load_suite

        r = _retrieval(a.retrieval)
        r = replace(r, lora=replace(r.lora, seed=a.retrieval_seed))
        retrieval_bench.run(r.name, cache_dir=a.cache, progress=False, suite=load_suite(r, cache_dir=a.cache, progress=False))
        print(f"retrieval suite {a.retrieval!r} and its scores ready", flush=True)


if __name__ == "__main__":
    main()
