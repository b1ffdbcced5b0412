"""Mapping a query's keywords onto the validation keywords the profiles know (spec §3.4): each
keyword goes to its nearest validation keyword by cosine similarity of all-MiniLM-L6-v2
embeddings (top-1, no threshold — pitfall 3; :func:`map_keywords` reports each similarity so a
caller can see how far a mapping reached)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def map_keywords(
    queries: Mapping[str, Sequence[str]], vocabulary: Sequence[str], embedder: Any = None
) -> tuple[dict[str, list[str]], dict[str, float]]:
    """(query → its keywords replaced by their nearest vocabulary keyword, keyword → cosine
    similarity of that match). A keyword already in the vocabulary maps to itself (similarity 1).
    ``embedder``: an :class:`~moerge.routers.embedding.Embedder` (default: the bundled MiniLM)."""
    vocab = sorted(set(vocabulary))
    if not vocab:
        raise ValueError("the validation keyword vocabulary is empty: annotate the validation set first")
    wanted = sorted({k for kws in queries.values() for k in kws} - set(vocab))
    nearest: dict[str, str] = {k: k for k in vocab}
    sims: dict[str, float] = dict.fromkeys(vocab, 1.0)
    if wanted:
        if embedder is None:
            from moerge.routers.embedding import load_embedder

            embedder = load_embedder(None)
        v = torch.nn.functional.normalize(embedder.encode(vocab).float(), dim=-1)
        w = torch.nn.functional.normalize(embedder.encode(wanted).float(), dim=-1)
        best = (w @ v.T).max(dim=1)
        for kw, i, s in zip(wanted, best.indices, best.values, strict=True):
            nearest[kw], sims[kw] = vocab[int(i)], float(s)
    return {q: [nearest[k] for k in kws] for q, kws in queries.items()}, {
        k: sims[k] for k in {k for kws in queries.values() for k in kws}
    }
