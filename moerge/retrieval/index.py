"""A faiss index over a corpus's document embeddings, saved beside it and reloaded when the
corpus and encoder are the same."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moerge.progress import progress_bar
from moerge.registry.files import atomic_write_bytes, atomic_write_json
from moerge.routers.embedding import DEFAULT_EMBEDDER

#: texts → [n, d] unit-norm embeddings
Encode = Callable[[Sequence[str]], torch.Tensor]


def doc_text(doc: Mapping[str, str]) -> str:
    """How a BEIR document is embedded: title and text, as BEIR's dense models do."""
    title, text = doc.get("title", ""), doc.get("text", "")
    return f"{title} {text}".strip() if title else text


def corpus_fingerprint(corpus: Mapping[str, Mapping[str, str]]) -> str:
    h = hashlib.sha256()
    for k in corpus:
        h.update(k.encode())
        h.update(b"\0")
        h.update(doc_text(corpus[k]).encode())
        h.update(b"\1")
    return h.hexdigest()[:16]


def _encoder(encoder: Any) -> tuple[Encode, str]:
    """(encode function, id) for an Embedder, a SentenceTransformer, a name/path or a callable."""
    if encoder is None or isinstance(encoder, str):
        from moerge.routers.embedding import load_embedder

        emb = load_embedder(encoder)
        return emb.encode, emb.id
    if hasattr(encoder, "encode") and hasattr(encoder, "id"):
        return encoder.encode, str(encoder.id)
    if hasattr(encoder, "encode"):  # a SentenceTransformer

        def enc(texts: Sequence[str]) -> torch.Tensor:
            return (
                encoder.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
                .float()
                .cpu()
            )

        return enc, getattr(encoder, "moerge_id", None) or type(encoder).__name__  # set moerge_id to name it
    if callable(encoder):
        return encoder, getattr(encoder, "__name__", "callable")
    raise TypeError(f"an encoder must be an Embedder, a SentenceTransformer, a name or a callable, got {type(encoder).__name__}")


def index_folder(data: str | Path, encoder: str | None = None) -> Path:
    """Where a BEIR folder keeps its saved index for ``encoder`` (``DATA/.moerge-index/NAME``),
    shared by ``moerge retrieval``, compositions and the embedded suite."""
    return Path(data).expanduser() / ".moerge-index" / str(encoder or DEFAULT_EMBEDDER).replace("/", "--")


class Index:
    """Exact inner-product search (faiss ``IndexFlatIP``) over unit-norm document embeddings."""

    def __init__(self, index: Any, doc_ids: list[str], encoder_id: str, fingerprint: str) -> None:
        self.index, self.doc_ids = index, doc_ids
        self.encoder_id, self.fingerprint = encoder_id, fingerprint

    def __len__(self) -> int:
        return len(self.doc_ids)

    @classmethod
    def build(
        cls,
        corpus: Mapping[str, Mapping[str, str]],
        encoder: Any = None,
        batch_size: int = 128,
        progress: bool | None = None,
    ) -> Index:
        """Embed every document (title + text) with ``encoder`` (default the bundled MiniLM)."""
        import faiss

        if not corpus:
            raise ValueError("the corpus is empty")
        encode, enc_id = _encoder(encoder)
        ids = list(corpus)
        chunks = []
        for start in progress_bar(range(0, len(ids), batch_size), desc="index documents", progress=progress):
            emb = encode([doc_text(corpus[k]) for k in ids[start : start + batch_size]])
            chunks.append(np.ascontiguousarray(emb.float().numpy(), dtype=np.float32))
        matrix = np.concatenate(chunks)
        index = faiss.IndexFlatIP(matrix.shape[1])
        index.add(matrix)
        return cls(index, ids, enc_id, corpus_fingerprint(corpus))

    def search(
        self, queries: Mapping[str, str], k: int = 100, encoder: Any = None, embeddings: torch.Tensor | None = None
    ) -> dict[str, dict[str, float]]:
        """The top ``k`` documents per query as ``{query_id: {doc_id: score}}``. Queries are
        embedded with ``encoder`` (default: the one that built the index), or given as
        ``embeddings`` (one row per query, in ``queries``' order — e.g. from a routed encoder)."""
        if embeddings is None:
            encode, enc_id = _encoder(encoder if encoder is not None else self.encoder_id)
            embeddings = encode(list(queries.values()))
        if embeddings.shape[0] != len(queries):
            raise ValueError(f"{embeddings.shape[0]} query embeddings for {len(queries)} queries")
        if embeddings.shape[1] != self.index.d:
            raise ValueError(f"query embeddings have {embeddings.shape[1]} dimensions; the index has {self.index.d}")
        k = min(int(k), len(self.doc_ids))
        scores, rows = self.index.search(np.ascontiguousarray(embeddings.float().cpu().numpy(), dtype=np.float32), k)
        return {
            q: {self.doc_ids[int(r)]: float(s) for r, s in zip(rows[i], scores[i], strict=True) if r >= 0}
            for i, q in enumerate(queries)
        }

    def save(self, folder: str | Path) -> Path:
        import faiss

        root = Path(folder).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(root / "index.faiss", bytes(faiss.serialize_index(self.index)))
        atomic_write_json(
            root / "index.json",
            {"doc_ids": self.doc_ids, "encoder": self.encoder_id, "corpus_fingerprint": self.fingerprint, "dim": self.index.d},
        )
        return root

    @classmethod
    def load(
        cls, folder: str | Path, corpus: Mapping[str, Mapping[str, str]] | None = None, encoder_id: str | None = None
    ) -> Index:
        """A saved index; with ``corpus`` / ``encoder_id`` it must have been built from them
        (a stale index is refused, naming what changed)."""
        import faiss

        root = Path(folder).expanduser()
        if not (root / "index.faiss").is_file() or not (root / "index.json").is_file():
            raise FileNotFoundError(f"no saved index in {root} (index.faiss and index.json)")
        meta = json.loads((root / "index.json").read_text())
        if corpus is not None and corpus_fingerprint(corpus) != meta["corpus_fingerprint"]:
            raise ValueError(f"the index in {root} was built from another corpus; rebuild it")
        if encoder_id is not None and encoder_id != meta["encoder"]:
            raise ValueError(f"the index in {root} was built with encoder {meta['encoder']!r}, not {encoder_id!r}; rebuild it")
        index = faiss.deserialize_index(np.frombuffer((root / "index.faiss").read_bytes(), dtype=np.uint8))
        return cls(index, list(meta["doc_ids"]), meta["encoder"], meta["corpus_fingerprint"])

    @classmethod
    def build_or_load(cls, folder: str | Path, corpus: Mapping[str, Mapping[str, str]], encoder: Any = None, **kw: Any) -> Index:
        """The index saved in ``folder`` if it matches ``corpus`` and ``encoder``, else a new one (saved there)."""
        # a name is its own id (no model loads just to find a saved index)
        enc_id = (encoder or DEFAULT_EMBEDDER) if encoder is None or isinstance(encoder, str) else _encoder(encoder)[1]
        try:
            return cls.load(folder, corpus, enc_id)
        except (FileNotFoundError, ValueError, KeyError):
            index = cls.build(corpus, encoder, **kw)
            index.save(folder)
            return index
