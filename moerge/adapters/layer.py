"""The multi-expert linear layer: one base linear plus E experts' stacked low-rank factors.

    y = W x + Σ_e w_e · s_e · B_e A_e x

Weights come per sequence ([B, E]; one-hot rows make a mixed-expert batch), per token
([B, T, E]), or from a callable that computes them from the layer's input (token-level routers).
Only experts that carry a non-zero weight somewhere are computed, and each only on the rows
(tokens) that give it weight, so a top-k routing touches k experts per token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from moerge.adapters.lora import LoraFactors


@dataclass
class TopK:
    """Sparse routing weights: for every row, ``index`` [..., k] experts with ``weight`` [..., k].
    What top-k routers return, so the layer never scans a dense [..., E] tensor for non-zeros."""

    index: torch.Tensor
    weight: torch.Tensor

    def dense(self, num_experts: int) -> torch.Tensor:
        """The same weights as a dense [..., E] tensor (repeated indices add up)."""
        out = torch.zeros(*self.index.shape[:-1], num_experts, dtype=self.weight.dtype, device=self.weight.device)
        return out.scatter_add_(-1, self.index, self.weight)


class Assignment:
    """Per-sequence expert assignment for a mixed-expert batch (serving): row b uses experts
    ``index[b, j]`` with weight ``weight[b, j]``; index −1 pads (no expert: the base model alone).

    The layer evaluates it as a per-row gather of the assigned factors and two batched matmuls
    (the BGMV shape of S-LoRA/Punica), so the cost does not grow with the number of distinct
    experts in the batch; a batch whose rows all use one expert runs as one plain LoRA matmul.
    The bookkeeping (clamped indices, the uniform case) is computed once here, not per module."""

    def __init__(self, index: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        index = torch.as_tensor(index, dtype=torch.long)
        if index.dim() == 1:
            index = index[:, None]
        if index.dim() != 2:
            raise ValueError(f"an assignment's index must be [batch] or [batch, k], got shape {tuple(index.shape)}")
        weight = torch.ones(index.shape) if weight is None else torch.as_tensor(weight, dtype=torch.float32)
        if weight.dim() == 1:
            weight = weight[:, None]
        if weight.shape != index.shape:
            raise ValueError(f"assignment weights {tuple(weight.shape)} do not match its index {tuple(index.shape)}")
        valid = index >= 0
        self.index = index
        self.weight = weight * valid
        self.safe_index = index.clamp(min=0)
        firsts = index[:, 0].unique().tolist() if index.numel() else []
        #: the one expert every row uses alone (k = 1), or None
        self.uniform: int | None = firsts[0] if index.shape[1] == 1 and len(firsts) == 1 and firsts[0] >= 0 else None
        self.any = bool(valid.any())
        #: the largest expert index used, so layers check it without a host sync each
        self.max_index = int(index.max()) if index.numel() else -1

    @classmethod
    def rows(cls, experts: Sequence[Sequence[tuple[int, float]]]) -> Assignment:
        """From per-row lists of (expert index, weight); rows may list different numbers of experts."""
        k = max([1, *(len(r) for r in experts)])
        index = torch.full((len(experts), k), -1, dtype=torch.long)
        weight = torch.zeros(len(experts), k)
        for b, row in enumerate(experts):
            for j, (e, w) in enumerate(row):
                index[b, j], weight[b, j] = e, w
        return cls(index, weight)

    def __len__(self) -> int:
        return self.index.shape[0]

    def dense(self, num_experts: int) -> torch.Tensor:
        """The same weights as dense per-sequence weights [batch, E]."""
        if self.max_index >= num_experts:
            raise ValueError(f"assignment names expert {self.max_index} but there are {num_experts}")
        out = torch.zeros(len(self), num_experts)
        return out.scatter_add_(1, self.safe_index, self.weight)


#: a router hook: (layer, input x [..., d_in]) -> weights [..., E] or TopK
WeightFn = Callable[["MultiExpertLinear", torch.Tensor], "torch.Tensor | TopK"]

#: a top-k mixture runs as two matmuls over all experts' stacked factors (x·[A_1;…;A_E]ᵀ, masked
#: to each row's k experts, then ·[B_1 … B_E]ᵀ) when the batch has at most this many rows or
#: E ≤ CONCAT_EXPERTS_PER_K·k; otherwise each expert runs once on the rows routed to it. On a
#: CPU the few large matmuls beat many small gathers for decode steps and small prefills
#: (measured in benches: ``moerge bench routing``).
CONCAT_ROWS = 256
CONCAT_EXPERTS_PER_K = 4
#: dense weights ([..., E] with at least this share of non-zeros) use the stacked path too
DENSE_FRACTION = 0.5


def base_shape(base: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2 stores W as [d_in, d_out])."""
    if isinstance(base, nn.Linear):
        return base.out_features, base.in_features
    if type(base).__name__ == "Conv1D" and hasattr(base, "nf"):
        return base.weight.shape[1], base.weight.shape[0]
    raise TypeError(f"cannot wrap a {type(base).__name__}: only nn.Linear and transformers Conv1D layers are supported")


class MultiExpertLinear(nn.Module):
    """Wraps a base linear layer and holds E experts' factors stacked as ``lora_A`` [E, r_max, d_in]
    and ``lora_B`` [E, d_out, r_max] (zero-padded, so mixed ranks are exact) with ``scaling`` [E]."""

    def __init__(
        self, base: nn.Module, factors: Sequence[LoraFactors | None], expert_names: Sequence[str], name: str = ""
    ) -> None:
        super().__init__()
        if len(factors) != len(expert_names):
            raise ValueError(f"{len(factors)} factor sets for {len(expert_names)} expert names")
        d_out, d_in = base_shape(base)
        self.base = base
        self.module_name = name
        self.expert_names = list(expert_names)
        ranks = [f.rank if f is not None else 0 for f in factors]
        r_max = max([1, *ranks])
        dtype = base.weight.dtype
        device = base.weight.device
        A = torch.zeros(len(factors), r_max, d_in, dtype=dtype, device=device)
        B = torch.zeros(len(factors), d_out, r_max, dtype=dtype, device=device)
        scaling = torch.zeros(len(factors), dtype=dtype, device=device)
        for e, f in enumerate(factors):
            if f is None:
                continue
            self.check(f, expert_names[e])
            A[e, : f.rank] = f.A.to(dtype)
            B[e, :, : f.rank] = f.B.to(dtype)
            scaling[e] = f.scaling
        self.register_buffer("lora_A", A, persistent=False)
        self.register_buffer("lora_B", B, persistent=False)
        self.register_buffer("scaling", scaling, persistent=False)
        # [d_out, E·r_max]: B_1 … B_E side by side, for the stacked top-k path
        self.register_buffer("lora_B_cat", B.permute(1, 0, 2).reshape(d_out, -1).contiguous(), persistent=False)
        self.ranks = ranks
        #: routing state: None (base only), a weight tensor, or a WeightFn
        self.weights: torch.Tensor | WeightFn | None = None

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, ranks={self.ranks}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        w = self.weights(self, x) if callable(self.weights) else self.weights
        if w is None:
            return y
        if isinstance(w, Assignment):
            return y + self.assigned_mixture(x, w) if w.any else y
        if isinstance(w, TopK):
            return y + self.topk_mixture(x, w)
        return y + self.mixture(x, self._align(w, x))

    def assigned_mixture(self, x: torch.Tensor, a: Assignment) -> torch.Tensor:
        """Σ_j w_bj · s_e · B_e A_e x_b with e = index[b, j], for x [B, T, d_in] (or [B, d_in])."""
        index, safe, weight = a.index, a.safe_index, a.weight
        rows = x.shape[0]
        if rows != len(a):
            if rows % len(a):
                raise ValueError(
                    f"an assignment for {len(a)} sequences does not fit input {tuple(x.shape)} at {self.module_name!r}"
                )
            rep = rows // len(a)  # generate() expands rows for beams / num_return_sequences
            index, safe, weight = (t.repeat_interleave(rep, dim=0) for t in (index, safe, weight))
        if a.max_index >= self.num_experts:
            raise ValueError(f"assignment names expert {a.max_index} but module {self.module_name!r} holds {self.num_experts}")
        x3 = x if x.dim() == 3 else x.unsqueeze(1)
        if a.uniform is not None:
            e = a.uniform
            r = max(self.ranks[e], 1)
            coef = (weight[:, 0] * self.scaling[e]).to(x.dtype)
            out = ((x3 @ self.lora_A[e, :r].T) * coef[:, None, None]) @ self.lora_B[e, :, :r].T
        else:
            out = None
            for j in range(index.shape[1]):
                ix = safe[:, j]
                coef = (weight[:, j] * self.scaling.index_select(0, ix)).to(x.dtype)
                h = torch.bmm(x3, self.lora_A.index_select(0, ix).transpose(1, 2)) * coef[:, None, None]
                term = torch.bmm(h, self.lora_B.index_select(0, ix).transpose(1, 2))
                out = term if out is None else out + term
        return out if x.dim() == 3 else out.squeeze(1)

    def set_expert(self, e: int, factors: LoraFactors | None, name: str) -> None:
        """Put ``factors`` (or nothing) into expert slot ``e`` in place — how a serving worker
        swaps a resident expert without rebuilding the layer. Call :meth:`check` first when
        several layers must change together (this one only raises on a shape mismatch)."""
        self.check(factors, name)
        if factors is not None and factors.rank > self.lora_A.shape[1]:
            self._grow_rank(factors.rank)
        self.lora_A[e].zero_()
        self.lora_B[e].zero_()
        self.scaling[e] = 0.0
        rank = 0
        if factors is not None:
            rank = factors.rank
            self.lora_A[e, :rank] = factors.A.to(self.lora_A.dtype)
            self.lora_B[e, :, :rank] = factors.B.to(self.lora_B.dtype)
            self.scaling[e] = factors.scaling
        r_max = self.lora_A.shape[1]
        self.lora_B_cat[:, e * r_max : (e + 1) * r_max] = self.lora_B[e]
        self.ranks[e] = rank
        self.expert_names[e] = name

    def check(self, factors: LoraFactors | None, name: str) -> None:
        d_out, d_in = base_shape(self.base)
        if factors is not None and (factors.A.shape[1] != d_in or factors.B.shape[0] != d_out):
            raise ValueError(
                f"expert {name!r} at module {self.module_name!r}: factors give ΔW of shape "
                f"({factors.B.shape[0]}, {factors.A.shape[1]}) but the base layer is ({d_out}, {d_in}) (d_out, d_in)"
            )

    def _grow_rank(self, rank: int) -> None:
        E, r_old, d_in = self.lora_A.shape
        A = self.lora_A.new_zeros(E, rank, d_in)
        B = self.lora_B.new_zeros(E, self.lora_B.shape[1], rank)
        A[:, :r_old] = self.lora_A
        B[:, :, :r_old] = self.lora_B
        self.lora_A, self.lora_B = A, B
        self.lora_B_cat = B.permute(1, 0, 2).reshape(B.shape[1], -1).contiguous()

    def _align(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Broadcast weights to x's leading shape: [B, E] per sequence or [B, T, E] per token."""
        E = self.num_experts
        if w.shape[-1] != E:
            raise ValueError(
                f"routing weights have {w.shape[-1]} experts in the last dim but module {self.module_name!r} holds {E}"
            )
        lead = x.shape[:-1]
        if w.shape[0] != lead[0] and lead[0] % w.shape[0] == 0:  # generate() expands rows for beams
            w = w.repeat_interleave(lead[0] // w.shape[0], dim=0)
        if w.dim() == 2 and len(lead) == 2:  # per sequence → per token
            w = w[:, None, :]
        try:
            return w.expand(*lead, E)
        except RuntimeError:
            raise ValueError(
                f"routing weights of shape {tuple(w.shape)} do not fit input of shape {tuple(x.shape)} at module "
                f"{self.module_name!r}; expected [batch, experts] or [batch, tokens, experts]"
            ) from None

    def mixture(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Σ_e w_e · s_e · B_e A_e x for weights ``w`` [..., E] aligned with ``x`` [..., d_in].
        Dense weights (most rows give most experts weight, e.g. Twin-Merging's softmax) run as
        two matmuls over the stacked factors; sparse ones (one-hot batches) expert by expert,
        each on its own rows."""
        lead = x.shape[:-1]
        xf = x.reshape(-1, x.shape[-1])
        wf = w.reshape(-1, self.num_experts).to(x.dtype) * self.scaling
        nonzero = wf.ne(0)
        if self.num_experts > 1 and nonzero.float().mean() >= DENSE_FRACTION:
            h = (xf @ self.lora_A.reshape(-1, xf.shape[-1]).T).view(xf.shape[0], self.num_experts, -1) * wf[:, :, None]
            return (h.view(xf.shape[0], -1) @ self.lora_B_cat.T).reshape(*lead, -1)
        out = torch.zeros(xf.shape[0], self.lora_B.shape[1], dtype=x.dtype, device=x.device)
        active = torch.nonzero(nonzero.any(0)).flatten().tolist()
        for e in active:
            r = self.ranks[e]
            A, B = self.lora_A[e, :r], self.lora_B[e, :, :r]
            col = wf[:, e]
            rows = torch.nonzero(col).flatten()
            if rows.numel() == xf.shape[0]:
                out.add_((xf @ A.T) @ B.T * col[:, None])
            else:
                xs = xf.index_select(0, rows)
                out.index_add_(0, rows, (xs @ A.T) @ B.T * col.index_select(0, rows)[:, None])
        return out.reshape(*lead, -1)

    def topk_mixture(self, x: torch.Tensor, w: TopK) -> torch.Tensor:
        """Σ_j w_j · s_{e_j} · B_{e_j} A_{e_j} x for sparse weights aligned with ``x``'s rows."""
        lead = x.shape[:-1]
        if w.index.shape[:-1] != lead or w.weight.shape != w.index.shape:
            raise ValueError(
                f"top-k routing of shape {tuple(w.index.shape)} does not fit input {tuple(x.shape)} at module {self.module_name!r}"
            )
        E, k = self.num_experts, w.index.shape[-1]
        n = lead.numel()
        if n > CONCAT_ROWS and E > CONCAT_EXPERTS_PER_K * k:
            return self.mixture(x, w.dense(E).to(x.dtype))
        xf = x.reshape(n, -1)
        coef = torch.zeros(n, E, dtype=x.dtype, device=x.device)
        coef.scatter_add_(1, w.index.reshape(n, k), w.weight.reshape(n, k).to(x.dtype))
        coef = coef * self.scaling
        h = (xf @ self.lora_A.reshape(-1, xf.shape[-1]).T).view(n, E, -1) * coef[:, :, None]
        return (h.view(n, -1) @ self.lora_B_cat.T).reshape(*lead, -1)
