"""What a composed model did with one prompt: per layer, module and token, the experts chosen
and their weights; a text summary, JSON, and a heatmap (tokens × layers, coloured by expert);
and routing diagnostics (:meth:`Explanation.diagnostics`): the top-1 expert per token type
(BOS apart), per layer and by vote, and with an expected expert, how often the router chose it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moerge.plotting import pyplot, save_figure

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")


def layer_index(module: str) -> int:
    """The transformer block a module belongs to (``model.layers.3.self_attn.q_proj`` → 3); −1 if none."""
    m = _LAYER.search(module)
    return int(m.group(1)) if m else -1


@dataclass
class Explanation:
    prompt: str
    output: str
    #: the tokens at which routing happened: the prompt's, then every generated token fed back
    tokens: list[str]
    experts: list[str]
    granularity: str
    #: module → dense weights [tokens, experts] (zeros for experts not chosen)
    weights: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)
    #: each routed token's type (:func:`token_kinds`); empty: unknown
    kinds: list[str] = field(default_factory=list)

    @property
    def modules(self) -> list[str]:
        return list(self.weights)

    @property
    def layers(self) -> list[int]:
        return sorted({layer_index(m) for m in self.weights})

    def per_layer(self) -> torch.Tensor:
        """Mean weight over each layer's modules → [layers, tokens, experts]."""
        out = []
        for layer in self.layers:
            mats = [w for m, w in self.weights.items() if layer_index(m) == layer]
            out.append(torch.stack(mats).mean(0))
        return torch.stack(out)

    def top_expert(self) -> torch.Tensor:
        """The expert with the most weight per layer and token → [layers, tokens]."""
        return self.per_layer().argmax(-1)

    def expert_share(self) -> dict[str, float]:
        """Share of all routing weight each expert received (over modules and tokens)."""
        total = torch.stack(list(self.weights.values())).sum((0, 1))
        total = total / total.sum().clamp_min(1e-12)
        return {e: float(total[i]) for i, e in enumerate(self.experts)}

    def chosen(self, module: str, token: int) -> list[tuple[str, float]]:
        """(expert, weight) pairs chosen at one module and token, heaviest first."""
        w = self.weights[module][token]
        nz = torch.nonzero(w).flatten().tolist()
        return sorted(((self.experts[i], float(w[i])) for i in nz), key=lambda t: -t[1])

    def diagnostics(self, expected: str | None = None) -> dict[str, Any]:
        """Where the router sent each kind of token: the top-1 expert of every module at every
        token, pooled per token type (BOS, the same for every prompt, is its own type), per
        layer on the prompt's content tokens (``input`` in the zoo's format, else ``prompt``),
        and the vote (the expert chosen most over those tokens × modules). With ``expected``
        (an expert's name) each entry also has ``accuracy``: the share of choices that were it."""
        if expected is not None and expected not in self.experts:
            raise ValueError(f"expected expert {expected!r} is not among the composition's experts {self.experts}")
        if not self.weights or not self.tokens:
            raise ValueError("nothing was routed: no diagnostics")
        top = torch.stack([w.argmax(-1) for w in self.weights.values()])  # [modules, T]
        kinds = self.kinds or ["token"] * top.shape[1]
        n = min(top.shape[1], len(kinds))
        top, kinds = top[:, :n], kinds[:n]
        want = None if expected is None else self.experts.index(expected)

        def pooled(chosen: torch.Tensor) -> dict[str, Any]:
            """The most chosen expert among ``chosen`` (expert indices), its share, and the expected one's."""
            counts = torch.bincount(chosen.flatten(), minlength=len(self.experts)).float()
            best = int(counts.argmax())
            out: dict[str, Any] = {"top": self.experts[best], "share": float(counts[best] / counts.sum())}
            if want is not None:
                out["accuracy"] = float(counts[want] / counts.sum())
            return out

        by_type = {}
        for kind in dict.fromkeys(kinds):
            sel = torch.tensor([k == kind for k in kinds])
            by_type[kind] = {"tokens": int(sel.sum()), **pooled(top[:, sel])}
        content = "input" if "input" in by_type else "prompt" if "prompt" in by_type else kinds[0]
        sel = torch.tensor([k == content for k in kinds])
        by_layer = {}
        for layer in self.layers:
            rows = [i for i, m in enumerate(self.weights) if layer_index(m) == layer]
            by_layer[str(layer)] = pooled(top[rows][:, sel])
        return {"expected": expected, "content_tokens": content, "by_type": by_type, "by_layer": by_layer,
                "vote": by_type[content]["top"]}  # fmt: skip

    def summary(self, max_tokens: int = 40, expected: str | None = None) -> str:
        share = sorted(self.expert_share().items(), key=lambda t: -t[1])
        lines = [
            f"prompt: {self.prompt!r}",
            f"output: {self.output!r}",
            f"routing: {self.granularity}-level over {len(self.experts)} experts, {len(self.weights)} modules",
            "expert share of routing weight: " + ", ".join(f"{e} {100 * s:.0f}%" for e, s in share if s >= 0.005),
        ]
        if "alpha" in self.info:
            cos = self.info.get("cosine")
            lines.append(
                f"global (GLIDER) α={self.info['alpha']:g}; cosine: "
                + ", ".join(f"{e} {float(c):.2f}" for e, c in zip(self.experts, cos, strict=True))
            )
        if self.weights and self.tokens:
            d = self.diagnostics(expected)

            def part(name: str, e: dict[str, Any]) -> str:
                acc = f", {expected} {100 * e['accuracy']:.0f}%" if "accuracy" in e else ""
                return f"{name} → {e['top']} {100 * e['share']:.0f}%{acc}"

            lines.append("top-1 routing by token type: " + "; ".join(part(k, e) for k, e in d["by_type"].items()))
            lines.append(
                f"by layer ({d['content_tokens']} tokens): " + "; ".join(part(f"layer {k}", e) for k, e in d["by_layer"].items())
            )
            lines.append(f"vote over {d['content_tokens']} tokens: {d['vote']}" + (
                "" if expected is None else f" ({'right' if d['vote'] == expected else 'wrong'}: expected {expected})"))  # fmt: skip
        top = self.top_expert()
        width = max(len(t) for t in self.tokens[:max_tokens]) if self.tokens else 5
        lines.append("top expert per token (columns: layers " + " ".join(str(layer) for layer in self.layers) + "):")
        for t, tok in enumerate(self.tokens[:max_tokens]):
            lines.append(f"  {tok:>{width}}  " + "  ".join(self.experts[int(top[li, t])] for li in range(len(self.layers))))
        if len(self.tokens) > max_tokens:
            lines.append(f"  … {len(self.tokens) - max_tokens} more tokens")
        return "\n".join(lines)

    def to_json(self, expected: str | None = None) -> dict[str, Any]:
        return {
            "kinds": self.kinds,
            "diagnostics": self.diagnostics(expected) if self.weights and self.tokens else None,
            "prompt": self.prompt,
            "output": self.output,
            "tokens": self.tokens,
            "experts": self.experts,
            "granularity": self.granularity,
            "modules": {m: [self.chosen(m, t) for t in range(len(self.tokens))] for m in self.weights},
            "expert_share": self.expert_share(),
        }

    def plot(self, path: str | Path) -> Path:
        """Heatmap: tokens (rows) × layers (columns), each cell coloured by its top expert,
        shaded by that expert's weight."""
        plt = pyplot()
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch

        per_layer = self.per_layer()  # [L, T, E]
        top = per_layer.argmax(-1).T.numpy()  # [T, L]
        strength = per_layer.max(-1).values.T.numpy()
        cmap = plt.get_cmap("tab20" if len(self.experts) > 10 else "tab10")
        colours = [cmap(i % cmap.N) for i in range(len(self.experts))]
        fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(self.layers), 1.2 + 0.28 * len(self.tokens)))
        ax.imshow(top, cmap=ListedColormap(colours), vmin=-0.5, vmax=len(self.experts) - 0.5, aspect="auto")
        for t in range(top.shape[0]):
            for li in range(top.shape[1]):
                ax.text(li, t, f"{strength[t, li]:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(self.layers)), [f"layer {layer}" for layer in self.layers])
        ax.set_yticks(range(len(self.tokens)), self.tokens, fontsize=7)
        used = sorted(set(top.flatten().tolist()))
        ax.legend(
            handles=[Patch(color=colours[i], label=self.experts[i]) for i in used],
            bbox_to_anchor=(1.02, 1),
            loc="upper left",
            fontsize=7,
        )
        ax.set_title("top expert per token and layer\n(mean over the layer's modules; text: its weight)", fontsize=8)
        return save_figure(fig, path)


def dense_from_calls(
    calls: Sequence[tuple[str, torch.Tensor, torch.Tensor]], num_experts: int, row: int = 0
) -> dict[str, torch.Tensor]:
    """Concatenate one row's recorded top-k decisions per module along tokens → dense [T, E]."""
    per: dict[str, list[torch.Tensor]] = {}
    for module, idx, w in calls:
        i, v = idx[row].cpu(), w[row].float().cpu()
        if i.dim() == 1:  # a call without a token axis
            i, v = i[None], v[None]
        dense = torch.zeros(i.shape[0], num_experts).scatter_add_(-1, i, v)
        per.setdefault(module, []).append(dense)
    return {m: torch.cat(parts) for m, parts in per.items()}


TYPES = ("bos", "instruction", "separator", "input", "arrow", "answer")


def token_types(prompt: str, target: str, sep: str = ":", arrow: str = "=>") -> list[str]:
    """Labels of BOS + the words of ``prompt target``: instruction words up to ``sep``, the
    items up to ``arrow``, then the answer."""
    words = prompt.split()
    if sep not in words or arrow not in words:
        raise ValueError(f"prompt {prompt!r} is not '<instruction> {sep} <items> {arrow}'")
    i, j = words.index(sep), len(words) - 1 - words[::-1].index(arrow)
    return ["bos", *["instruction"] * i, "separator", *["input"] * (j - i - 1), "arrow", *["answer"] * len(target.split())]


def token_kinds(prompt: str, prompt_tokens: int, total: int, bos: bool, sep: str = ":", arrow: str = "=>") -> list[str]:
    """The type of each of ``total`` routed tokens: the prompt's ``prompt_tokens`` (BOS first
    when ``bos``), then generated ones (``answer``). Prompt tokens get the zoo's
    ``<instruction> : <items> =>`` types (:func:`token_types`) when the
    prompt has that form and one token per word, else ``bos`` / ``prompt``."""
    words = prompt.split()
    if sep in words and arrow in words and prompt_tokens == len(words) + bos:
        head = token_types(prompt, "")[: len(words) + 1]
        head = head if bos else head[1:]
    else:
        head = ["bos"] * bos + ["prompt"] * (prompt_tokens - bos)
    return head + ["answer"] * max(0, total - prompt_tokens)
