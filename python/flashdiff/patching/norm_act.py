"""GroupNorm replacement in a module tree: ResnetBlock2D class swaps, fused
`h = self.norm(h); h = self.act(h)` pairs found in a parent's source, then every other
torch.nn.GroupNorm on its own."""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from typing import Dict, List, Optional, Tuple

import torch.nn as nn

from .group_norm import FlashGroupNorm, _activation_name, _has_hooks
from .report import PatchReport, _State
from .resnet import _fused_resnet_class, _resnet_fusion_reason


# ------------------------------------------------------------------ generic norm -> act pairs
def _self_attr(node) -> Optional[str]:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


def _assign_call(stmt) -> Optional[Tuple[str, str]]:
    """(var, attr) for a statement `var = self.attr(var)`, else None."""
    if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
            and isinstance(stmt.value, ast.Call) and len(stmt.value.args) == 1 and not stmt.value.keywords
            and isinstance(stmt.value.args[0], ast.Name) and stmt.value.args[0].id == stmt.targets[0].id):
        attr = _self_attr(stmt.value.func)
        if attr is not None:
            return stmt.targets[0].id, attr
    return None


@functools.lru_cache(maxsize=None)
def _norm_act_pairs(cls) -> Tuple[Tuple[str, str], ...]:
    """(norm_attr, act_attr) pairs where cls.forward does `h = self.norm(h)` then, as the very
    next statement, `h = self.act(h)`, and `self.act` is read nowhere else in the class
    (all its non-torch bases included). Empty when the source is unavailable."""
    try:
        sources = [textwrap.dedent(inspect.getsource(c)) for c in cls.__mro__
                   if c.__module__.split(".")[0] not in ("torch", "builtins")]
        fwd = textwrap.dedent(inspect.getsource(cls.forward))
    except (OSError, TypeError):
        return ()
    uses: Dict[str, int] = {}
    for src in sources:
        for node in ast.walk(ast.parse(src)):
            attr = _self_attr(node)
            if attr is not None and isinstance(node.ctx, ast.Load):  # reads; __init__'s stores do not count
                uses[attr] = uses.get(attr, 0) + 1
    pairs = []
    for node in ast.walk(ast.parse(fwd)):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for a, b in zip(body, body[1:]):
            first, second = _assign_call(a), _assign_call(b)
            if first and second and first[0] == second[0] and uses.get(second[1]) == 1:
                pairs.append((first[1], second[1]))
    return tuple(pairs)


# ------------------------------------------------------------------ replacement
def _occurrences(root: nn.Module) -> Dict[int, List[Tuple[nn.Module, str, str]]]:
    """id(module) -> every (parent, attribute name, dotted path) registering it under root."""
    out: Dict[int, List[Tuple[nn.Module, str, str]]] = {}
    for path, parent in root.named_modules(remove_duplicate=False):
        for name, child in parent._modules.items():
            if child is not None:
                out.setdefault(id(child), []).append((parent, name, f"{path}.{name}" if path else name))
    return out


def _swap(state: _State, root_occ, old: nn.Module, new: nn.Module) -> None:
    for parent, name, _ in root_occ[id(old)]:
        state.modules.append((parent, name, old))
        setattr(parent, name, new)


def _patch_group_norms(root: nn.Module, prefix: str, backend, state: _State, report: PatchReport) -> None:
    occ = _occurrences(root)
    modules = list(root.named_modules())
    done = set()  # ids of GroupNorms a fused pass already took over

    # 1. diffusers ResnetBlock2D: class swap to the fused forward.
    resnet_cls = None
    try:
        from diffusers.models.resnet import ResnetBlock2D as resnet_cls
    except ImportError:
        pass
    for path, m in modules:
        if resnet_cls is None or type(m) is not resnet_cls:
            continue
        why = _resnet_fusion_reason(m)
        where = prefix + path
        if why is not None:
            report.left_alone.append(("group_norm+act", where, why))
            continue
        fused_cls = _fused_resnet_class()[0]
        act = _activation_name(m.nonlinearity)
        state.classes.append((m, type(m)))
        m.__dict__["_flashdiff_act"], m.__dict__["_flashdiff_backend"] = act, backend
        m.__class__ = fused_cls
        done.update((id(m.norm1), id(m.norm2)))
        report.replaced.append((f"group_norm+{act}", where, f"ResnetBlock2D norm1+{act}, norm2+{act} fused"))

    # 2. `h = self.norm(h); h = self.act(h)` pairs in a parent's forward.
    for path, parent in modules:
        if not any(type(c) is nn.GroupNorm for c in parent._modules.values()):
            continue
        for norm_name, act_name in _norm_act_pairs(type(parent)):
            norm, act_mod = parent._modules.get(norm_name), parent._modules.get(act_name)
            act = _activation_name(act_mod) if act_mod is not None else None
            if type(norm) is not nn.GroupNorm or act is None or id(norm) in done:
                continue
            where = prefix + (f"{path}.{norm_name}" if path else norm_name)
            if len(occ[id(norm)]) > 1 or len(occ[id(act_mod)]) > 1 or _has_hooks(norm) or _has_hooks(act_mod):
                report.left_alone.append(("group_norm+act", where, f"{norm_name} or {act_name} is shared or hooked"))
                continue
            _swap(state, occ, norm, FlashGroupNorm.from_group_norm(norm, act, backend))
            _swap(state, occ, act_mod, nn.Identity())
            done.add(id(norm))
            report.replaced.append((f"group_norm+{act}", where,
                                    f"GroupNorm + {act_name} ({type(act_mod).__name__}) fused"))

    # 3. every other GroupNorm.
    for path, m in modules:
        if isinstance(m, nn.GroupNorm) and id(m) not in done:
            where = prefix + path
            done.add(id(m))
            if type(m) is not nn.GroupNorm:
                why = "already flashdiff" if isinstance(m, FlashGroupNorm) else f"subclass {type(m).__name__}"
                report.left_alone.append(("group_norm", where, why))
            elif _has_hooks(m):
                report.left_alone.append(("group_norm", where, "has forward hooks"))
            else:
                _swap(state, occ, m, FlashGroupNorm.from_group_norm(m, None, backend))
                report.replaced.append(("group_norm", where, f"GroupNorm({m.num_groups}, {m.num_channels})"))
