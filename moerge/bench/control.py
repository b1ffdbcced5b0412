"""The positive-control benchmark for token routing (issue 16) on :mod:`moerge.zoo.control`,
scored per segment on the mixed held-out prompts:

* every single expert; the static merges of all four (uniform average, task arithmetic, TIES;
  each grid point scored on the suite's *validation* mixed prompts, the best then on test);
* PHATGOOSE, Arrow and the retrieval router, with routing accuracy on the prompts' item tokens
  (each item's right expert is its vocabulary's);
* the floor: PHATGOOSE with random gates;
* the ceilings: the per-token oracle router (:class:`SegmentOracle`: every position routed, top-1,
  to the expert of the segment its next token belongs to, from the reference answer) and the
  segment oracle (a segment counts when any single expert answers it);
* a reference for the routing rule: PHATGOOSE's scoring with each expert's key set to the mean
  activation of its vocabulary's item tokens in the experts' training prompts
  (:func:`class_mean_keys`: built from token labels, so not a router).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from moerge.adapters.layer import TopK

#: static merges on the control suite: label → (method, grid). Chosen on validation.
CONTROL_MERGES: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "uniform average": ("average", [{}]),
    "task arithmetic": ("task_arithmetic", [{"lambda": x} for x in (0.5, 1.0)]),
    "TIES": ("ties", [{"density": 0.5, "lambda": x} for x in (0.5, 1.0)]),
}


@torch.inference_mode()
def input_routing_accuracy(model: Any, prompts: list[str], expert_of_token: dict[int, int], routing: Any = None) -> float:
    """Share of item tokens × modules whose top-1 expert is the item's vocabulary's expert
    (the router decides on the prompt, as at inference; ``routing`` overrides the router's)."""
    from moerge.routers.base import Recorder

    enc = model._encode(prompts)
    if routing is None:  # the router's own decision (a sequence router's at every position)
        top, _ = model.token_routing(prompts)
    else:
        recorder = Recorder()
        routing.hook.recorder = recorder
        try:
            with model.routed(routing):
                model.model(**enc)
        finally:
            routing.hook.recorder = None
        top = torch.stack([idx[..., 0] for _, idx, _ in recorder.calls]).cpu()  # [M, B, T]
    ids, mask = enc["input_ids"].cpu(), enc["attention_mask"].bool().cpu()
    want = torch.tensor([[expert_of_token.get(int(t), -1) for t in row] for row in ids])
    sel = (want >= 0) & mask
    return float((top[:, sel] == want[sel]).float().mean())


@torch.inference_mode()
def class_mean_keys(
    model: Any, prompts: list[str], expert_of_token: dict[int, int], batch_size: int = 100
) -> dict[str, torch.Tensor]:
    """One key per expert and routed module: the standardised mean of the module's standardised
    input over the item tokens of that expert's vocabulary in ``prompts`` (run under the model's
    own routing). Built from token labels, which no router is given: the reference for what one
    key per expert, scored as PHATGOOSE scores (LN-correlation), can route on this suite."""
    from moerge.adapters import layers
    from moerge.routers.token import standardise

    mods = layers(model.model)
    names = list(model.router.keys)
    n = len(model.experts)
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros(n)
    seen: dict[str, torch.Tensor] = {}
    hooks = [mods[k].register_forward_pre_hook(lambda _m, inp, k=k: seen.__setitem__(k, inp[0])) for k in names]
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            enc = model._encode(chunk)
            with model.routed(model.route(chunk)):
                model.model(**enc)
            want = torch.tensor([[expert_of_token.get(int(t), -1) for t in row] for row in enc["input_ids"].cpu()])
            want[~enc["attention_mask"].bool().cpu()] = -1
            onehot = torch.nn.functional.one_hot(want.clamp(min=0), n).float() * (want >= 0)[..., None]  # [B, T, E]
            count += onehot.sum((0, 1))
            for k in names:
                x = standardise(seen[k]).cpu()  # [B, T, d]
                sums[k] = sums.get(k, 0) + torch.einsum("bte,btd->ed", onehot, x)
    finally:
        for h in hooks:
            h.remove()
    if bool((count == 0).any()):
        raise ValueError(f"no item token of experts {[model.experts[j] for j in range(n) if count[j] == 0]} in the prompts")
    return {k: standardise(v / count[:, None]).to(model.router.keys[k].device) for k, v in sums.items()}


def _owners(words: list[str]) -> list[int]:
    """The segment each word belongs to (a separator: the segment before it)."""
    from moerge.zoo.control import SEGMENT_SEP

    out, j = [], 0
    for w in words:
        out.append(j)
        j += w == SEGMENT_SEP
    return out


def oracle_schedule(tokenizer: Any, examples: Sequence[Any], experts: Sequence[str]) -> tuple[dict[str, Any], torch.Tensor]:
    """The per-token oracle's expert for every position of the left-padded prompts and of the
    reference answers → (encoded prompts, [B, T_prompt + T_answer] expert indices).

    A position's expert is that of the segment its *next* token belongs to (what the position's
    output predicts; a separator belongs to the segment before it): a prompt item → its own
    segment's; ``|`` → the next segment's; ``=>`` → the first answer segment's; an answer item
    → its segment's; the last position → the last segment's."""
    from moerge.composer.compose import encode_prompts
    from moerge.zoo.control import ARROW

    enc = encode_prompts(tokenizer, [e.prompt for e in examples])
    T = enc["input_ids"].shape[1]
    rows = []
    for b, e in enumerate(examples):
        seg_vocab = [experts.index(v) for v, _ in e.segments]

        prompt = e.prompt.split()
        answer = e.target.split()
        own_p = _owners([w for w in prompt if w != ARROW])
        own_a = _owners(answer)
        # position i (BOS = 0) predicts word i of prompt + answer, so its expert is that word's
        # owner ("=>" belongs to the prompt's last segment; the last position, predicting EOS,
        # gets the last segment's by the padding below)
        sched = own_p + [len(seg_vocab) - 1] + own_a
        pad = T - int(enc["attention_mask"][b].sum())
        rows.append([seg_vocab[0]] * pad + [seg_vocab[j] for j in sched])
    width = max(len(r) for r in rows) + 1  # + the last position (predicting EOS)
    return enc, torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows])


class SegmentOracle:
    """A token hook that routes every position top-1 to a precomputed expert (``schedule``
    [B, T]): the prefill reads the prompt's columns, each decode step the next column (a step
    is counted per module, each of which is called once per forward)."""

    def __init__(self, schedule: torch.Tensor, prompt_len: int) -> None:
        self.schedule = schedule
        self.prompt_len = prompt_len
        self.steps: dict[str, int] = {}
        self.bias = None
        self.recorder = None

    def __call__(self, layer, x: torch.Tensor) -> TopK:  # noqa: ANN001
        T = x.shape[-2]
        if T > 1:  # the prefill
            cols = self.schedule[:, :T]
        else:
            step = self.steps.get(layer.module_name, 0)
            self.steps[layer.module_name] = step + 1
            col = min(self.prompt_len + step, self.schedule.shape[1] - 1)
            cols = self.schedule[:, col : col + 1]
        idx = cols[..., None].to(x.device)
        if self.recorder is not None:
            self.recorder.add(layer.module_name, idx, torch.ones_like(idx, dtype=torch.float32))
        return TopK(idx, torch.ones(idx.shape, dtype=x.dtype, device=x.device))


def oracle_generate(model: Any, examples: Sequence[Any], max_new_tokens: int, batch_size: int = 256) -> list[str]:
    """``model`` (the experts composed with any token router) generating with the per-token oracle's routing."""
    return oracle_answers(model.model, model.tokenizer, examples, model.experts, max_new_tokens, batch_size)


@torch.inference_mode()
def oracle_answers(model: Any, tokenizer: Any, examples: Sequence[Any], experts: Sequence[str], max_new_tokens: int,
                   batch_size: int = 256) -> list[str]:  # fmt: skip
    """A plain Hugging Face model with the experts attached (:func:`moerge.adapters.attach`),
    generating greedily with the per-token oracle's routing; ``examples`` need ``prompt``,
    ``target`` and ``segments`` ((expert, answer) per segment), as the zoo's segmented ones have."""
    from moerge.adapters import use_weights
    from moerge.device import module_device

    out: list[str] = []
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i : i + batch_size])
        enc, sched = oracle_schedule(tokenizer, chunk, experts)
        enc = {k: v.to(module_device(model)) for k, v in enc.items()}
        T = enc["input_ids"].shape[1]
        with use_weights(model, SegmentOracle(sched, T)):
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        out += [" ".join(t.split()) for t in tokenizer.batch_decode(gen[:, T:], skip_special_tokens=True)]
    return out


def evaluate(
    suite: Any,
    progress: bool | None = None,
    max_new_tokens: int = 20,
    split: str = "test",
    routers: Sequence[str] | None = None,
    merges: Sequence[str] | None = None,
    phatgoose: dict[str, Any] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
) -> dict[str, Any]:
    """Every method on the suite's held-out ``split`` (``"test"``, or ``"val"`` for choosing
    settings). ``routers`` (labels of :data:`ROUTERS`) and ``merges`` (of :data:`CONTROL_MERGES`)
    default to all; ``phatgoose`` overrides PHATGOOSE's config (e.g. ``{"accumulate": 32}``).
    ``device``/``dtype``: where the compositions run (the merges run in float32). ``seed``: the
    routers' own (PHATGOOSE's gate training, the random gates' draw); the suite has its own."""
    from moerge import compose
    from moerge.composer import merge
    from moerge.progress import progress_bar
    from moerge.routers.base import Routing
    from moerge.routers.token import standardise
    from moerge.zoo.control import VOCAB_OF, segment_accuracy
    from moerge.zoo.train import generate_answers

    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    t0 = time.perf_counter()
    test = suite.test_held_out() if split == "test" else suite.val_held_out()
    prompts = [e.prompt for e in test]
    experts = suite.experts
    reg = suite.registry
    tok = suite.tokenizer()
    expert_of_token = {tok.convert_tokens_to_ids(c): experts.index(v) for c, v in VOCAB_OF.items()}
    gen = {"max_new_tokens": max_new_tokens, "batch_size": 256}
    methods: dict[str, dict[str, Any]] = {}

    # single experts, one at a time (the multi-expert layer with one expert at weight 1: Arrow
    # over one expert routes every token to it, and needs no embedder)
    singles = {}
    for e in progress_bar(experts, desc="control: single experts", progress=progress):
        model = compose(suite.base_path, reg.select(names=[e]), "arrow", progress=False, device=device, dtype=dtype)
        singles[e] = answers = model.generate(prompts, **gen)
        methods[f"expert: {e}"] = {"held_out_segment_accuracy": round(100 * segment_accuracy(answers, test), 1)}
    best = max(experts, key=lambda e: methods[f"expert: {e}"]["held_out_segment_accuracy"])

    merges = list(CONTROL_MERGES if merges is None else merges)
    val = suite.val_held_out(100) if merges else []
    for label in progress_bar(merges, desc="control: merges", progress=progress):
        method, grid = CONTROL_MERGES[label]
        best_merge: tuple[float, dict[str, Any], Any] | None = None  # (validation score, params, model): the first best
        for params in grid:
            built = merge(suite.base_path, reg.select(names=experts), method, output="model", progress=False, device=device,
                           **params).to(device)  # fmt: skip
            score = segment_accuracy(generate_answers(built, tok, [e.prompt for e in val], **gen), val)
            if best_merge is None or score > best_merge[0]:
                best_merge = (score, params, built)
        assert best_merge is not None
        _, params, built = best_merge
        methods[label] = {
            "held_out_segment_accuracy": round(100 * segment_accuracy(generate_answers(built, tok, prompts, **gen), test), 1),
            "chosen": params,
        }

    routers = list(ROUTERS if routers is None else routers)
    composed = None
    for label in progress_bar(routers, desc="control: routers", progress=progress):
        name = ROUTERS[label]
        cfg = {"seed": seed, **(phatgoose or {})} if name == "phatgoose" else {}
        if name == "retrieval":
            cfg = {"max_examples": suite.preset.retrieval_examples}
        model = compose(suite.base_path, reg.select(names=experts), name, data=suite.expert_data, progress=False,
                        device=device, dtype=dtype, **cfg)  # fmt: skip
        if label.startswith("random gates"):
            g = torch.Generator().manual_seed(seed)
            model.router.keys = {
                m: standardise(torch.randn(k.shape, generator=g)).to(k.device) for m, k in model.router.keys.items()
            }
        elif name == "phatgoose":
            composed = model
        answers = model.generate(prompts, **gen)
        methods[label] = {
            "held_out_segment_accuracy": round(100 * segment_accuracy(answers, test), 1),
            "routing_accuracy_inputs": round(100 * input_routing_accuracy(model, prompts[:100], expert_of_token), 1),
        }
    if composed is not None:  # the ceilings need the four experts attached; PHATGOOSE's composition has them
        answers = oracle_generate(composed, test, max_new_tokens)
        enc, sched = oracle_schedule(tok, test[:100], experts)
        hook = SegmentOracle(sched, enc["input_ids"].shape[1])
        methods["per-token oracle router"] = {
            "held_out_segment_accuracy": round(100 * segment_accuracy(answers, test), 1),
            "routing_accuracy_inputs": round(
                100 * input_routing_accuracy(composed, prompts[:100], expert_of_token, Routing("token", experts, hook=hook)), 1
            ),
        }
    if composed is not None:  # the reference for one key per expert: keys from labelled item tokens
        train = [p for e in experts for p, _ in suite.expert_data(e)[:100]]
        composed.router.keys = class_mean_keys(composed, train, expert_of_token)
        answers = composed.generate(prompts, **gen)
        methods["class-mean keys (token labels; reference)"] = {
            "held_out_segment_accuracy": round(100 * segment_accuracy(answers, test), 1),
            "routing_accuracy_inputs": round(100 * input_routing_accuracy(composed, prompts[:100], expert_of_token), 1),
        }
    oracle = []
    for i, ex in enumerate(test):  # per segment: right if any single expert answered it
        parts = []
        for j, (_, want) in enumerate(ex.segments):
            ok = any(j < len(a := singles[e][i].split("|")) and " ".join(a[j].split()) == want for e in experts)
            parts.append(want if ok else "?")
        oracle.append(" | ".join(parts))
    methods["segment oracle (any expert right)"] = {"held_out_segment_accuracy": round(100 * segment_accuracy(oracle, test), 1)}
    return {
        "preset": suite.preset.name,
        "split": split,
        "phatgoose": dict(phatgoose or {}),
        "methods": methods,
        "best_single": {"expert": best, **methods[f"expert: {best}"]},
        "test_prompts": len(test),
        "chance_routing": round(100 / len(experts), 1),
        "retrieval_examples": suite.preset.retrieval_examples,
        "build": suite.meta.get("timings", {}),
        "seconds": round(time.perf_counter() - t0, 1),
    }


#: the routers on the control suite: label → registered router name
ROUTERS = {
    "PHATGOOSE": "phatgoose",
    "Arrow": "arrow",
    "retrieval": "retrieval",
    "random gates (PHATGOOSE, keys replaced)": "phatgoose",
}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| method | held-out segments right (%) | routing accuracy, input tokens (%) |", "|---|---:|---:|"]
    for name, m in result["methods"].items():
        ra = m.get("routing_accuracy_inputs")
        chosen = m.get("chosen")
        shown = (
            f"{name} ({', '.join(f'{k}={v}' for k, v in chosen.items()) or 'no parameters'}; chosen on validation)"
            if chosen is not None
            else name
        )
        lines.append(f"| {shown} | {m['held_out_segment_accuracy']:.1f} | {'' if ra is None else f'{ra:.1f}'} |")
    return "\n".join(lines) + (
        f"\n\n{result['test_prompts']} held-out prompts of three segments from three vocabularies; "
        f"routing chance {result['chance_routing']} %."
        + (f" Retrieval's bank: {n} examples per expert." if (n := result.get("retrieval_examples", 1000)) != 1000 else "")
    )
