"""LayerNorm / RMSNorm in a module tree -> flashdiff.layer_norm / flashdiff.rms_norm.

Two kinds of change, both undone by `unpatch`:

- modulated: a diffusers module whose `forward` writes adaLN as
      V = self.N(X) * (1 + S) + T                     (AdaLayerNormZero, ...Single, ...Continuous,
                                                       DiT's output layer)
  or  V = self.N(X)
      V = V * (1 + S) + T                             (Flux/SD3 blocks' norm2, PixArt's blocks and
                                                       output layer: AdaLayerNormSingle's modulation)
  gets a subclass whose forward is diffusers' own code with only that statement (pair) turned
  into one call, `_modulated_norm(self, self.N, X, S, T)`: the rewrite is done on the syntax tree
  of the installed source, so the embedding projection, the chunking, the gates and every other
  line stay diffusers'. At run time the call is one flashdiff.layer_norm (scale/shift [N, 1, D]
  passed as the [N, D] views they are) when self.N is a LayerNorm over the last dim and the
  tensors fit; otherwise it evaluates diffusers' expression `self.N(X) * (1 + S) + T` itself.
- plain: `torch.nn.LayerNorm` and diffusers' `FP32LayerNorm` over the last dim, diffusers'
  `RMSNorm` (no bias) and `torch.nn.RMSNorm` (eps set) become Flash* subclasses of their class
  holding the same Parameters (state_dict keys and values unchanged). Per call, inputs outside
  the op's contract (another dtype than the weight's, float64, ...) run the original forward.
"""
from __future__ import annotations

import ast
import functools
import inspect
import sys
import textwrap
import types
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .. import _validate as check
from ..ops.layer_norm import layer_norm as _fd_layer_norm
from ..ops.rms_norm import rms_norm as _fd_rms_norm
from .group_norm import _has_hooks
from .norm_act import _occurrences, _swap
from .report import PatchReport, _State

_HELPER = "__flashdiff_modulated_norm"


# ------------------------------------------------------------------ the norm classes flashdiff takes
def _diffusers_norm(name: str):
    try:
        from diffusers.models import normalization
    except ImportError:
        return None
    return getattr(normalization, name, None)


def _layer_norm_classes() -> tuple:
    """Exact classes computed by flashdiff.layer_norm: torch's LayerNorm (diffusers' LayerNorm
    is the same class on torch >= 2.1) and diffusers' FP32LayerNorm."""
    fp32 = _diffusers_norm("FP32LayerNorm")
    return (nn.LayerNorm,) + ((fp32,) if fp32 is not None else ())


_TORCH_RMS = getattr(nn, "RMSNorm", None)  # torch >= 2.4


def _rms_norm_classes() -> tuple:
    rms = _diffusers_norm("RMSNorm")
    return tuple(c for c in (rms, _TORCH_RMS) if c is not None)


def _rms_dims(norm) -> tuple:
    """The normalized shape: torch's RMSNorm says normalized_shape, diffusers' says dim."""
    return tuple(norm.normalized_shape) if _TORCH_RMS is not None and isinstance(norm, _TORCH_RMS) else tuple(norm.dim)


def _is_fp32_layer_norm(norm) -> bool:
    cls = _diffusers_norm("FP32LayerNorm")
    return cls is not None and isinstance(norm, cls)


def _layer_norm_reason(norm) -> Optional[str]:
    """None when `norm` (one of _layer_norm_classes) normalizes what flashdiff.layer_norm does."""
    if len(norm.normalized_shape) != 1:
        return f"normalizes the last {len(norm.normalized_shape)} dims; flashdiff.layer_norm takes the last one"
    return None


def _rms_norm_reason(norm) -> Optional[str]:
    if norm.eps is None:
        return "eps=None (torch's dtype-dependent default); set eps to route it"
    if getattr(norm, "bias", None) is not None:
        return "has a bias, which flashdiff.rms_norm does not add"
    if len(_rms_dims(norm)) != 1:
        return f"normalizes the last {len(_rms_dims(norm))} dims; flashdiff.rms_norm takes the last one"
    return None


def _describe(m) -> str:
    dims = tuple(m.normalized_shape) if isinstance(m, nn.LayerNorm) else _rms_dims(m)
    affine = "affine" if getattr(m, "weight", None) is not None else "no affine"
    return f"{type(m).__name__}({dims[0] if len(dims) == 1 else list(dims)}, {affine}, eps={m.eps})"


# ------------------------------------------------------------------ per-call routing
def _fits(x, params, any_param_dtype: bool = False) -> bool:
    """x in a kernel dtype with parameters of its dtype: the output dtype torch's module gives
    is then x's, as the op's is (FP32LayerNorm casts its parameters itself)."""
    return (isinstance(x, torch.Tensor) and x.dtype in check.KERNEL_DTYPES and x.dim() >= 1
            and (any_param_dtype or all(p is None or p.dtype == x.dtype for p in params)))


def _op_call(op, backend, *args, **kwargs):
    """op(*args, backend=...); an explicit backend that cannot serve the inputs falls back to auto."""
    if backend is not None:
        try:
            return op(*args, backend=backend, **kwargs)
        except NotImplementedError:
            pass
    return op(*args, **kwargs)


def _per_sample(m, x) -> Optional[torch.Tensor]:
    """A modulation tensor as diffusers broadcasts it against x [N, T, D] ([N, 1, D]: one row per
    sample; [N, T, D]: per token), in the op's layout: [N, D] (a view) or x's shape; None when it
    has another shape."""
    if not isinstance(m, torch.Tensor) or m.dim() != 3 or m.dtype != x.dtype or m.device != x.device:
        return None
    N, T, D = x.shape
    if m.shape == (N, 1, D):
        return m[:, 0]
    if m.shape == (N, T, D):
        return m
    return None


def _modulated_norm(owner, norm, x, scale, shift):
    """`norm(x) * (1 + scale) + shift` as one flashdiff.layer_norm where it can be, else exactly
    diffusers' expression. `owner`: the patched module (it carries patch()'s backend)."""
    if (type(norm) in _layer_norm_classes() and isinstance(x, torch.Tensor) and x.dim() == 3
            and _layer_norm_reason(norm) is None and norm.normalized_shape[0] == x.shape[-1]
            and _fits(x, (norm.weight, norm.bias), _is_fp32_layer_norm(norm))):
        s, t = _per_sample(scale, x), _per_sample(shift, x)
        if s is not None and t is not None and s.shape == t.shape:
            return _op_call(_fd_layer_norm, owner._flashdiff_backend, x, norm.normalized_shape, norm.weight,
                            norm.bias, norm.eps, scale=s, shift=t)
    return norm(x) * (1 + scale) + shift


class _FlashNorm:
    """Mixin of the Flash* norm classes: `_flashdiff_route(x)` gives the op's output or None
    (then the original class's forward runs, unchanged)."""

    _flashdiff_backend: Optional[str] = None

    def forward(self, x):
        y = self._flashdiff_route(x)
        return self._flashdiff_original.forward(self, x) if y is None else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", flashdiff backend={self._flashdiff_backend or 'auto'}"


class _LayerNormRoute(_FlashNorm):
    def _flashdiff_route(self, x):
        if _fits(x, (self.weight, self.bias), _is_fp32_layer_norm(self)) and x.shape[-1] == self.normalized_shape[0]:
            return _op_call(_fd_layer_norm, self._flashdiff_backend, x, self.normalized_shape, self.weight,
                            self.bias, self.eps)
        return None


class _RMSNormRoute(_FlashNorm):
    def _flashdiff_route(self, x):
        if _fits(x, (self.weight,)) and x.shape[-1] == _rms_dims(self)[0]:
            return _op_call(_fd_rms_norm, self._flashdiff_backend, x, self.weight, self.eps)
        return None


@functools.lru_cache(maxsize=None)
def _flash_class(cls, route):
    """Flash<cls>: a subclass of the original norm class (isinstance checks still hold)."""
    return type(f"Flash{cls.__name__}", (route, cls), {
        "__module__": __name__, "_flashdiff_original": cls,
        "__doc__": f"{cls.__name__} computed by flashdiff ({route.__name__[1:-5]}); built by flashdiff.patch."})


def _flash_norm(old: nn.Module, route, backend) -> nn.Module:
    """A Flash* copy of `old` holding the same Parameter and buffer objects."""
    new = object.__new__(_flash_class(type(old), route))
    nn.Module.__init__(new)
    new.__dict__.update({k: v for k, v in old.__dict__.items() if not k.startswith("_")})
    new._parameters.update(old._parameters)
    new._buffers.update(old._buffers)
    new._flashdiff_backend = backend
    return new


# ------------------------------------------------------------------ rewriting the modulation in a forward
def _self_attr(node) -> Optional[str]:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


def _norm_call(node) -> Optional[Tuple[str, ast.expr]]:
    """(attr, X) for `self.attr(X)`."""
    if isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords:
        attr = _self_attr(node.func)
        if attr is not None and not isinstance(node.args[0], ast.Starred):
            return attr, node.args[0]
    return None


def _modulation(node) -> Optional[Tuple[ast.expr, ast.expr, ast.expr]]:
    """(A, S, T) for `A * (1 + S) + T` or `A * (1 + S)[idx] + T` (then S := S[idx], the same values)."""
    if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add)
            and isinstance(node.left, ast.BinOp) and isinstance(node.left.op, ast.Mult)):
        return None
    a, m = node.left.left, node.left.right
    index = None
    if isinstance(m, ast.Subscript):
        m, index = m.value, m.slice
    if not (isinstance(m, ast.BinOp) and isinstance(m.op, ast.Add) and isinstance(m.left, ast.Constant)
            and m.left.value == 1 and not isinstance(m.left.value, bool)):
        return None
    s = m.right if index is None else ast.Subscript(value=m.right, slice=index, ctx=ast.Load())
    return a, s, node.right


def _single_name_target(stmt) -> Optional[str]:
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id
    return None


def _reads(name: str, *nodes) -> bool:
    """Whether the expressions read `name` other than as `name.device` (which a norm keeps: in the
    rewrite S and T see the norm's input under that name, not its output)."""
    device_reads = {id(n.value) for node in nodes for n in ast.walk(node)
                    if isinstance(n, ast.Attribute) and n.attr == "device"}
    return any(isinstance(n, ast.Name) and n.id == name and id(n) not in device_reads
               for node in nodes for n in ast.walk(node))


def _helper_call(var, attr, x, s, t, like) -> ast.Assign:
    call = ast.Call(func=ast.Name(_HELPER, ast.Load()),
                    args=[ast.Name("self", ast.Load()),
                          ast.Attribute(value=ast.Name("self", ast.Load()), attr=attr, ctx=ast.Load()), x, s, t],
                    keywords=[])
    return ast.copy_location(ast.Assign(targets=[ast.Name(var, ast.Store())], value=call), like)


class _Rewriter(ast.NodeTransformer):
    """Turns the adaLN statements of one function into helper calls, recording the norm attrs."""

    def __init__(self):
        self.attrs: List[str] = []

    def _block(self, body):
        out, i = [], 0
        while i < len(body):
            stmt, var = body[i], _single_name_target(body[i])
            one = _modulation(stmt.value) if var else None
            if one and _norm_call(one[0]):  # V = self.N(X) * (1 + S) + T
                attr, x = _norm_call(one[0])
                out.append(_helper_call(var, attr, x, one[1], one[2], stmt))
                self.attrs.append(attr)
                i += 1
                continue
            first = _norm_call(stmt.value) if var else None
            nxt = body[i + 1] if i + 1 < len(body) else None
            two = _modulation(nxt.value) if first and _single_name_target(nxt) == var else None
            if two and isinstance(two[0], ast.Name) and two[0].id == var and not _reads(var, two[1], two[2]):
                out.append(_helper_call(var, first[0], first[1], two[1], two[2], stmt))  # V = self.N(X); V = V*(1+S)+T
                self.attrs.append(first[0])
                i += 2
                continue
            out.append(self.visit(stmt))
            i += 1
        return out

    def generic_visit(self, node):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                setattr(node, field, self._block(block))
        for handler in getattr(node, "handlers", []):
            handler.body = self._block(handler.body)
        return node


@functools.lru_cache(maxsize=None)
def _modulated_class(cls) -> Tuple[Optional[type], Tuple[str, ...], str]:
    """(subclass with the rewritten forward, norm attrs it fuses, "") or (None, (), why)."""
    fn = getattr(cls, "forward", None)
    if not isinstance(fn, types.FunctionType):
        return None, (), "forward is not a Python function"
    try:
        lines, start = inspect.getsourcelines(fn)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError) as err:
        return None, (), f"forward's source is unavailable ({err})"
    func = tree.body[0]
    rewriter = _Rewriter()
    rewriter.generic_visit(func)
    attrs = tuple(dict.fromkeys(rewriter.attrs))
    if not attrs:
        return None, (), "no `norm(x) * (1 + scale) + shift` in its forward"
    if func.decorator_list or fn.__code__.co_freevars:
        return None, attrs, "its forward is decorated or a closure, so it is not rewritten"
    ast.increment_lineno(tree, start - 1)  # tracebacks point at diffusers' lines
    ast.fix_missing_locations(tree)
    module_name = f"{__name__}._rewritten__{cls.__module__.replace('.', '_')}__{cls.__qualname__}"
    mod = types.ModuleType(module_name)  # torch.compile finds globals through sys.modules
    mod.__dict__.update({k: v for k, v in fn.__globals__.items()
                         if k not in ("__name__", "__spec__", "__loader__", "__file__", "__cached__")})
    mod.__dict__[_HELPER] = _modulated_norm
    sys.modules[module_name] = mod
    exec(compile(tree, inspect.getsourcefile(fn) or "<flashdiff>", "exec"), mod.__dict__)
    new_fn = mod.__dict__[fn.__name__]
    new_fn.__qualname__, new_fn.__doc__ = fn.__qualname__, fn.__doc__
    sub = type(f"Flashdiff{cls.__name__}", (cls,), {
        "forward": new_fn, "__module__": __name__, "_flashdiff_backend": None, "_flashdiff_original_class": cls,
        "__doc__": f"diffusers' {cls.__name__} with `norm(x) * (1 + scale) + shift` as one flashdiff.layer_norm."})
    return sub, attrs, ""


# ------------------------------------------------------------------ the walker
def _patch_norms(root: nn.Module, prefix: str, backend, state: _State, report: PatchReport) -> None:
    occ = _occurrences(root)
    modules = list(root.named_modules())
    ln_classes, rms_classes = _layer_norm_classes(), _rms_norm_classes()
    done = set()  # ids of norms a modulated rewrite computes

    # 1. adaLN modulation: diffusers modules whose forward normalizes and modulates in one statement (pair).
    for path, m in modules:
        cls = type(m)
        if not cls.__module__.startswith("diffusers.") or "forward" in m.__dict__:
            continue
        sub, attrs, why = _modulated_class(cls)
        fused, skipped = [], []
        for attr in attrs:  # the norms this instance has where its forward modulates
            norm = m._modules.get(attr)
            if type(norm) in ln_classes:
                reason = why or _layer_norm_reason(norm) or ("has forward hooks" if _has_hooks(norm) else None)
            elif type(norm) in rms_classes:
                reason = "no fused RMSNorm + modulation op; the norm alone goes to flashdiff.rms_norm"
            else:
                continue  # a branch this instance does not take (another norm_type)
            if reason is None:
                fused.append(attr)
            else:
                skipped.append(f"{attr} ({type(norm).__name__}): {reason}")
        where = prefix + path
        if skipped:
            report.left_alone.append(("layer_norm+mod", where, f"{cls.__name__}: " + "; ".join(skipped)))
        if not fused:
            continue
        state.classes.append((m, cls))
        m.__dict__["_flashdiff_backend"] = backend
        m.__class__ = sub
        done.update(id(m._modules[a]) for a in fused)
        report.replaced.append(("layer_norm+mod", where, f"{cls.__name__}: " + ", ".join(
            f"{a} + scale/shift" for a in fused) + " -> one flashdiff.layer_norm each (diffusers' forward, "
            "modulation statement rewritten)"))

    # 2. every other LayerNorm / RMSNorm, on its own.
    for path, m in modules:
        if id(m) in done or not isinstance(m, (nn.LayerNorm,) + rms_classes):
            continue
        done.add(id(m))
        where, cls = prefix + path, type(m)
        kind = "rms_norm" if cls in rms_classes else "layer_norm"
        if isinstance(m, _FlashNorm):
            report.left_alone.append((kind, where, "already flashdiff"))
            continue
        if cls not in ln_classes + rms_classes:
            report.left_alone.append((kind, where, f"subclass {cls.__name__}"))
            continue
        why = _layer_norm_reason(m) if kind == "layer_norm" else _rms_norm_reason(m)
        if why is None and _has_hooks(m):
            why = "has forward hooks"
        if why is not None:
            report.left_alone.append((kind, where, f"{cls.__name__}: {why}"))
            continue
        _swap(state, occ, m, _flash_norm(m, _LayerNormRoute if kind == "layer_norm" else _RMSNormRoute, backend))
        report.replaced.append((kind, where, f"{_describe(m)} -> flashdiff.{kind}"))
