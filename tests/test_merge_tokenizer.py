"""mergekit's ``tokenizer_source`` (issue 28): ``union`` over models of one vocabulary gives
mergekit's tensors (every token maps to itself); models of different vocabularies merge as
mergekit merges them (``base``, ``union``, a model's tokenizer), compared token by token; what
moerge does not take is refused by name before any tensor is read."""

from __future__ import annotations

import shutil

import pytest
import torch

pytestmark = pytest.mark.slow


def _cfg(zoo, source, experts=("sort", "max")):  # noqa: ANN001, ANN202
    return {"merge_method": "ties", "base_model": str(zoo.base_path), "dtype": "float32", "tokenizer_source": source,
            "models": [{"model": str(e if not isinstance(e, str) else zoo.dense_path(e)), "parameters": {"weight": 0.5,
                        "density": 0.5}} for e in experts]}  # fmt: skip


def test_union_over_one_vocabulary_equals_mergekits_union(small_zoo, tmp_path):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.torch import load_file

    import moerge

    cfg = _cfg(small_zoo, "union")
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"), MergeOptions(quiet=True, write_model_card=False))
    ours = moerge.merge_from_config(cfg, out=tmp_path / "ours", progress=False)
    want, got = load_file(tmp_path / "mk" / "model.safetensors"), load_file(ours / "model.safetensors")
    assert set(want) == set(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6, msg=k)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(ours).get_vocab() == AutoTokenizer.from_pretrained(tmp_path / "mk").get_vocab()


def _revocab(src, dst, swap=(), drop=(), add=(), seed=0):  # noqa: ANN001, ANN202
    """A copy of the zoo model ``src`` at ``dst`` with another vocabulary: two tokens' ids
    swapped, tokens dropped (the later ids shift down) and tokens added at the end (random
    rows); its embedding rows follow its tokens, so it is the same model over other ids."""
    import json

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tj = json.loads((dst / "tokenizer.json").read_text())
    old = tj["model"]["vocab"]
    tokens = [t for t, _ in sorted(old.items(), key=lambda kv: kv[1]) if t not in drop]
    if swap:
        i, j = tokens.index(swap[0]), tokens.index(swap[1])
        tokens[i], tokens[j] = tokens[j], tokens[i]
    tokens += list(add)
    tj["model"]["vocab"] = {t: i for i, t in enumerate(tokens)}
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    w = load_file(dst / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = [w[key][old[t]] if t in old else 0.1 * torch.randn(w[key].shape[1], generator=g) for t in tokens]
        w[key] = torch.stack(rows).contiguous()
    save_file(w, dst / "model.safetensors", {"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["vocab_size"] = len(tokens)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _by_token(folder):  # noqa: ANN001, ANN202
    """token → (embedding row, head row) of a merged model folder, and its other tensors."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    w = load_file(folder / "model.safetensors")
    vocab = AutoTokenizer.from_pretrained(folder).get_vocab()
    rows = {t: (w["model.embed_tokens.weight"][i], w["lm_head.weight"][i]) for t, i in vocab.items()}
    return rows, {k: v for k, v in w.items() if k not in ("model.embed_tokens.weight", "lm_head.weight")}


@pytest.mark.parametrize("method,source", [("ties", "union"), ("task_arithmetic", "base"), ("slerp", "model")])
def test_different_vocabularies_merge_as_mergekit_merges_them(small_zoo, tmp_path, method, source):
    """Expert A has two ids swapped and two new tokens; expert B lacks a token and shares one of
    A's new ones: every output token's embedding and head row equals mergekit's (compared by
    token: mergekit's ids for new tokens follow hash order), every other tensor too, and the
    written config and tokenizer agree."""
    pytest.importorskip("mergekit")
    import json

    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    import moerge

    a = _revocab(small_zoo.dense_path("sort"), tmp_path / "a", swap=("a", "b"), add=("<x>", "<z>"), seed=1)
    b = _revocab(small_zoo.dense_path("max"), tmp_path / "b", drop=("c",), add=("<z>",), seed=2)
    experts = (a,) if method == "slerp" else (a, b)
    cfg = _cfg(small_zoo, str(b) if source == "model" else source, experts=experts)
    cfg["merge_method"] = method
    if method == "slerp":
        cfg["models"], cfg["parameters"] = [{"model": str(a)}], {"t": 0.3}
    elif method == "task_arithmetic":
        for m in cfg["models"]:
            m["parameters"].pop("density")
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"), MergeOptions(quiet=True, write_model_card=False))
    if source == "model":
        cfg["tokenizer_source"] = f"model:{b}"  # the older spelling of the same thing
    ours = moerge.merge_from_config(cfg, out=tmp_path / "ours", progress=False)
    (want_rows, want), (got_rows, got) = _by_token(tmp_path / "mk"), _by_token(ours)
    assert set(got_rows) == set(want_rows)
    expect = {"union": ({"<x>", "<z>", "c"}, set()), "base": ({"c"}, {"<x>", "<z>"}), "model": ({"<z>"}, {"<x>", "c"})}
    has, lacks = expect[source]
    assert has <= set(got_rows) and not lacks & set(got_rows)
    for t, (emb, head) in want_rows.items():
        torch.testing.assert_close(got_rows[t][0], emb, atol=1e-5, rtol=1e-5, msg=f"embedding of {t!r}")
        torch.testing.assert_close(got_rows[t][1], head, atol=1e-5, rtol=1e-5, msg=f"head row of {t!r}")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6, msg=k)
    size = json.loads((ours / "config.json").read_text())["vocab_size"]
    assert size == json.loads((tmp_path / "mk" / "config.json").read_text())["vocab_size"] == len(got_rows)
    report = json.loads((ours / "moerge_merge.json").read_text())
    assert report["params"]["vocab_size"] == size and report["params"]["vocabulary_tensors"] == [
        "model.embed_tokens.weight", "lm_head.weight"]  # fmt: skip
    if source == "union":  # the same file through the command line
        import yaml
        from click.testing import CliRunner

        from moerge.cli import main

        (tmp_path / "merge.yml").write_text(yaml.safe_dump(cfg))
        r = CliRunner().invoke(main, ["merge", "--config", str(tmp_path / "merge.yml"), "--out", str(tmp_path / "cli")])
        assert r.exit_code == 0 and f"tokenizer: union, {size} tokens" in r.output, r.output
        assert _by_token(tmp_path / "cli")[0].keys() == got_rows.keys()
    model = moerge.merge_from_config(cfg, progress=False)  # in memory: loads, and its tokenizer encodes the new tokens
    if source == "union":
        ids = model.tokenizer("<z> a", return_tensors="pt", add_special_tokens=False).input_ids
        assert model(ids).logits.shape[-1] == size and model.tokenizer.convert_ids_to_tokens(ids[0])[:2] == ["<z>", "a"]


def test_permuted_rows_follow_mergekits_rule_for_a_missing_token():
    """A token one model has: its row for all; the base has it: the base's; otherwise the mean of
    those that have it; none has it: zeros."""
    from moerge.composer.vocab import Vocabulary

    perms = [torch.tensor([0, -1, -1, 1, -1]), torch.tensor([1, 0, -1, -1, 2]), torch.tensor([-1, 1, -1, 0, 0])]
    t = [torch.arange(2 * n, dtype=torch.float32).reshape(n, 2) + 10 * m for m, n in enumerate((2, 3, 2))]
    out = Vocabulary(None, 5, perms).permute(t)
    base, b, c = out
    assert torch.equal(base[1], (t[1][0] + t[2][1]) / 2) and torch.equal(b[3], t[0][1]) and torch.equal(c[0], t[0][0])
    assert torch.equal(base[2], torch.zeros(2)) and torch.equal(base[4], (t[1][2] + t[2][0]) / 2)
    assert torch.equal(out[0][0], t[0][0]) and torch.equal(out[1][1], t[1][0])  # a model's own rows where it has them
    # on the merge's device, with no data-dependent step (the meta device refuses those)
    meta = Vocabulary(None, 5, perms).permute([x.to("meta") for x in t])
    assert all(m.device.type == "meta" and m.shape == (5, 2) for m in meta)


def test_other_sources_are_refused_by_name(small_zoo, tmp_path):
    import json

    import moerge
    from moerge.composer.mergekit import MergeConfigError, plan_merge

    with pytest.raises(MergeConfigError, match=r"tokenizer_source 'nowhere': not a model folder"):
        plan_merge(_cfg(small_zoo, "model:nowhere"))
    with pytest.raises(MergeConfigError, match=r"tokenizer_source: 'base', 'union' or a model"):
        plan_merge(_cfg(small_zoo, 3))
    assert plan_merge(_cfg(small_zoo, "base"))["tokenizer_source"] == "base"
    other = _revocab(small_zoo.dense_path("sort"), tmp_path / "a", add=("<x>",))
    sliced = {"merge_method": "linear", "tokenizer_source": "union", "slices": [{"sources": [
        {"model": str(small_zoo.base_path), "layer_range": [0, 2]}, {"model": str(other), "layer_range": [0, 2]}]}]}  # fmt: skip
    with pytest.raises(MergeConfigError, match=r"slices over different vocabularies.*<x>"):
        plan_merge(sliced)
    short = tmp_path / "short"  # a base whose tokenizer has ids past its embedding rows
    shutil.copytree(small_zoo.base_path, short)
    cfg = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**cfg, "vocab_size": 100}))
    with pytest.raises(ValueError, match="ids beyond its model's vocab_size 100"):
        moerge.merge(short, [other], "task_arithmetic", tokenizer_source="union", progress=False)
    loras = [small_zoo.lora_path(t) for t in ("sort", "max")]
    with pytest.raises(ValueError, match="LoRA experts share the base's"):
        moerge.merge(small_zoo.base_path, loras, "task_arithmetic", tokenizer_source="union")


def test_the_tokenizer_block_takes_a_source_and_refuses_the_rest_by_field(small_zoo):
    from moerge.composer.mergekit import MergeConfigError, plan_merge

    cfg = _cfg(small_zoo, None)
    del cfg["tokenizer_source"]
    assert plan_merge({**cfg, "tokenizer": {"source": "union"}})["method"] == "ties"  # one vocabulary: accepted
    with pytest.raises(MergeConfigError, match=r"tokenizer\.pad_to_multiple_of"):
        plan_merge({**cfg, "tokenizer": {"source": "union", "pad_to_multiple_of": 64}})
    with pytest.raises(MergeConfigError, match=r"tokenizer_source or a tokenizer block, not both"):
        plan_merge({**cfg, "tokenizer": {"source": "base"}, "tokenizer_source": "base"})
