"""The multi-expert linear layer: one base linear plus E experts' stacked low-rank factors.

    y = W x + Σ_e w_e · s_e · B_e A_e x

Weights come per sequence ([B, E]; one-hot rows make a mixed-expert batch), per token
([B, T, E]), as an :class:`Assignment` (serving's per-row experts), as :class:`TopK` (what
token routers return) or from a callable that computes them from the layer's input.

Every forward path is free of host↔device synchronisation: which kernel runs is decided from
shapes, dtypes and the device type only (Python values fixed for a whole ``generate``), never
from the values of a tensor, so a GPU never waits for the host inside a module and the forward
can be captured by ``torch.compile`` / CUDA graphs. ``tests/test_device.py`` proves it on the
``meta`` device, which raises on any data-dependent call. The paths (see :func:`topk_path`):

* ``stacked`` — two matmuls over every expert's factors side by side (x·[A_1;…;A_E]ᵀ, masked to
  each row's weights, then ·[B_1 … B_E]ᵀ): dense weights, and top-k over few experts;
* ``gathered`` — per (row, expert) pair, gather that expert's factors and run two batched
  matmuls (the BGMV shape of Punica/S-LoRA): mixed batches and decode steps, cost ∝ k;
* ``grouped`` — sort the (token, expert) pairs by expert and run a segment matmul
  (``torch._grouped_mm``): long prefills over many experts, cost ∝ k, not E.

Routing tensors may live on the CPU or the device and in any float dtype; they are moved once
(``set_weights`` moves them to the model's device; an :class:`Assignment` keeps one copy per
device) and cast to the activations' dtype, so a bf16 model adds its LoRA term in bf16 like PEFT.
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

    def to(self, device: torch.device) -> TopK:
        return TopK(self.index.to(device, non_blocking=True), self.weight.to(device, non_blocking=True))


class Assignment:
    """Per-sequence expert assignment for a mixed-expert batch (serving): row b uses experts
    ``index[b, j]`` with weight ``weight[b, j]``; index −1 pads (no expert: the base model alone).

    The layer evaluates it as a per-row gather of the assigned factors and two batched matmuls
    (the BGMV shape of S-LoRA/Punica), so the cost does not grow with the number of distinct
    experts in the batch; a batch whose rows all use one expert runs as one plain LoRA matmul.
    The bookkeeping (clamped indices, the uniform case, the largest index) is computed once
    here on the host, and :meth:`to` keeps one copy per device, so no layer reads a value back."""

    def __init__(self, index: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        if index.dim() == 1:
            index = index[:, None]
        if index.dim() != 2:
            raise ValueError(f"an assignment's index must be [batch] or [batch, k], got shape {tuple(index.shape)}")
        weight = torch.ones(index.shape) if weight is None else torch.as_tensor(weight, dtype=torch.float32).cpu()
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
        self._copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

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

    @classmethod
    def from_dense(cls, weights: torch.Tensor) -> Assignment:
        """Per-sequence weights [B, E] as an assignment of each row's non-zero experts (read on
        the host once per batch, so the layers run the gathered path instead of all E experts)."""
        w = weights.detach().float().cpu()
        nonzero = w.ne(0)
        k = max(1, int(nonzero.sum(1).max())) if w.numel() else 1
        order = nonzero.float().topk(k, dim=1)  # the non-zero columns first
        index = torch.where(order.values > 0, order.indices, torch.full_like(order.indices, -1))
        return cls(index, w.gather(1, order.indices))

    def __len__(self) -> int:
        return self.index.shape[0]

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(clamped index, weight) on ``device``, copied there once per assignment."""
        if device == self.safe_index.device:
            return self.safe_index, self.weight
        if device not in self._copies:
            pin = device.type == "cuda"
            idx, w = (t.pin_memory() if pin else t for t in (self.safe_index, self.weight))
            self._copies[device] = (idx.to(device, non_blocking=True), w.to(device, non_blocking=True))
        return self._copies[device]

    def dense(self, num_experts: int) -> torch.Tensor:
        """The same weights as dense per-sequence weights [batch, E]."""
        if self.max_index >= num_experts:
            raise ValueError(f"assignment names expert {self.max_index} but there are {num_experts}")
        out = torch.zeros(len(self), num_experts)
        return out.scatter_add_(1, self.safe_index, self.weight)


#: a router hook: (layer, input x [..., d_in]) -> weights [..., E] or TopK
WeightFn = Callable[["MultiExpertLinear", torch.Tensor], "torch.Tensor | TopK"]

#: top-k over at most this many experts per kept expert always runs ``stacked`` (two matmuls
#: over all experts' factors) ...
STACKED_PER_K = 4
#: ... and prefills over at most this many experts too
STACKED_MAX_EXPERTS = 16
#: ... or over more experts but at most this many (row, expert) pairs runs ``gathered``
#: (decode steps, short prefills); longer inputs run ``grouped``. Measured with ``moerge bench routing``.
GATHER_PAIRS = 256
#: the gathered path's working set is cut into chunks of this many pairs when it stands in for
#: ``grouped`` (a device without a sync-free segment matmul), bounding its memory
GATHER_CHUNK = 4096


def grouped_mm_available(x: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs sync-free for these activations: on the CPU (no
    device to wait for), and on CUDA in bfloat16 on compute capability ≥ 9 (elsewhere CUDA
    falls back to a loop that reads the offsets on the host). The ``meta`` device stands in
    for CUDA in tests (its kernel has CUDA's dtype rules)."""
    key = (x.device, x.dtype)
    if key not in _GROUPED_OK:  # decided once per device and dtype (a dict read while compiled)
        ok = hasattr(torch, "_grouped_mm") and (
            x.device.type == "cpu"
            or (x.dtype == torch.bfloat16 and x.device.type == "meta")
            or (x.dtype == torch.bfloat16 and x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] >= 9)
        )
        _GROUPED_OK[key] = ok
    return _GROUPED_OK[key]


_GROUPED_OK: dict[tuple[torch.device, torch.dtype], bool] = {}


def topk_path(num_experts: int, rows: int, k: int) -> str:
    """Which kernel a top-k mixture over ``num_experts`` with ``rows`` × ``k`` pairs uses:
    stacked over few experts (≤ STACKED_PER_K·k), gathered for few pairs (decode steps),
    stacked up to STACKED_MAX_EXPERTS, grouped beyond. Shapes only: the same for every batch
    of this size, whatever the routing."""
    if num_experts <= STACKED_PER_K * k:
        return "stacked"
    if rows * k <= GATHER_PAIRS:
        return "gathered"
    if num_experts <= STACKED_MAX_EXPERTS:
        return "stacked"
    return "grouped"


def base_shape(base: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2 stores W as [d_in, d_out])."""
    if isinstance(base, nn.Linear):
        return base.out_features, base.in_features
    if type(base).__name__ == "Conv1D" and hasattr(base, "nf"):
        return base.weight.shape[1], base.weight.shape[0]
    raise TypeError(f"cannot wrap a {type(base).__name__}: only nn.Linear and transformers Conv1D layers are supported")


class MultiExpertLinear(nn.Module):
    """Wraps a base linear layer and holds E experts' factors stacked as ``lora_A`` [E, r_max, d_in]
    and ``lora_B`` [E, d_out, r_max] (zero-padded, so mixed ranks are exact) with ``scaling`` [E].
    The factors take the base weight's device and dtype (and follow ``model.to(...)``)."""

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
            A[e, : f.rank] = f.A.to(device=device, dtype=dtype)
            B[e, :, : f.rank] = f.B.to(device=device, dtype=dtype)
            scaling[e] = f.scaling
        self.register_buffer("lora_A", A, persistent=False)
        self.register_buffer("lora_B", B, persistent=False)
        self.register_buffer("scaling", scaling, persistent=False)
        # [d_out, E·r_max]: B_1 … B_E side by side, for the stacked path
        self.register_buffer("lora_B_cat", B.permute(1, 0, 2).reshape(d_out, -1).contiguous(), persistent=False)
        self.ranks = ranks
        #: routing state: None (base only), a weight tensor, an Assignment, TopK, or a WeightFn
        self.weights: torch.Tensor | Assignment | TopK | WeightFn | None = None

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
            # compiled: no branch on the assignment's Python values (they would specialise the graph)
            return y + self.assigned_mixture(x, w) if torch.compiler.is_compiling() or w.any else y
        if isinstance(w, TopK):
            return y + self.topk_mixture(x, w if w.index.device == x.device else w.to(x.device))
        return y + self.mixture(x, self._align(w if w.device == x.device else w.to(x.device), x))

    # ------------------------------------------------------------------------------ paths

    def assigned_mixture(self, x: torch.Tensor, a: Assignment) -> torch.Tensor:
        """Σ_j w_bj · s_e · B_e A_e x_b with e = index[b, j], for x [B, T, d_in] (or [B, d_in])."""
        safe, weight = a.on(x.device)
        rows = x.shape[0]
        if rows != len(a):
            if rows % len(a):
                raise ValueError(
                    f"an assignment for {len(a)} sequences does not fit input {tuple(x.shape)} at {self.module_name!r}"
                )
            rep = rows // len(a)  # generate() expands rows for beams / num_return_sequences
            safe, weight = (t.repeat_interleave(rep, dim=0) for t in (safe, weight))
        compiling = torch.compiler.is_compiling()  # set_weights checked the index range already
        if not compiling and a.max_index >= self.num_experts:
            raise ValueError(f"assignment names expert {a.max_index} but module {self.module_name!r} holds {self.num_experts}")
        x3 = x if x.dim() == 3 else x.unsqueeze(1)
        if not compiling and a.uniform is not None:
            e = a.uniform
            r = max(self.ranks[e], 1)
            coef = (weight[:, 0] * self.scaling[e].float()).to(x.dtype)
            out = ((x3 @ self.lora_A[e, :r].T) * coef[:, None, None]) @ self.lora_B[e, :, :r].T
        else:
            out = None
            for j in range(safe.shape[1]):
                ix = safe[:, j]
                coef = (weight[:, j] * self.scaling.index_select(0, ix).float()).to(x.dtype)
                h = torch.bmm(x3, self.lora_A.index_select(0, ix).transpose(1, 2)) * coef[:, None, None]
                term = torch.bmm(h, self.lora_B.index_select(0, ix).transpose(1, 2))
                out = term if out is None else out + term
        return out if x.dim() == 3 else out.squeeze(1)

    def mixture(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Σ_e w_e · s_e · B_e A_e x for dense weights ``w`` [..., E] aligned with ``x`` [..., d_in]:
        two matmuls over the stacked factors (every expert computed, as dense weights ask)."""
        lead = x.shape[:-1]
        coef = (w.reshape(-1, self.num_experts).float() * self.scaling.float()).to(x.dtype)
        return self._stacked(x.reshape(-1, x.shape[-1]), coef).reshape(*lead, -1)

    def topk_mixture(self, x: torch.Tensor, w: TopK) -> torch.Tensor:
        """Σ_j w_j · s_{e_j} · B_{e_j} A_{e_j} x for sparse weights aligned with ``x``'s rows."""
        lead = x.shape[:-1]
        if w.index.shape[:-1] != lead or w.weight.shape != w.index.shape:
            raise ValueError(
                f"top-k routing of shape {tuple(w.index.shape)} does not fit input {tuple(x.shape)} at module {self.module_name!r}"
            )
        E, k, n = self.num_experts, w.index.shape[-1], lead.numel()
        xf = x.reshape(n, -1)
        index = w.index.reshape(n, k)
        path = topk_path(E, n, k)
        if path == "stacked":
            coef = torch.zeros(n, E, dtype=torch.float32, device=x.device)
            coef.scatter_add_(1, index, w.weight.reshape(n, k).float())
            out = self._stacked(xf, (coef * self.scaling.float()).to(x.dtype))
        else:
            flat = index.reshape(-1)
            coef = (w.weight.reshape(-1).float() * self.scaling.index_select(0, flat).float()).to(x.dtype)
            if path == "grouped" and grouped_mm_available(x):
                out = self._grouped(xf, flat, coef, k)
            else:
                out = self._gathered(xf, flat, coef, k)
        return out.reshape(*lead, -1)

    def _stacked(self, xf: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """x·[A_1;…;A_E]ᵀ scaled per (row, expert) by ``coef`` [n, E], then ·[B_1 … B_E]ᵀ."""
        n, E = xf.shape[0], self.num_experts
        h = (xf @ self.lora_A.reshape(-1, xf.shape[-1]).T).view(n, E, -1) * coef[:, :, None]
        return h.view(n, -1) @ self.lora_B_cat.T

    def _gathered(self, xf: torch.Tensor, flat: torch.Tensor, coef: torch.Tensor, k: int) -> torch.Tensor:
        """Per (row, expert) pair p: gather A_{e_p}, B_{e_p}; two batched matrix-vector products;
        the k pairs of a row summed. Chunked so the gathered factors stay bounded."""
        n, d_in = xf.shape
        xs = xf[:, None, :].expand(n, k, d_in).reshape(n * k, 1, d_in)
        parts = []
        for s in range(0, n * k, GATHER_CHUNK):
            ix, c = flat[s : s + GATHER_CHUNK], coef[s : s + GATHER_CHUNK]
            h = torch.bmm(xs[s : s + GATHER_CHUNK], self.lora_A.index_select(0, ix).transpose(1, 2)) * c[:, None, None]
            parts.append(torch.bmm(h, self.lora_B.index_select(0, ix).transpose(1, 2)))
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
        return y.view(n, k, -1).sum(1)

    def _grouped(self, xf: torch.Tensor, flat: torch.Tensor, coef: torch.Tensor, k: int) -> torch.Tensor:
        """Pairs sorted by expert, one segment matmul per factor (``torch._grouped_mm`` with
        cumulative end offsets per expert), then put back in order and the k pairs of a row summed."""
        E = self.num_experts
        order = torch.argsort(flat, stable=True)
        ones = torch.ones_like(flat, dtype=torch.int32)
        offsets = torch.zeros(E, dtype=torch.int32, device=xf.device).scatter_add_(0, flat, ones).cumsum(0, dtype=torch.int32)
        xs = xf.index_select(0, order // k)
        h = torch._grouped_mm(xs, self.lora_A.transpose(1, 2), offs=offsets) * coef.index_select(0, order)[:, None]
        y = torch._grouped_mm(h, self.lora_B.transpose(1, 2), offs=offsets)
        return torch.empty_like(y).index_copy_(0, order, y).view(xf.shape[0], k, -1).sum(1)

    # ------------------------------------------------------------------------------ slots

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
            self.lora_A[e, :rank] = factors.A.to(device=self.lora_A.device, dtype=self.lora_A.dtype)
            self.lora_B[e, :, :rank] = factors.B.to(device=self.lora_B.device, dtype=self.lora_B.dtype)
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
