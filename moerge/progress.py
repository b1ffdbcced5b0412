"""Progress for long work, shown the way the place it is written to can show it.

``progress`` arguments across moerge take ``None`` (the default: decide from the terminal),
``True`` (always a tqdm bar) or ``False`` (nothing):

* attached to a terminal (stderr is a TTY), ``None`` draws a tqdm bar;
* otherwise (a log file, systemd, CI, pytest's capture) ``None`` writes a plain line now and
  then — at most one every :data:`LINE_INTERVAL_S` seconds, and none for work that ends
  sooner — instead of hundreds of kilobytes of carriage-returned bars.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm.auto import tqdm

#: seconds between two progress lines written to a non-terminal
LINE_INTERVAL_S = float(os.environ.get("MOERGE_PROGRESS_INTERVAL", "10"))


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """tqdm's small interface (iterate, ``update``, ``set_postfix``, ``set_description``,
    ``close``) writing ``desc: n/total (p%), elapsed`` lines, rate-limited, to ``file``."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        file: TextIO | None = None,
        interval: float | None = None,
        **_: Any,
    ) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.n = total, desc, 0
        self.file = file
        self.interval = LINE_INTERVAL_S if interval is None else interval
        self.start = self.last = time.monotonic()
        self.postfix = ""
        self.wrote = False
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "LineProgress without an iterable: use update()"
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _line(self, done: bool = False) -> str:
        elapsed = time.monotonic() - self.start
        count = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        tail = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc or 'progress'}: {count}{tail}, {elapsed:.0f} s{' — done' if done else ''}"

    def _write(self, text: str) -> None:
        out = self.file if self.file is not None else sys.stderr
        print(text, file=out, flush=True)
        self.wrote = True

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._write(self._line())

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.wrote:  # a job long enough to report says when it ends
            self._write(self._line(done=True))


class _Silent(LineProgress):
    def _write(self, text: str) -> None:
        return None


def progress_bar(iterable: Iterable[Any] | None = None, *, progress: bool | None = None, **kwargs: Any) -> Any:
    """A tqdm bar, a :class:`LineProgress` or nothing visible, by ``progress`` (see the module)."""
    if progress is False:
        return _Silent(iterable, **kwargs)
    if progress is True or is_terminal(kwargs.get("file")):
        return tqdm(iterable, **kwargs)
    return LineProgress(iterable, **kwargs)


@contextmanager
def hf_bars(progress: bool | None = None) -> Iterator[None]:
    """Hugging Face's own bars ("Loading weights", downloads) only where a bar can be drawn:
    off a terminal they would write carriage-returned lines into the log. Restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    want = progress is True or (progress is None and is_terminal())
    if want != was:
        (hf_logging.enable_progress_bar if want else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        if want != was:
            (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
