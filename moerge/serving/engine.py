"""The in-process engine a serving worker wraps: one base model with ``max_resident`` expert
slots (least-recently-used eviction, experts loaded on demand from the registry), plus any
whole compositions. :meth:`ExpertEngine.run` serves a batch of compatible requests with **one**
``generate`` call: each row's experts enter through the multi-expert layer as a per-row
:class:`~moerge.adapters.Assignment` — no adapter switching, no per-expert sub-batches."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from moerge.adapters import Assignment, attach_slots, layers, load_expert, load_lora, use_weights
from moerge.composer.compose import ComposedModel, decode_text, encode_prompts, load_base
from moerge.decoding import bucket, compile_kwargs, pad_rows, padded_weights, tokenizer_kwargs
from moerge.device import DeviceLike, DTypeLike, module_device, resolve_device, resolve_dtype, set_threads
from moerge.registry import ExpertRecord, Registry
from moerge.serving.batching import Residency
from moerge.serving.types import (
    BASE,
    BadRequest,
    GenerationParams,
    Limits,
    ServeRequest,
    ServeResult,
    ServingError,
    UnknownExpert,
)

log = logging.getLogger(__name__)

#: a streamed row's sink: called from the generating thread with each new piece of text
Emit = Callable[[str], None]


class RowStreamer:
    """A transformers streamer over a whole batch: after each decode step, every streamed row's
    new text goes to its ``emit``. Rows stop at EOS or their own ``max_new_tokens``. Text is
    emitted only while it extends what was sent (a detokeniser may revise a partial word), so
    the pieces always join to the row's final text. Reading each step's tokens is a host sync:
    streamed batches pay it, others never build a streamer."""

    def __init__(self, tokenizer: Any, rows: Mapping[int, tuple[int, Emit]]) -> None:
        self.tokenizer, self.rows = tokenizer, dict(rows)
        self.eos = tokenizer.eos_token_id
        self.ids: dict[int, list[int]] = {b: [] for b in self.rows}
        self.sent: dict[int, str] = dict.fromkeys(self.rows, "")
        self.done: set[int] = set()
        self.prompt_seen = False

    def _flush(self, b: int) -> None:
        text = decode_text(self.tokenizer, self.ids[b])
        if len(text) > len(self.sent[b]) and text.startswith(self.sent[b]) and not text.endswith("\ufffd"):
            self.rows[b][1](text[len(self.sent[b]) :])
            self.sent[b] = text

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        step = value.reshape(-1).tolist()
        for b, (limit, _) in self.rows.items():
            if b in self.done:
                continue
            if step[b] == self.eos:
                self.done.add(b)
                continue
            self.ids[b].append(step[b])
            self._flush(b)
            if len(self.ids[b]) >= limit:
                self.done.add(b)

    def end(self) -> None:
        return None


class UsageRecorder:
    """Per row, the routing weight each expert received, summed over modules and tokens (a
    token-routed composition's answer to "which experts served this request")."""

    def __init__(self, rows: int, experts: int, padded_rows: int | None = None) -> None:
        self.rows, self.experts = rows, experts
        self.accepted = {rows, padded_rows or rows}  # rows past ours pad a compiled bucket
        self.usage: torch.Tensor | None = None  # on the device the hook runs on (no read-back per module)
        #: the prompts' attention mask: left padding does not count in the prefill
        self.mask: torch.Tensor | None = None

    def add(self, module: str, index: torch.Tensor, weight: torch.Tensor) -> None:
        if index.shape[0] not in self.accepted:  # expanded rows (beams): not attributed
            return
        index, weight = index[: self.rows], weight[: self.rows]
        if self.mask is not None and index.dim() == 3 and index.shape[1] == self.mask.shape[1]:
            weight = weight * self.mask[: self.rows, :, None].to(weight.device, weight.dtype)
        if self.usage is None:
            self.usage = torch.zeros(self.rows, self.experts, device=index.device)
        self.usage.scatter_add_(1, index.reshape(self.rows, -1), weight.detach().float().reshape(self.rows, -1))

    def shares(self) -> torch.Tensor:
        usage = torch.zeros(self.rows, self.experts) if self.usage is None else self.usage.cpu()
        return usage / usage.sum(1, keepdim=True).clamp_min(1e-12)


def top_shares(names: Sequence[str], row: torch.Tensor, min_share: float = 0.01) -> list[tuple[str, float]]:
    order = torch.argsort(row, descending=True).tolist()
    return [(names[e], round(float(row[e]), 4)) for e in order if float(row[e]) >= min_share]


class ExpertEngine:
    """A base model with expert slots and optional compositions, serving batches of requests.

    ``registry``: a Registry or its folder. ``base``: the base model (default: the one base all
    the registry's LoRA experts name). ``compositions``: name → composition spec (a saved
    spec's path, dict or :class:`CompositionSpec`), each run whole with its own base copy."""

    def __init__(
        self,
        registry: Registry | str,
        base: str | None = None,
        max_resident: int = 8,
        preload: Sequence[str] = (),
        compositions: Mapping[str, Any] | None = None,
        limits: Limits = Limits(),
        threads: int | None = None,
        device: DeviceLike = "auto",
        dtype: DTypeLike = "auto",
        compile: bool = False,
        refresh: Callable[[], None] | None = None,
    ) -> None:
        set_threads(threads)
        #: called when a request names an expert the registry lacks (a mirror fetches new records)
        self.refresh = refresh
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        #: decode with a static cache and torch.compile, batches padded to bucket sizes
        self.compile = compile
        self.registry = registry if isinstance(registry, Registry) else Registry(registry)
        self.limits = limits
        loras = self.registry.list(kind="lora")
        bases = sorted({r.base_model for r in loras if r.base_model})
        #: the bases this server's experts may name: the registry's one base, and ``base=`` when it
        #: overrides that (the model moved; the experts' shapes are still checked when they load)
        if base is None:
            if len(bases) != 1:
                raise ValueError(f"the registry's LoRA experts name {len(bases)} bases ({bases}); pass base=")
            base = bases[0]
            self.accepted_bases = {base}
        else:
            self.accepted_bases = {base} | (set(bases) if len(bases) == 1 else set())
        self.base = base
        self.model, self.tokenizer = load_base(base, device=self.device, dtype=self.dtype)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self.max_resident = max_resident
        self.residency = Residency(max_resident)
        modules = sorted({m for r in loras if r.base_model in self.accepted_bases and r.lora for m in r.lora.modules})
        attach_slots(self.model, modules, max_resident) if modules else None
        self.compositions: dict[str, ComposedModel] = {}
        for name, spec in (compositions or {}).items():
            self.compositions[name] = ComposedModel.load(spec, device=self.device, dtype=self.dtype, compile=compile)
        self.stats: Counter[str] = Counter()
        self.distinct_hist: Counter[int] = Counter()
        if preload:
            self.ensure(list(preload)[:max_resident])

    # ----------------------------------------------------------------------------- experts

    def record(self, name: str) -> ExpertRecord:
        """The registry record a request's expert name means (``name`` or ``name@version``),
        checked to be a LoRA on this engine's base."""
        try:
            try:
                rec = self.registry.get(name)  # "name" or "name@version"
            except KeyError:
                if self.refresh is None:
                    raise
                self.refresh()  # registered since this mirror was made?
                rec = self.registry.get(name)
        except KeyError:
            raise UnknownExpert(f"unknown expert {name!r}; the registry has {self.registry.names()[:20]}") from None
        except ValueError:
            raise BadRequest(f"expert {name!r}: the version after '@' must be a number") from None
        if rec.kind != "lora":
            raise BadRequest(f"expert {name!r} is a {rec.kind} expert; serving batches LoRA experts over one base")
        if rec.base_model not in self.accepted_bases:
            raise BadRequest(f"expert {name!r} was trained on {rec.base_model!r}, not this server's base {self.base!r}")
        return rec

    def ensure(self, names: Sequence[str]) -> dict[str, int]:
        """Make ``names`` resident (LRU eviction of others); returns name → slot."""
        records = [self.record(n) for n in names]
        refs = [r.ref for r in records]
        slots, loads, evicted = self.residency.acquire(refs)
        by_ref = {r.ref: r for r in records}
        for ref, slot in loads:
            try:
                lora = load_lora(by_ref[ref], registry=self.registry, device=self.device)
                missing = sorted(set(lora.modules) - set(layers(self.model)))
                if missing:  # an expert registered after start-up adapts new modules
                    attach_slots(self.model, missing, self.max_resident)
                load_expert(self.model, slot, lora)
            except Exception:
                self.residency.release(ref)
                raise
            self.stats["loads"] += 1
        self.stats["evictions"] += len(evicted)
        return {n: slots[ref] for n, ref in zip(names, refs, strict=True)}

    @property
    def resident(self) -> list[str]:
        """Resident experts (refs), least recently used first."""
        return self.residency.resident

    # ------------------------------------------------------------------------------- batches

    def check(self, r: ServeRequest) -> None:
        """Everything about one request that can be refused before it runs: limits, names
        (unknown experts fail fast, naming them), prompt length in tokens."""
        r.check(self.limits)
        if r.composition is not None:
            if r.composition not in self.compositions:
                raise UnknownExpert(f"unknown composition {r.composition!r}; this server has {sorted(self.compositions)}")
            tok = self.compositions[r.composition].tokenizer
        else:
            if len(r.experts) > self.max_resident:
                raise BadRequest(f"a request may name at most {self.max_resident} experts (max_resident), got {len(r.experts)}")
            for n, _ in r.experts:
                if n != BASE:
                    self.record(n)
            tok = self.tokenizer
        n = len(tok(r.prompt)["input_ids"])
        if n > self.limits.max_prompt_tokens:
            raise BadRequest(f"prompt has {n} tokens; the limit is {self.limits.max_prompt_tokens}")
        if self.max_positions and n + r.params.max_new_tokens > self.max_positions:
            raise BadRequest(
                f"prompt ({n} tokens) + max_new_tokens ({r.params.max_new_tokens}) exceeds the model's {self.max_positions} positions"
            )

    def run(self, requests: Sequence[ServeRequest], streams: Mapping[int, Emit] | None = None) -> list[ServeResult]:
        """Serve a batch of requests sharing one batch key with one ``generate``. A request
        that fails its checks gets its own error (and status); the others still run.
        ``streams``: request index → a sink for its text as it decodes (see :class:`RowStreamer`)."""
        if not requests:
            return []
        keys = {r.batch_key() for r in requests}
        if len(keys) != 1:
            raise ValueError(f"a batch must share one batch key, got {keys}")
        results = [ServeResult(id=r.id, composition=r.composition, batch_size=len(requests)) for r in requests]
        live, sinks = [], {}
        for i, (r, o) in enumerate(zip(requests, results, strict=True)):
            try:
                self.check(r)
                if streams and i in streams:
                    sinks[len(live)] = streams[i]
                live.append((r, o))
            except ServingError as exc:
                o.error, o.status = exc.message, exc.status
        if live:
            reqs, outs = [r for r, _ in live], [o for _, o in live]
            if reqs[0].composition is None:
                self._run_experts(reqs, outs, sinks)
            else:
                self._run_composition(self.compositions[reqs[0].composition], reqs, outs, sinks)
            self.stats["batches"] += 1
            self.stats["rows"] += len(live)
        return results

    def _run_experts(self, reqs: list[ServeRequest], outs: list[ServeResult], sinks: Mapping[int, Emit] | None = None) -> None:
        names = list(dict.fromkeys(n for r in reqs for n, _ in r.experts if n != BASE))
        slot_of = self.ensure(names) if names else {}
        rows = [[(slot_of[n], w) for n, w in r.experts if n != BASE] for r in reqs]
        if self.compile:  # dummy rows up to the bucket size run the base alone
            rows += [[]] * (bucket(len(rows)) - len(rows))
        assignment = Assignment.rows(rows) if layers(self.model) else None
        self.distinct_hist[len(names)] += 1
        self._generate(self.model, reqs, outs, assignment, sinks=sinks)
        for r, o in zip(reqs, outs, strict=True):
            o.experts = [(n, float(w)) for n, w in r.experts] or [(BASE, 1.0)]
            o.distinct_experts = len(names)

    def _run_composition(
        self, comp: ComposedModel, reqs: list[ServeRequest], outs: list[ServeResult], sinks: Mapping[int, Emit] | None = None
    ) -> None:
        routing = comp.route([r.prompt for r in reqs])
        recorder = None
        if routing.granularity == "token":
            recorder = UsageRecorder(len(reqs), len(comp.experts), bucket(len(reqs)) if self.compile else None)
            routing.hook.recorder = recorder  # type: ignore[union-attr]
        weights = padded_weights(routing, bucket(len(reqs)) if self.compile else len(reqs))
        with use_weights(comp.model, weights):
            self._generate(comp.model, reqs, outs, None, tokenizer=comp.tokenizer, recorder=recorder, sinks=sinks)
        shares = recorder.shares() if recorder is not None else routing.weights.float()
        for b, o in enumerate(outs):
            o.experts = top_shares(comp.experts, shares[b])
            o.distinct_experts = len(comp.experts)

    @torch.inference_mode()
    def _generate(
        self,
        model: torch.nn.Module,
        reqs: list[ServeRequest],
        outs: list[ServeResult],
        assignment: Assignment | None,
        tokenizer: Any = None,
        recorder: UsageRecorder | None = None,
        sinks: Mapping[int, Emit] | None = None,
    ) -> None:
        tok = tokenizer or self.tokenizer
        params: GenerationParams = reqs[0].params
        prompts = pad_rows([r.prompt for r in reqs], self.compile)
        enc = encode_prompts(tok, prompts, module_device(model), **tokenizer_kwargs(self.compile))
        lengths = enc["attention_mask"].sum(1).tolist()
        if recorder is not None:
            recorder.mask = enc["attention_mask"]
        longest = max(r.params.max_new_tokens for r in reqs)
        kw: dict[str, Any] = {"do_sample": params.temperature > 0}
        if self.compile:
            kw.update(compile_kwargs(module_device(model)))
        if params.temperature > 0:
            kw.update(temperature=params.temperature, top_p=params.top_p)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        if sinks:
            kw["streamer"] = RowStreamer(tok, {b: (reqs[b].params.max_new_tokens, emit) for b, emit in sinks.items()})
        with use_weights(model, assignment) if assignment is not None else nullcontext():
            gen = model.generate(
                **enc, max_new_tokens=longest, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw
            )
        new = gen[:, enc["input_ids"].shape[1] :]
        eos = tok.eos_token_id
        for b, (r, o) in enumerate(zip(reqs, outs, strict=True)):
            ids = new[b, : r.params.max_new_tokens].tolist()
            stop = ids.index(eos) if eos is not None and eos in ids else None
            o.finish_reason = "stop" if stop is not None else "length"
            ids = ids[:stop] if stop is not None else ids
            o.text = decode_text(tok, ids)
            o.prompt_tokens = int(lengths[b])
            o.completion_tokens = len(ids)

    # ------------------------------------------------------------------------------- routing

    @torch.inference_mode()
    def usage(self, composition: str, prompts: Sequence[str]) -> list[list[tuple[str, float]]]:
        """For a composition: per prompt, each expert's share of the routing weight over one
        prefill (token routers) or its sequence weight."""
        if composition not in self.compositions:
            raise UnknownExpert(f"unknown composition {composition!r}; this server has {sorted(self.compositions)}")
        comp = self.compositions[composition]
        routing = comp.route(list(prompts))
        if routing.granularity != "token":
            return [top_shares(comp.experts, row) for row in routing.weights.float()]
        recorder = UsageRecorder(len(prompts), len(comp.experts))
        routing.hook.recorder = recorder  # type: ignore[union-attr]
        enc = encode_prompts(comp.tokenizer, prompts, module_device(comp.model))
        recorder.mask = enc["attention_mask"]
        with comp.routed(routing):
            comp.model(**enc)
        return [top_shares(comp.experts, row) for row in recorder.shares()]

    def info(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "registry": str(self.registry.root),
            "max_resident": self.max_resident,
            "resident": self.resident,
            "compositions": sorted(self.compositions),
            "stats": dict(self.stats),
            "distinct_experts_per_batch": dict(sorted(self.distinct_hist.items())),
        }
