"""Per-example metrics of the task-set format: exact match, prefix and contains after a declared
normalisation, any of several targets, and a user metric by import path."""

from __future__ import annotations

import importlib
import re
import string
from collections.abc import Callable, Sequence

from moerge.hints import did_you_mean

Metric = Callable[[str, Sequence[str]], float]

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")

#: normalisations, applied in this order whatever order they are declared in
NORMALIZERS: dict[str, Callable[[str], str]] = {
    "punctuation": lambda s: _PUNCT.sub("", s),
    "case": str.lower,
    "whitespace": lambda s: " ".join(s.split()),
    "strip": str.strip,
}


def normalizer(names: Sequence[str]) -> Callable[[str], str]:
    steps = [fn for n, fn in NORMALIZERS.items() if n in names]

    def apply(text: str) -> str:
        for fn in steps:
            text = fn(text)
        return text

    return apply


BUILTIN: dict[str, Callable[[str, str], bool]] = {
    "exact_match": lambda p, t: p == t,
    "prefix": lambda p, t: p.startswith(t),
    "contains": lambda p, t: t in p,
}


def check_metric(name: str) -> str:
    """``name`` if it is a built-in metric or an importable ``module:function``, else a clear error."""
    if name in BUILTIN:
        return name
    if ":" not in name:
        raise ValueError(
            f"unknown metric {name!r}{did_you_mean(name, BUILTIN)}; built in: {', '.join(BUILTIN)}, "
            "or a function of yours as 'package.module:function'"
        )
    load_user_metric(name)
    return name


def load_user_metric(path: str) -> Metric:
    module, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"metric {path!r} cannot be imported: {exc}") from None
    if not callable(fn):
        raise ValueError(f"metric {path!r} is not callable")
    return fn


def metric_fn(name: str, normalize: Sequence[str]) -> Metric:
    """(prediction, targets) → score in [0, 1]. Built-ins: 1 when the normalised prediction
    matches any normalised target. A user metric gets the raw prediction and targets."""
    if name not in BUILTIN:
        user = load_user_metric(name)

        def checked(prediction: str, targets: Sequence[str]) -> float:
            value = float(user(prediction, targets))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"metric {name!r} returned {value} for {prediction!r}; a metric gives a score in [0, 1]")
            return value

        return checked
    norm, test = normalizer(normalize), BUILTIN[name]

    def score(prediction: str, targets: Sequence[str]) -> float:
        p = norm(prediction)
        return float(any(test(p, norm(t)) for t in targets))

    return score


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]
