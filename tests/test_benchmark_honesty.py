"""The demo's routers are prepared without the test split (issue 16): no test prompt occurs in
anything a router is prepared from, the headline GLIDER's expert texts share no instruction
template with the test prompts, and the template-sharing variant is reported as such."""

from __future__ import annotations


def test_no_test_prompt_occurs_in_what_a_router_is_prepared_from(small_zoo):
    from moerge.bench.quality import ZOO_ROUTERS, preparation_texts

    z = small_zoo
    test_prompts = {e.prompt for t in z.held_in + z.held_out for e in z.test_split(t)}
    for label, (name, cfg, _) in ZOO_ROUTERS.items():
        for kind, texts in preparation_texts(z, name, cfg).items():
            if kind == "data":  # prompts: set membership
                assert not set(texts) & test_prompts, (label, kind)
            else:  # free text (an expert description, examples quoted in it): substring
                blob = "\n".join(texts)
                assert not [p for p in test_prompts if p in blob], (label, kind)
    for rec in z.registry.list():  # the registered examples (retrieval's bank, GLIDER's variant's texts)
        assert not set(rec.examples) & test_prompts, rec.name


def test_the_headline_glider_shares_no_template_with_the_test_prompts_and_the_variant_does(small_zoo):
    from moerge.bench.quality import ZOO_ROUTERS, template_overlap, test_templates

    z = small_zoo
    name, cfg, _ = ZOO_ROUTERS["GLIDER"]
    assert template_overlap(z, name, cfg)["expert_texts"] == 0
    name, cfg, _ = ZOO_ROUTERS["GLIDER (templates shared)"]
    shared = template_overlap(z, name, cfg)["expert_texts"]
    held_in_templates = {e.instruction for t in z.held_in for e in z.test_split(t)}
    assert shared >= len(held_in_templates) // 2  # the registered examples quote most held-in templates
    assert len(test_templates(z)) > shared  # the held-out phrasings are in no expert text
    assert template_overlap(z, "arrow", {}) == {}  # Arrow: the weights alone
