"""A saved composition as an lm-evaluation-harness model (the optional extra ``moerge[lm-eval]``).

Importing this module registers the model ``moerge`` with lm-eval, so::

    moerge lm-eval --model moerge --model_args composition=glider.json --tasks TASK [--include_path DIR]

(``moerge lm-eval`` is lm-eval's own command line with the model registered) or, in Python,
``lm_eval.simple_evaluate(model=MoergeLM(composition="glider.json"), tasks=[...])``.

Every request batch is routed the way ``ComposedModel.generate`` routes it: the router sees each
request's context (token routers decide per token and module; GLIDER adds its text score;
sequence routers — retrieval, Twin-Merging — choose per context). Supported request types:
``generate_until`` (greedy; ``until``, ``max_gen_toks``), ``loglikelihood`` (multiple-choice and
likelihood tasks) and ``loglikelihood_rolling`` (perplexity, in windows of ``max_length``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from moerge.composer import load_composition
from moerge.evaluation.metrics import cut_at_stop


@register_model("moerge")
class MoergeLM(LM):
    """``composition``: a spec written by ``ComposedModel.save`` (or pass a loaded
    ``ComposedModel`` as ``model``). ``base``: load the spec on another base folder.
    ``batch_size``: requests per forward or generate call. ``max_length``: the longest input
    scored in one forward (rolling windows above it)."""

    def __init__(
        self,
        composition: str | None = None,
        model: Any = None,
        base: str | None = None,
        batch_size: int | str | None = 16,
        max_length: int = 2048,
        max_gen_toks: int = 256,
        device: str | None = None,
        dtype: str = "auto",
        **_: Any,  # lm-eval's other generic settings (max_batch_size …) do not apply
    ) -> None:
        super().__init__()
        if (composition is None) == (model is None):
            raise ValueError("MoergeLM needs composition= (a saved composition spec) or model= (a ComposedModel), not both")
        if model is None:
            kwargs: dict[str, Any] = {"device": device or "auto", "dtype": dtype}
            if base:
                kwargs["base"] = base
            model = load_composition(str(composition), **kwargs)
        self.composed = model
        self.tokenizer = model.tokenizer
        self.batch_size = 16 if batch_size in (None, "auto") else int(batch_size)
        self.max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        for idx in groups.values():
            kw = dict(requests[idx[0]].args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            if kw.pop("do_sample", False) or kw.get("temperature", 0.0) not in (0, 0.0, None):
                raise ValueError(
                    f"moerge's lm-eval model decodes greedily; this task asks for sampling ({requests[idx[0]].args[1]})"
                )
            contexts = [requests[i].args[0] for i in idx]
            texts = self.composed.generate(contexts, max_new_tokens=n_new, batch_size=self.batch_size, collapse_whitespace=False)
            for i, text in zip(idx, texts, strict=True):
                out[i] = cut_at_stop(text, until)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return [o or "" for o in out]

    # ------------------------------------------------------------------ likelihoods
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prefix(self) -> list[int]:
        tok = self.tokenizer
        return [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]

    @torch.inference_mode()
    def _score(self, texts: Sequence[str], windows: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether it is the greedy continuation, per
        (context ids, continuation ids); the router sees ``texts`` (each request's context)."""
        out: list[tuple[float, bool]] = []
        dev = self.composed.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start : start + self.batch_size]
            rows = [(ctx + cont)[-(self.max_length + 1) :] for ctx, cont in chunk]
            width = max(len(r) for r in rows) - 1
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for b, row in enumerate(rows):  # right padding: positions count from 0 in every row
                ids[b, : len(row) - 1] = torch.tensor(row[:-1])
                mask[b, : len(row) - 1] = 1
            routing = self.composed.route(list(texts[start : start + self.batch_size]))
            with self.composed.routed(routing):
                logits = self.composed.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
            logp = torch.log_softmax(logits, dim=-1).cpu()
            for b, ((_, cont), row) in enumerate(zip(chunk, rows, strict=True)):
                n = len(cont)
                targets = torch.tensor(row[-n:])
                pos = torch.arange(len(row) - 1 - n, len(row) - 1)
                lp = logp[b, pos]
                out.append((float(lp.gather(1, targets[:, None]).sum()), bool((lp.argmax(-1) == targets).all())))
        return out

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        windows, texts = [], []
        for r in requests:
            context, continuation = r.args
            whole = self._encode(context + continuation)
            ctx = self._encode(context)
            if whole[: len(ctx)] != ctx:  # the join changed the tokens at the boundary: encode apart
                whole = ctx + self._encode(continuation)
            cont = whole[len(ctx) :]
            if not cont:
                raise ValueError(f"continuation {continuation!r} encodes to no token")
            windows.append((self._prefix() + ctx, cont))
            texts.append(context)
        out = self._score(texts, windows)
        for r, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return out

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for r in requests:
            (text,) = r.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self._encode(text), prefix_token=self._prefix()[0], max_seq_len=self.max_length, context_len=1
                )
            ]
            total = sum(lp for lp, _ in self._score([text] * len(windows), windows))
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
            out.append(total)
        return out

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the composition's tokenizer has no chat template; run without --apply_chat_template")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "moerge")).replace("/", "__")


def main(argv: Sequence[str]) -> None:
    """lm-eval's command line with the ``moerge`` model registered (``moerge lm-eval ARGS``)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
