"""Token-level routing maths shared by PHATGOOSE, GLIDER and Arrow, and the hook the
multi-expert layer calls on its own input in every forward (spec: phatgoose-glider.md §1.4, §2.4).

Per module with input u ∈ R^d and expert keys v_1..v_E:

* PHATGOOSE ("ln"):  s_i = LN(u)·LN(v_i) / sqrt(d), LN without affine, eps 1e-5 (§1.4)
* Arrow ("abs"):     s_i = |u·v_i| / T (mttl's ArrowSelector; §1.7)
* GLIDER adds a per-example global term α·cos(q, r_i) to every module's logits (§2.4)

then the top-k logits and a softmax over them (== the reference code's full softmax, top-k,
renormalise with +1e-6; :func:`topk_renormalised` is that form, for tests).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F

from moerge.adapters.layer import TopK

Score = Literal["ln", "abs"]
LN_EPS = 1e-5


def standardise(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine over the last dim (biased variance, eps 1e-5), in fp32."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=LN_EPS)


def phatgoose_logits(u: torch.Tensor, keys_ln: torch.Tensor) -> torch.Tensor:
    """LN(u) · K̂ᵀ / sqrt(d) for keys already standardised (K̂ = LN(V), [E, d]) → [..., E].
    (``F.layer_norm`` is an order of magnitude faster than ``var`` on CPU, so LN(u) is built.)"""
    return standardise(u) @ keys_ln.T / math.sqrt(u.shape[-1])


def arrow_logits(u: torch.Tensor, protos: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """|u · v_i| / T → [..., E] (prototypes are sign-ambiguous singular vectors, hence the |·|)."""
    return (u.float() @ protos.T).abs() / temperature


def topk_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights) of the top-``k`` logits with a softmax over just those (the paper's form)."""
    k = min(k, logits.shape[-1])
    val, idx = logits.topk(k, dim=-1)
    return idx, torch.softmax(val, dim=-1)


def topk_renormalised(logits: torch.Tensor, k: int, eps: float = 1e-6) -> torch.Tensor:
    """The reference code's form as dense weights: softmax over all E, keep the top-k, divide by
    their sum + eps."""
    p = torch.softmax(logits.float(), dim=-1)
    val, idx = p.topk(min(k, p.shape[-1]), dim=-1)
    return torch.zeros_like(p).scatter(-1, idx, val / (val.sum(-1, keepdim=True) + eps))


def align_rows(bias: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """A per-example [B, E] term broadcast to an input's leading shape [B', T] (B' = B·beams)."""
    if bias.shape[0] != lead[0]:
        if lead[0] % bias.shape[0]:
            raise ValueError(f"per-example routing bias for {bias.shape[0]} inputs does not fit a batch of {lead[0]}")
        bias = bias.repeat_interleave(lead[0] // bias.shape[0], dim=0)
    return bias.reshape(lead[0], *([1] * (len(lead) - 1)), bias.shape[-1])


class TokenHook:
    """Called by each :class:`~moerge.adapters.layer.MultiExpertLinear` as ``hook(layer, x)``:
    scores x against that module's expert keys, adds the optional per-example bias, keeps the
    top-k and returns sparse :class:`TopK` weights. Modules without keys for some experts (an
    expert that does not adapt that module) give those experts −inf."""

    def __init__(
        self,
        keys: Mapping[str, torch.Tensor],
        *,
        score: Score,
        top_k: int,
        temperature: float = 1.0,
        bias: torch.Tensor | None = None,
        missing: Mapping[str, torch.Tensor] | None = None,
        recorder=None,  # noqa: ANN001
    ) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be ≥ 1, got {top_k}")
        self.keys = keys
        self.score = score
        self.top_k = top_k
        self.temperature = temperature
        self.bias = bias
        self.missing = missing or {}
        self.recorder = recorder

    def logits(self, module: str, x: torch.Tensor) -> torch.Tensor:
        try:
            keys = self.keys[module]
        except KeyError:
            raise KeyError(f"the router has no keys for module {module!r}") from None
        if keys.device != x.device:  # keys are put on the model's device at load; this is the fallback
            keys = keys.to(x.device)
        if self.score == "ln":
            logits = phatgoose_logits(x, keys)
        else:
            logits = arrow_logits(x, keys, self.temperature)
        missing = self.missing.get(module)
        if missing is not None:
            missing = missing.to(logits.device)
            logits = logits.masked_fill(missing, float("-inf"))
        if self.bias is not None:
            logits = logits + align_rows(self._bias_on(logits), x.shape[:-1])
        return logits

    def _bias_on(self, like: torch.Tensor) -> torch.Tensor:
        """The per-example bias on the activations' device, copied there once per hook."""
        bias = self.bias
        if bias.device != like.device or bias.dtype != like.dtype:  # type: ignore[union-attr]
            self.bias = bias = bias.to(device=like.device, dtype=like.dtype)  # type: ignore[union-attr]
        return bias  # type: ignore[return-value]

    def __call__(self, layer, x: torch.Tensor) -> TopK:  # noqa: ANN001
        idx, w = topk_softmax(self.logits(layer.module_name, x), self.top_k)
        if self.recorder is not None:
            self.recorder.add(layer.module_name, idx, w)
        return TopK(idx, w.to(x.dtype))
