"""``moerge retrieval``: dense retrieval on BEIR folders, and the embedded retrieval suite."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from moerge.cli.options import _fail, _open, _parse_config
from moerge.cli.root import main
from moerge.runtime import quiet_hf


@main.group()
def retrieval() -> None:
    """Dense retrieval on any BEIR folder: build an index, evaluate an encoder."""


def _beir_index(data: str, encoder: str | None, split: str, rebuild: bool):  # noqa: ANN202
    from moerge.retrieval import Index, index_folder, load_beir

    corpus, queries, qrels = load_beir(data, split=split)
    folder = index_folder(data, encoder)
    if rebuild and folder.exists():
        import shutil

        shutil.rmtree(folder)
    t0 = time.perf_counter()
    index = Index.build_or_load(folder, corpus, encoder)
    return corpus, queries, qrels, index, folder, time.perf_counter() - t0


@retrieval.command("index")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="A BEIR folder.")
@click.option("--encoder", default=None, help="Sentence-transformers folder or hub id [default: the bundled all-MiniLM-L6-v2].")
@click.option("--split", default="test", show_default=True)
@click.option("--rebuild", is_flag=True, help="Rebuild even if a matching index is saved.")
def retrieval_index(data, encoder, split, rebuild) -> None:  # noqa: ANN001
    """Embed the corpus and save a faiss index beside it (DATA/.moerge-index/ENCODER)."""
    from moerge.retrieval import BeirFormatError

    try:
        corpus, _, _, index, folder, secs = _beir_index(data, encoder, split, rebuild)
    except (BeirFormatError, OSError, ValueError) as exc:
        _fail(exc)
    click.echo(f"{len(index)} documents indexed with {index.encoder_id} in {folder} ({secs:.1f} s)")


@retrieval.command("eval")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="A BEIR folder.")
@click.option("--encoder", default=None, help="Sentence-transformers folder or hub id [default: the bundled all-MiniLM-L6-v2].")
@click.option("--split", default="test", show_default=True)
@click.option("--k", default=100, show_default=True, type=click.IntRange(min=1), help="Documents retrieved per query.")
@click.option("--router", default=None, help="router_retriever: route each query to one of the registry's encoder experts.")
@click.option(
    "--registry", "registry_path", default=None, type=click.Path(file_okay=False), help="The experts' registry (with --router)."
)
@click.option(
    "--expert", "experts", multiple=True, help="Experts to route among (repeatable; default: every LoRA of this encoder)."
)
@click.option(
    "--pilots",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="BEIR folders (or a folder of them) whose train splits build RouterRetriever's pilots (repeatable; default: the pilots stored in the registry).",
)
@click.option("--set", "settings", multiple=True, help="Router setting KEY=VALUE (agg=max, sim=dot, ties=first, rebuild=true).")
@click.option("--json", "as_json", is_flag=True, help="Print the result (with per-query scores) as JSON.")
def retrieval_eval(data, encoder, split, k, router, registry_path, experts, pilots, settings, as_json) -> None:  # noqa: ANN001
    """nDCG@10 and recall@100 of an encoder on a BEIR folder's split (trec_eval, through pytrec_eval).

    With --router router_retriever: the base, every expert alone, and the routed encoder (each
    query embedded by the expert its pilots pick), with where the queries went."""
    from moerge.retrieval import BeirFormatError, evaluate

    if router is None:
        if registry_path or experts or pilots or settings:
            _fail(ValueError("--registry, --expert, --pilots and --set go with --router router_retriever"))
        try:
            _, queries, qrels, index, _, _ = _beir_index(data, encoder, split, False)
            result = evaluate(index.search(queries, k=k, encoder=encoder), qrels)
        except (BeirFormatError, OSError, ValueError) as exc:
            _fail(exc)
        if as_json:
            click.echo(json.dumps(result, indent=2))
            return
        click.echo("| encoder | queries | nDCG@10 | recall@100 |\n|---|---:|---:|---:|")
        click.echo(f"| {index.encoder_id} | {len(queries)} | {result['ndcg@10']:.4f} | {result['recall@100']:.4f} |")
        return
    if registry_path is None:
        _fail(ValueError("--router needs --registry: the registry that holds the encoder's LoRA experts"))
    from collections import Counter

    from moerge import compose
    from moerge.retrieval.encoder import encoder_experts

    quiet_hf()
    try:
        reg = _open(registry_path)
        if experts:
            chosen = reg.select(names=list(experts))
        else:
            names = encoder_experts(reg, encoder)
            if not names:
                raise ValueError(f"registry {reg.root} has no LoRA experts for encoder {encoder or 'all-MiniLM-L6-v2'}")
            chosen = reg.select(names=names)
        _, queries, qrels, index, _, _ = _beir_index(data, encoder, split, False)
        enc = compose(
            encoder,
            chosen,
            router=router,
            registry=reg,
            data=_pilot_folders(pilots) or None,
            device="cpu",
            **_parse_config(settings),
        )
        texts = list(queries.values())
        rows = {"base": enc.embed(texts, "__base__")}
        for e in enc.experts:
            rows[f"expert {e}"] = enc.embed(texts, e)
        routes = enc.route(texts)
        rows[router] = enc.embed(texts)
        results = {name: evaluate(index.search(queries, k=k, embeddings=emb), qrels) for name, emb in rows.items()}
    except (BeirFormatError, OSError, ValueError, KeyError, TypeError) as exc:
        _fail(exc)
    went = Counter(r["expert"] for r in routes)
    if as_json:
        click.echo(json.dumps({"results": results, "routed": dict(went)}, indent=2))
        return
    click.echo(f"| {split} ({len(queries)} queries) | nDCG@10 | recall@100 |\n|---|---:|---:|")
    for name, res in results.items():
        click.echo(f"| {name} | {res['ndcg@10']:.4f} | {res['recall@100']:.4f} |")
    click.echo("routed: " + ", ".join(f"{e} {n}" for e, n in went.most_common()))
    if enc.computed:
        click.echo(f"pilots computed from {', '.join(enc.computed)} and stored in {reg.root}")


def _pilot_folders(folders: tuple[str, ...]) -> dict[str, str]:
    """--pilots folders by name: a BEIR folder, or a folder of BEIR folders (each one dataset)."""
    out = {}
    for f in folders:
        p = Path(f)
        subs = sorted(d for d in p.iterdir() if (d / "corpus.jsonl").is_file()) if not (p / "corpus.jsonl").is_file() else [p]
        if not subs:
            raise ValueError(f"--pilots {f}: neither a BEIR folder (corpus.jsonl) nor a folder of them")
        out.update({d.name: str(d) for d in subs})
    return out


@retrieval.command("suite")
@click.option("--preset", default="retrieval", show_default=True, type=click.Choice(["retrieval", "retrieval-small"]))
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Cache folder (env MOERGE_CACHE).")
@click.option("--rebuild", is_flag=True, help="Rebuild even if cached.")
@click.option("--path", "path_only", is_flag=True, help="Print only the suite's folder (for scripts).")
def retrieval_suite(preset, cache_dir, rebuild, path_only) -> None:  # noqa: ANN001
    """Build (or find) the embedded retrieval suite: six BEIR folders, their indexes, and the
    domain and multi-task query-encoder LoRAs in the suite's registry."""
    quiet_hf()
    from moerge.zoo.retrieval import load_suite

    suite = load_suite(preset, cache_dir=cache_dir, rebuild=rebuild)
    if path_only:
        click.echo(suite.root)
        return
    click.echo(f"suite {preset} in {suite.root}")
    for d in suite.domains:
        click.echo(f"  {d:9s} {suite.data_path(d)}  " + ", ".join(f"{k} {v}" for k, v in suite.meta["sizes"][d].items()))
    click.echo(f"  registry {suite.root / 'registry'}: {', '.join(suite.experts)}")
