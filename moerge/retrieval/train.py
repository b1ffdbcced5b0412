"""Training a query-encoder LoRA for dense retrieval, as RouterRetriever's experts are trained
(``shared/docs/methods/router-retriever.md`` §1): LoRA (r 8, α 32, dropout 0.1) on the query
encoder only — the document encoder stays the frozen base, so one document index serves every
expert — and a contrastive loss with in-batch negatives, cross-entropy over q·d / τ with τ = 0.05,
no hard negatives, AdamW with 10 % linear warm-up then linear decay (the code's OneCycle).

Documents are never re-encoded: the positives' base embeddings come from the index, so a step
costs one forward and backward of the query batch only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moerge.progress import progress_bar
from moerge.retrieval.encoder import st_features


@dataclass(frozen=True)
class QueryLoraConfig:
    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    targets: tuple[str, ...] = ("query", "value")  # PEFT's default for BERT-style encoders
    lr: float = 3e-3  # with epochs, chosen on the suite's dev split (README)
    epochs: int = 4
    batch: int = 32
    tau: float = 0.05
    max_query_tokens: int = 32
    warmup: float = 0.1
    seed: int = 0


def in_batch_loss(q: torch.Tensor, d: torch.Tensor, positive: torch.Tensor, tau: float) -> torch.Tensor:
    """Cross-entropy of each query against the batch's distinct positives (``d`` [m, dim]);
    ``positive[i]`` is the row of query i's own document. Duplicated documents appear once,
    so a query is never pushed away from its own positive."""
    return torch.nn.functional.cross_entropy(q @ d.T / tau, positive)


def train_query_lora(
    base: str,
    queries: Sequence[str],
    positives: Sequence[int],
    doc_embeddings: torch.Tensor,
    out: str | Path,
    config: QueryLoraConfig = QueryLoraConfig(),
    progress: bool | None = None,
    desc: str = "train query LoRA",
) -> dict[str, Any]:
    """Train a LoRA on ``base`` (a sentence-transformers folder) so that query i's embedding
    scores ``doc_embeddings[positives[i]]`` (frozen base embeddings, unit norm) above the other
    positives of its batch; save the PEFT folder to ``out``. Returns the loss curve."""
    from peft import LoraConfig, get_peft_model
    from sentence_transformers import SentenceTransformer

    if len(queries) != len(positives) or not queries:
        raise ValueError(f"{len(queries)} queries and {len(positives)} positives: need one positive per query, and some queries")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    st = SentenceTransformer(base, device="cpu")
    st.max_seq_length = config.max_query_tokens
    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=list(config.targets))
    peft_model = get_peft_model(st[0].auto_model, lora)
    st[0].auto_model = peft_model
    st.train()
    params = [p for p in st.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr)
    order = list(range(len(queries)))
    per_epoch = (len(order) + config.batch - 1) // config.batch
    total = per_epoch * config.epochs
    warm = max(1, int(config.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm))
    )
    losses = []
    bar = progress_bar(total=total, desc=desc, progress=progress)
    for _ in range(config.epochs):
        rng.shuffle(order)
        for start in range(0, len(order), config.batch):
            rows = order[start : start + config.batch]
            docs = sorted({int(positives[i]) for i in rows})
            where = {d: j for j, d in enumerate(docs)}
            target = torch.tensor([where[int(positives[i])] for i in rows])
            features = st_features(st, [queries[i] for i in rows])
            q = st(features)["sentence_embedding"]
            q = torch.nn.functional.normalize(q, dim=-1)
            loss = in_batch_loss(q, doc_embeddings[docs], target, config.tau)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.update(1)
    bar.close()
    out = Path(out)
    peft_model.save_pretrained(out)
    return {"steps": len(losses), "loss_first": losses[0], "loss_last": sum(losses[-5:]) / len(losses[-5:]), "losses": losses}
