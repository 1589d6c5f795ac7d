"""The two records one `patch` call keeps: the PatchReport it returns, and the _State that
lets `unpatch` undo it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn


@dataclass
class PatchReport:
    """What `patch` replaced and what it left alone, each with the module path and a reason."""
    target: str
    replaced: List[Tuple[str, str, str]] = field(default_factory=list)    # (kind, where, what)
    left_alone: List[Tuple[str, str, str]] = field(default_factory=list)  # (kind, where, why)
    # cuda_graph=True: calls that ran eagerly, once per input signature; filled in as the model runs
    graph_fallbacks: List[Tuple[str, str, str]] = field(default_factory=list)  # (where, signature, why)

    def counts(self) -> Dict[str, int]:
        """{kind: number replaced}, e.g. {"group_norm": 12, "group_norm+silu": 9, "attention": 4}."""
        out: Dict[str, int] = {}
        for kind, _, _ in self.replaced:
            out[kind] = out.get(kind, 0) + 1
        return out

    def __str__(self) -> str:
        summary = ", ".join(f"{n} {k}" for k, n in self.counts().items()) or "nothing"
        lines = [f"flashdiff.patch({self.target}): replaced {summary}; left alone {len(self.left_alone)}"]
        if self.replaced:
            lines.append("replaced:")
            lines += [f"  {kind:<16} {where or '<root>'}: {what}" for kind, where, what in self.replaced]
        if self.left_alone:
            lines.append("left alone:")
            lines += [f"  {kind:<16} {where or '<root>'}: {why}" for kind, where, why in self.left_alone]
        if self.graph_fallbacks:
            lines.append("cuda graph fallbacks:")
            lines += [f"  {where or '<root>'} {sig}: {why}" for where, sig, why in self.graph_fallbacks]
        return "\n".join(lines)


@dataclass
class _State:
    """Everything needed to undo one patch() call, in the order it was done."""
    modules: List[Tuple[nn.Module, str, nn.Module]] = field(default_factory=list)  # (parent, name, original)
    classes: List[Tuple[nn.Module, type]] = field(default_factory=list)            # (module, original class)
    processors: List[Tuple[nn.Module, Any]] = field(default_factory=list)          # (attn module, original)
    scheduler: Optional[Tuple[Any, str, Any]] = None                               # (pipe, attr, original)
    graphs: List[Any] = field(default_factory=list)  # cuda_graph.GraphedForward; each undoes itself
    report: Optional[PatchReport] = None
