"""mergekit's ``tokenizer_source`` (issue 28): ``union`` over models of one vocabulary gives
mergekit's tensors (every token maps to itself); different vocabularies and a model's own
tokenizer are refused by name before any tensor is read."""

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


def test_other_vocabularies_and_sources_are_refused_by_name(small_zoo, tmp_path):
    from transformers import AutoTokenizer

    from moerge.composer.mergekit import MergeConfigError, plan_merge

    other = tmp_path / "sort-more-tokens"
    shutil.copytree(small_zoo.dense_path("sort"), other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    with pytest.raises(MergeConfigError, match=r"union over different vocabularies.*<extra>"):
        plan_merge(_cfg(small_zoo, "union", experts=(other, "max")))
    with pytest.raises(MergeConfigError, match=r"tokenizer_source 'model:x'"):
        plan_merge(_cfg(small_zoo, "model:x"))
    assert plan_merge(_cfg(small_zoo, "base"))["method"] == "ties"


def test_the_tokenizer_block_takes_a_source_and_refuses_the_rest_by_field(small_zoo):
    from moerge.composer.mergekit import MergeConfigError, plan_merge

    cfg = _cfg(small_zoo, None)
    del cfg["tokenizer_source"]
    assert plan_merge({**cfg, "tokenizer": {"source": "union"}})["method"] == "ties"  # one vocabulary: accepted
    with pytest.raises(MergeConfigError, match=r"tokenizer\.pad_to_multiple_of"):
        plan_merge({**cfg, "tokenizer": {"source": "union", "pad_to_multiple_of": 64}})
    with pytest.raises(MergeConfigError, match=r"tokenizer_source or a tokenizer block, not both"):
        plan_merge({**cfg, "tokenizer": {"source": "base"}, "tokenizer_source": "base"})
