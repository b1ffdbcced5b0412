"""Merging models whose vocabularies differ, with mergekit's meaning of ``tokenizer_source``
(``base``, ``union``, or a model whose tokenizer the output takes).

The output tokenizer is chosen first:

- ``base``: the base model's;
- ``union``: the base's, then every token another model has and it lacks, added in the order of
  the models (base, then the experts as listed) and of their ids, then the added (special)
  tokens, each with the first model's settings. mergekit builds the same set of tokens, but its
  ids for the new ones follow hash-map order and change between runs; here they do not;
- a model: that model's tokenizer (``model:PATH`` or ``PATH``).

Every model's vocabulary tensors (input embeddings, and the output head where it is not tied)
are then laid out in the output's token order, one row per output token: the model's own row
where it has the token; where it lacks it, the row every model lacking it shares — the one
model's that has it when only one does, the base's when the base has it, else the mean of the
models' that have it, zeros when none does (mergekit's ``PermutedVocabulary``). The merge method
then runs on those tensors as on any other, so a token only one expert knows keeps that
expert's embedding. A model folder without a tokenizer is taken to share the base's; tokens at
ids beyond a model's ``vocab_size`` are left out, as mergekit does.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: the files a tokenizer is saved as (not copied from the base when the merge writes its own)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


def parse_source(source: Any) -> str | None:
    """``None``, ``"base"``, ``"union"`` or a model reference (``model:`` prefix dropped)."""
    if source is None or source in ("base", "union"):
        return source
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"tokenizer_source must be 'base', 'union' or a model (a folder or model:PATH), got {source!r}")
    return source.removeprefix("model:").strip()


def has_tokenizer(folder: str | Path) -> bool:
    """Whether a model folder carries a tokenizer (a folder at all)."""
    folder = Path(folder).expanduser()
    return folder.is_dir() and any(
        (folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    )


def source_folder(source: str) -> Path:
    """The folder of a model named as a tokenizer source (a folder, or a hub id in the local
    cache) that has a tokenizer; ValueError naming it otherwise."""
    path = Path(source).expanduser()
    if not path.is_dir():
        from moerge.registry.importers import resolve_source

        try:
            path = Path(resolve_source(source, "model")[0])
        except (FileNotFoundError, OSError, ValueError):
            raise ValueError(
                f"tokenizer_source {source!r}: not a model folder or a hub id in the local cache (give 'base', 'union' or a model)"
            ) from None
    if not has_tokenizer(path):
        raise ValueError(f"tokenizer_source {source!r}: {path} has no tokenizer")
    return path


def load_tokenizer(folder: str | Path, what: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"tokenizer_source: cannot read the tokenizer of {what} ({folder}): {exc}") from None


def vocab_size_of(folder: str | Path) -> int | None:
    """``vocab_size`` from a model folder's config (its text config for a multimodal one)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    size = cfg.get("vocab_size", cfg.get("text_config", {}).get("vocab_size"))
    return size if isinstance(size, int) else None


def _usable(tok: Any, size: int | None) -> dict[str, int]:
    """A tokenizer's tokens at ids the model has rows for."""
    return {t: i for t, i in tok.get_vocab().items() if size is None or i < size}


def union_tokenizer(base_tok: Any, toks: Sequence[tuple[Any, int | None]]) -> Any:
    """The base's tokenizer plus every regular token of ``toks`` (base first) it lacks, in order
    of model and id, then their added tokens (first settings win); the base's is not changed."""
    with tempfile.TemporaryDirectory() as tmp:
        base_tok.save_pretrained(tmp)
        out = load_tokenizer(tmp, "the base")
    have = set(base_tok.get_vocab())
    new: list[str] = []
    added: dict[str, Any] = {}
    for tok, size in toks:
        specials = {info.content for info in tok.added_tokens_decoder.values()}
        for t, _ in sorted(_usable(tok, size).items(), key=lambda kv: kv[1]):
            if t not in specials and t not in have:
                new.append(t)
                have.add(t)
        for i, info in sorted(tok.added_tokens_decoder.items()):
            if size is None or i < size:
                added.setdefault(info.content, info)
    if new:
        out.add_tokens(new)  # in one call: ids in this order, as one call a token gives them
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclass
class Vocabulary:
    """The output tokenizer and, per model (base first, then the experts), the id of each output
    token in that model (−1 where it has none)."""

    tokenizer: Any
    size: int
    perms: list[torch.Tensor]

    def permute(self, tensors: Sequence[torch.Tensor], axis: int = 0) -> list[torch.Tensor]:
        """Each model's vocabulary tensor laid out in the output's token order (the module's
        rule for a token a model lacks); float32, ``axis`` the vocabulary's."""
        views = [t.float().movedim(axis, 0) for t in tensors]
        shape = views[0].shape[1:]
        for v in views[1:]:
            if v.shape[1:] != shape:
                raise ValueError(f"vocabulary tensors differ beyond the vocabulary axis: {[tuple(t.shape) for t in tensors]}")
        perms = [p.to(views[0].device) for p in self.perms]  # the merge's device (a GPU's too)
        rows = torch.stack([v[p.clamp(min=0)] for v, p in zip(views, perms, strict=True)])  # [models, V, ...]
        present = torch.stack([p >= 0 for p in perms]).reshape(*rows.shape[:2], *([1] * len(shape)))  # broadcasts
        mean = (rows * present).sum(0) / present.sum(0).clamp(min=1)  # none has it: the mean of nothing, 0
        shared = torch.where(present[0], rows[0], mean)  # the base's row where it has the token
        return [torch.where(present[m], rows[m], shared).movedim(0, axis) for m in range(len(views))]


def build_vocabulary(source: str, base: Path, models: Sequence[Path | None]) -> Vocabulary | None:
    """The output vocabulary for ``source`` over ``base`` and ``models`` (folders; None: a model
    that shares the base's tokenizer, e.g. a registry task vector). None when nothing changes:
    ``base``/``union`` over models that all have the base's vocabulary."""
    base_tok = load_tokenizer(base, "the base model")
    base_size = vocab_size_of(base)
    if base_size is not None and max(base_tok.get_vocab().values(), default=-1) >= base_size:
        raise ValueError(
            f"tokenizer_source: the base's tokenizer ({base}) has ids beyond its model's vocab_size {base_size}; merging "
            "vocabularies needs every token of the base's tokenizer to have an embedding row"
        )
    toks: list[tuple[Any, int | None]] = [(base_tok, base_size)]
    for folder in models:
        if folder is None or not has_tokenizer(folder):
            toks.append((base_tok, base_size))
        else:
            toks.append((load_tokenizer(folder, "a model"), vocab_size_of(folder) or base_size))
    same = all(_usable(t, s) == _usable(base_tok, base_size) for t, s in toks[1:])
    if source in ("base", "union") and same:
        return None
    if source == "base":
        out_tok = base_tok
    elif source == "union":
        out_tok = union_tokenizer(base_tok, toks)
    else:
        out_tok = load_tokenizer(source_folder(source), f"tokenizer_source {source!r}")
    vocab = out_tok.get_vocab()
    perms = []
    for tok, size in toks:
        mine = _usable(tok, size)
        p = torch.full((len(vocab),), -1, dtype=torch.long)
        for t, i in vocab.items():
            if t in mine:
                p[i] = mine[t]
        perms.append(p)
    missing = [t for t, i in vocab.items() if all(p[i] < 0 for p in perms)]
    if missing:
        warnings.warn(
            f"tokenizer_source: {len(missing)} output token(s) are in no model (e.g. {missing[:3]}); their embeddings are zeros",
            stacklevel=3,
        )
    return Vocabulary(out_tok, len(vocab), perms)


def vocabulary_tensors(folder: str | Path, keys: Sequence[str]) -> list[str]:
    """The checkpoint names of a model's vocabulary tensors (input embeddings; the output head's
    weight and bias where they are stored), found on a ``meta``-device instance of its class."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    found: list[str] = []
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        for p in (getattr(module, "weight", None), getattr(module, "bias", None)):
            if p is not None:
                found += [n for n, q in model.named_parameters(remove_duplicate=False) if q is p]
    out = [n for n in dict.fromkeys(found) if n in set(keys)]
    if not out:
        raise ValueError(
            f"tokenizer_source: cannot find {folder}'s embedding tensors among its weights (looked for {sorted(set(found))})"
        )
    return out
