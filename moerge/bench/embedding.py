"""``moerge bench embedding``: routed query embedding — every query through its own expert —
in mixed-expert batches (:class:`~moerge.retrieval.encoder.ExpertEncoder`, one forward per
batch) against PEFT with one ``set_adapter`` and one forward per query (what RouterRetriever's
released code does), and against PEFT grouping the queries by expert (one ``set_adapter`` and
batched forwards per group). Same encoder (the bundled MiniLM), same LoRAs (random, r=8, α=32 on
query/value), same queries, measured in one run, interleaved."""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moerge.progress import progress_bar


@dataclass
class EmbedBenchConfig:
    queries: int = 1000
    experts: int = 6
    batch_size: int = 64
    repeats: int = 3
    seed: int = 0


def _queries(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    words = ["protein", "market", "court", "vaccine", "yield", "galaxy", "theorem", "climate", "tariff", "enzyme",
             "statute", "orbit", "inflation", "neuron", "verdict", "quantum", "dividend", "genome", "appeal", "comet"]  # fmt: skip
    out = []
    for _ in range(n):
        k = int(torch.randint(4, 12, (1,), generator=g))
        out.append(" ".join(words[int(i)] for i in torch.randint(0, len(words), (k,), generator=g)))
    return out


def run(cfg: EmbedBenchConfig | None = None, progress: bool | None = None) -> dict[str, Any]:
    from peft import LoraConfig, PeftModel, get_peft_model
    from sentence_transformers import SentenceTransformer

    from moerge.registry import Registry
    from moerge.retrieval.encoder import ExpertEncoder
    from moerge.routers.embedding import default_embedder_path

    cfg = cfg or EmbedBenchConfig()
    path = default_embedder_path()
    texts = _queries(cfg.queries, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    names = [f"e{i}" for i in range(cfg.experts)]
    assign = [names[int(i)] for i in torch.randint(0, cfg.experts, (cfg.queries,), generator=g)]
    with tempfile.TemporaryDirectory(prefix="moerge-bench-embed-") as tmp:
        reg = Registry(Path(tmp) / "reg")
        for i, name in enumerate(names):
            st = SentenceTransformer(path, device="cpu")
            torch.manual_seed(cfg.seed + 10 + i)
            lora = LoraConfig(r=8, lora_alpha=32, target_modules=["query", "value"], init_lora_weights=False)
            get_peft_model(st[0].auto_model, lora).save_pretrained(Path(tmp) / name)
            reg.register(Path(tmp) / name, name)
        ours = ExpertEncoder(None, reg.select(names=names))
        peft_st = SentenceTransformer(path, device="cpu")
        pm = PeftModel.from_pretrained(peft_st[0].auto_model, Path(tmp) / names[0], adapter_name=names[0])
        for name in names[1:]:
            pm.load_adapter(Path(tmp) / name, adapter_name=name)
        peft_st[0].auto_model = pm

        def peft_per_query() -> torch.Tensor:
            rows = []
            for text, name in zip(texts, assign, strict=True):
                pm.set_adapter(name)
                rows.append(peft_st.encode([text], convert_to_tensor=True, show_progress_bar=False).float())
            return torch.nn.functional.normalize(torch.cat(rows), dim=-1)

        def peft_grouped() -> torch.Tensor:
            out = torch.zeros(len(texts), ours.dim)
            for name in names:
                idx = [i for i, n in enumerate(assign) if n == name]
                pm.set_adapter(name)
                emb = peft_st.encode(
                    [texts[i] for i in idx], batch_size=cfg.batch_size, convert_to_tensor=True, show_progress_bar=False
                )
                out[idx] = torch.nn.functional.normalize(emb.float(), dim=-1)
            return out

        def mixed() -> torch.Tensor:
            return ours.embed(texts, assign, batch_size=cfg.batch_size)

        variants = {
            "moerge mixed batches": mixed,
            "PEFT grouped by expert": peft_grouped,
            "PEFT set_adapter per query": peft_per_query,
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        outputs: dict[str, torch.Tensor] = {}
        for _ in progress_bar(range(cfg.repeats), desc="bench embedding", progress=progress):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                outputs[name] = fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["moerge mixed batches"]
    return {
        "config": asdict(cfg),
        "seconds": med,
        "speedup_vs_per_query": med["PEFT set_adapter per query"] / base,
        "speedup_vs_grouped": med["PEFT grouped by expert"] / base,
        "max_abs_diff_vs_per_query": float((outputs["moerge mixed batches"] - outputs["PEFT set_adapter per query"]).abs().max()),
        "queries_per_s": {k: cfg.queries / v for k, v in med.items()},
        "threads": torch.get_num_threads(),
    }


def table(r: dict[str, Any]) -> str:
    c = r["config"]
    rows = [
        f"| variant ({c['queries']} queries, {c['experts']} experts, median of {c['repeats']}) | s | queries/s | moerge × faster |",
        "|---|---:|---:|---:|",
    ]
    base = r["seconds"]["moerge mixed batches"]
    for k, v in r["seconds"].items():
        rows.append(f"| {k} | {v:.2f} | {r['queries_per_s'][k]:.0f} | {v / base:.2f} |")
    rows.append(f"\nmax |moerge − PEFT per query| over all embeddings: {r['max_abs_diff_vs_per_query']:.1e}")
    return "\n".join(rows)
