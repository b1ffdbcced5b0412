"""A sentence encoder with LoRA experts: every row of a batch may use its own expert, through the
multi-expert layer — one forward per batch, not one adapter switch per query.

Experts are PEFT LoRA folders over the encoder's transformer (what ``get_peft_model`` on the
sentence-transformers model's ``auto_model`` saves, or sentence-transformers'
``add_adapter`` + ``save_pretrained``), registered like any LoRA: the registry checks each
module's shape against the encoder's weights. RouterRetriever puts them on the query encoder
only; documents are embedded by the base, so one index serves every expert.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from moerge.adapters import Assignment, attach, load_lora, use_weights
from moerge.progress import hf_bars
from moerge.registry import ExpertRecord, Registry
from moerge.routers.embedding import DEFAULT_EMBEDDER, default_embedder_path


def st_features(model: Any, texts: Sequence[str]) -> dict[str, Any]:
    """A sentence-transformers model's input features for ``texts`` (``preprocess`` in
    sentence-transformers ≥ 6, where ``tokenize`` is deprecated; ``tokenize`` before)."""
    fn = getattr(model, "preprocess", None) or model.tokenize
    return fn(list(texts))


def encoder_fingerprint(encoder: str | None) -> str | None:
    """The registry's config fingerprint of a sentence-transformers folder's transformer (what a
    LoRA registered on it records as ``base_fingerprint``); None when it cannot be read."""
    import json
    from pathlib import Path

    from moerge.registry.importers import config_fingerprint

    path = default_embedder_path() if encoder in (None, DEFAULT_EMBEDDER) else str(encoder)
    cfg = Path(path) / "config.json"
    return config_fingerprint(json.loads(cfg.read_text())) if cfg.is_file() else None


def encoder_experts(registry: Any, encoder: str | None = None) -> list[str]:
    """The names of ``registry``'s LoRA experts registered for ``encoder`` (its config
    fingerprint; every LoRA when the encoder's config cannot be read)."""
    mine = encoder_fingerprint(encoder)
    return [r.name for r in registry.list(kind="lora") if mine is None or r.base_fingerprint == mine]


class ExpertEncoder:
    """``base`` (a sentence-transformers folder or hub id; default the bundled MiniLM) with the
    LoRA ``experts`` attached. :meth:`embed` takes one expert name per text (``None`` or
    ``"__base__"``: the base alone) and embeds them in mixed batches."""

    def __init__(
        self,
        base: str | None = None,
        experts: Sequence[ExpertRecord] | Any = (),
        registry: Registry | None = None,
        device: str = "cpu",
        normalize: bool = True,
    ) -> None:
        import os

        from sentence_transformers import SentenceTransformer

        self.base_id = base or DEFAULT_EMBEDDER
        path = default_embedder_path() if self.base_id == DEFAULT_EMBEDDER else self.base_id
        if os.path.isdir(path):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        with hf_bars():
            self.model = SentenceTransformer(path, device=device).eval()
        self.normalize = normalize
        records = list(getattr(experts, "records", experts))
        reg = registry if registry is not None else getattr(experts, "registry", None)
        self.experts = [r.name for r in records]
        if records:
            if reg is None:
                raise ValueError("registry experts need registry= (or pass a registry.select(...))")
            self._check_base(records, path)
            loras = [load_lora(r, registry=reg) for r in records]
            attach(self.transformer, loras)

    def _check_base(self, records: Sequence[ExpertRecord], path: str) -> None:
        """Refuse experts trained for another encoder (their registered base's config differs)."""
        mine = encoder_fingerprint(path)
        for r in records:
            if r.kind != "lora":
                raise ValueError(
                    f"expert {r.ref} is a {r.kind!r} expert; an ExpertEncoder routes among LoRA adapters of one encoder"
                )
            if mine and r.base_fingerprint and r.base_fingerprint != mine:
                raise ValueError(
                    f"expert {r.ref} was trained for encoder {r.base_model!r} (config {r.base_fingerprint}), not for "
                    f"{self.base_id!r} (config {mine}): compose it with its own encoder, or leave it out"
                )

    @property
    def transformer(self) -> torch.nn.Module:
        """The Hugging Face model inside the first sentence-transformers module."""
        return self.model[0].auto_model

    @property
    def dim(self) -> int:
        # sentence-transformers ≥ 5.x renamed it (the old name warns); older releases only have the old one
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get())

    def _index(self, name: str | None) -> int:
        if name is None or name == "__base__":
            return -1
        try:
            return self.experts.index(name)
        except ValueError:
            from moerge.hints import did_you_mean

            raise KeyError(
                f"unknown expert {name!r}{did_you_mean(name, self.experts)}; this encoder has {self.experts}"
            ) from None

    @torch.inference_mode()
    def embed(
        self, texts: Sequence[str], experts: Sequence[str | None] | str | None = None, batch_size: int = 64
    ) -> torch.Tensor:
        """Embeddings [n, d] (unit norm unless ``normalize=False``): text i through expert
        ``experts[i]`` (one name for all, or None for the base). Each batch is one forward with
        a per-row :class:`~moerge.adapters.Assignment`."""
        if isinstance(texts, str):
            raise TypeError("embed takes a list of texts, not one string")
        texts = list(texts)
        names = [experts] * len(texts) if experts is None or isinstance(experts, str) else list(experts)
        if len(names) != len(texts):
            raise ValueError(f"{len(names)} expert names for {len(texts)} texts")
        index = [self._index(n) for n in names]
        out = torch.zeros(len(texts), self.dim)
        device = self.model.device
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths batch together: less padding
        for start in range(0, len(texts), batch_size):
            picked = order[start : start + batch_size]
            chunk = [texts[i] for i in picked]
            features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in st_features(self.model, chunk).items()}
            rows = [[(index[i], 1.0)] if index[i] >= 0 else [] for i in picked]
            if self.experts:
                with use_weights(self.transformer, Assignment.rows(rows)):
                    emb = self.model(features)["sentence_embedding"]
            else:
                emb = self.model(features)["sentence_embedding"]
            if self.normalize:
                emb = torch.nn.functional.normalize(emb.float(), dim=-1)
            out[picked] = emb.float().cpu()
        return out
