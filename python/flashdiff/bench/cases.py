"""The per-op cases: each times flashdiff's backends next to the strongest baselines of the op
(attention: SDPA per backend; group_norm, layer_norm, rms_norm: eager, torch.compile, a copy;
scheduler: eager, diffusers, torch.compile), in the same process, on the same inputs."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import presets as P
from .core import (DTYPE_NAME, EPS, Case, Row, Skip, _Compiler, _explain_or_skip, _first_line, _sanity_tol, auto_row,
                   with_variants)

# ---- attention
_SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def _sdpa_row(backend_name: Optional[str]) -> Row:
    label = "sdpa" if backend_name is None else "sdpa " + backend_name.split("_")[0].lower()

    def make(inp):
        q, k, v, mask = inp["q"], inp["k"], inp["v"], inp.get("mask")
        if backend_name is None:
            fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            be = getattr(SDPBackend, backend_name, None)
            if be is None:
                raise Skip(f"this torch has no SDPBackend.{backend_name}")

            def fn():
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        try:
            out = fn()
        except RuntimeError as err:  # includes CUDA out-of-memory
            raise Skip(f"{label} does not run here: {_first_line(err)}") from None
        inp.setdefault("expected", out)
        return fn

    return Row(label, "baseline", make)


def attention_cases(preset: str, batch: int, s: P.AttentionShape, dtype: torch.dtype, device: str,
                    backends: Sequence[str], compiler: _Compiler) -> Case:
    def setup():
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(s.B, s.H, s.Sq, s.D, device=device, dtype=dtype, generator=g)
        k = torch.randn(s.B, s.H, s.Skv, s.D, device=device, dtype=dtype, generator=g)
        v = torch.randn(s.B, s.H, s.Skv, s.D, device=device, dtype=dtype, generator=g)
        mask = None
        if s.masked_keys:  # key padding: the trailing keys of every sample masked out
            mask = (torch.arange(s.Skv, device=device) < s.Skv - s.masked_keys).reshape(1, 1, 1, s.Skv)
            mask = mask.expand(s.B, 1, 1, s.Skv)
        return {"q": q, "k": k, "v": v, "mask": mask}

    def call(inp, b):
        import flashdiff

        return lambda: flashdiff.attention(inp["q"], inp["k"], inp["v"], attn_mask=inp["mask"], backend=b)

    rows = [auto_row("attention", call, lambda inp: ((inp["q"], inp["k"], inp["v"], inp["mask"]), {}))]
    for b in with_variants("attention", backends):
        def make(inp, b=b):
            _explain_or_skip("attention", inp["q"], inp["k"], inp["v"], inp["mask"], backend=b)
            return call(inp, b)
        rows.append(Row(b, "flashdiff", make))
    if device == "cuda":
        rows += [_sdpa_row(name) for name in _SDPA_BACKENDS]
    else:
        rows.append(_sdpa_row(None))
    return Case("attention", preset, batch, s.label, str(s), DTYPE_NAME[dtype], "TFLOP/s", s.flops,
                setup, rows, tol=_sanity_tol(dtype))


# ---- group norm
def group_norm_eager(x, groups, weight, bias, activation="silu", scale=None, shift=None, eps=EPS):
    """What a model without flashdiff runs: torch's GroupNorm, then the modulation, then the
    activation, each a separate pass."""
    y = F.group_norm(x, groups, weight, bias, eps)
    if scale is not None:
        per_sample = scale.shape + (1,) * (x.dim() - 2)
        y = y * (1 + scale.reshape(per_sample)) + shift.reshape(per_sample)
    if activation == "silu":
        return F.silu(y)
    if activation == "gelu":
        return F.gelu(y)
    return y


def group_norm_cases(preset: str, batch: int, s: P.NormShape, dtype: torch.dtype, device: str,
                     backends: Sequence[str], compiler: _Compiler) -> Case:
    N, C = s.shape[:2]

    def setup():
        g = torch.Generator(device=device).manual_seed(0)
        x = (torch.randn(s.shape, device=device, generator=g) * 2 + 0.5).to(dtype)
        if s.channels_last:  # any spatial rank: [N, *spatial, C] storage, NC* view
            x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        w = torch.randn(C, device=device, generator=g).to(dtype)
        b = torch.randn(C, device=device, generator=g).to(dtype)
        sc = (0.5 * torch.randn(N, C, device=device, generator=g)).to(dtype) if s.modulate else None
        sh = torch.randn(N, C, device=device, generator=g).to(dtype) if s.modulate else None
        return {"x": x, "w": w, "b": b, "scale": sc, "shift": sh}

    def args(inp):
        return inp["x"], s.groups, inp["w"], inp["b"]

    def kwargs(inp):
        return dict(activation=s.activation, scale=inp["scale"], shift=inp["shift"])

    def call(inp, be):
        import flashdiff

        x, G, w, b = args(inp)
        kw = kwargs(inp)
        return lambda: flashdiff.group_norm(x, G, w, b, EPS, backend=be, **kw)

    def make_eager(inp):
        x, G, w, b = args(inp)
        return lambda: group_norm_eager(x, G, w, b, s.activation, inp["scale"], inp["shift"])  # noqa: E731

    def compiled_fn(inp):
        from .. import reference

        x, G, w, b = args(inp)

        def ref(x):
            y = reference.group_norm(x, G, w, b, EPS, s.activation, inp["scale"], inp["shift"],
                                     upcast=torch.float32)
            return y.to(x.dtype)
        return ref

    rows = _norm_rows("group_norm", call, lambda inp: (args(inp), kwargs(inp)), backends, make_eager,
                      compiled_fn, "torch.compile(ref)", f"group_norm {s} {DTYPE_NAME[dtype]}", compiler)
    item = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(s.shape)
    params = 2 * C + (2 * N * C if s.modulate else 0)
    work = (2 * numel + params) * item  # read x, write y (+ weight, bias, scale, shift)
    return Case("group_norm", preset, batch, s.label, str(s), DTYPE_NAME[dtype], "GB/s", work,
                setup, rows, tol=_sanity_tol(dtype))


def _norm_rows(op: str, call, explain_args, backends: Sequence[str], make_eager, compiled_fn,
               compiled_label: str, compile_key: str, compiler: _Compiler) -> List[Row]:
    """The rows of a norm case: auto, each flashdiff backend, torch eager (whose output the
    others are checked against), torch.compile of `compiled_fn(inp)` (x -> y) when compiling
    is on, and a copy of x (same bytes read and written: the memory-bound ceiling)."""
    rows = [auto_row(op, call, explain_args)]
    for be in with_variants(op, backends):
        def make(inp, be=be):
            args, kwargs = explain_args(inp)
            _explain_or_skip(op, *args, **kwargs, backend=be)
            return call(inp, be)
        rows.append(Row(be, "flashdiff", make))

    def eager(inp):
        fn = make_eager(inp)
        inp.setdefault("expected", fn())
        return fn

    def make_compiled(inp):
        x = inp["x"]
        compiled = compiler.compile(compile_key, compiled_fn(inp), lambda f: f(x))
        return lambda: compiled(x)

    def make_copy(inp):
        x = inp["x"]
        return lambda: x.clone()  # allocates its output, as the op does

    rows.append(Row("torch eager", "baseline", eager))
    if compiler.enabled:
        rows.append(Row(compiled_label, "baseline", make_compiled))
    rows.append(Row("copy", "copy", make_copy))
    return rows


# ---- layer norm (adaLN) and rms norm (q/k norm): rows of the last dim
def layer_norm_eager(x, scale=None, shift=None, eps=EPS):
    """What DiT / diffusers run: F.layer_norm without affine, then `modulate` (two more passes)."""
    y = F.layer_norm(x, (x.shape[-1],), None, None, eps)
    if scale is not None:
        y = y * (1 + scale[:, None]) + shift[:, None]
    return y


def rms_norm_eager(x, weight, eps=EPS):
    """diffusers' RMSNorm.forward: the variance in fp32, x scaled, cast to the weight's dtype, times it."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    y = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(weight.dtype)
    return y * weight


def _row_norm_case(op: str, preset: str, batch: int, s: P.RowNormShape, dtype: torch.dtype, device: str,
                   backends: Sequence[str], compiler: _Compiler) -> Case:
    import flashdiff

    N, D = s.shape[0], s.shape[-1]

    def setup():
        g = torch.Generator(device=device).manual_seed(0)
        x = (torch.randn(s.shape, device=device, generator=g) * 2 + 0.5).to(dtype)
        inp = {"x": x, "scale": None, "shift": None, "weight": None}
        if op == "rms_norm":
            inp["weight"] = torch.randn(D, device=device, generator=g).to(dtype)
        elif s.modulate:  # adaLN: [N, D] chunks of the modulation (strided views, as models pass them)
            mod = torch.randn(N, 2 * D, device=device, generator=g).to(dtype)
            inp["shift"], inp["scale"] = mod.chunk(2, dim=1)
        return inp

    if op == "layer_norm":
        def explain_args(inp):
            return (inp["x"], (D,)), dict(eps=EPS, scale=inp["scale"], shift=inp["shift"])

        def call(inp, be):
            x, sc, sh = inp["x"], inp["scale"], inp["shift"]
            return lambda: flashdiff.layer_norm(x, (D,), None, None, EPS, sc, sh, backend=be)

        def make_eager(inp):
            x, sc, sh = inp["x"], inp["scale"], inp["shift"]
            return lambda: layer_norm_eager(x, sc, sh)

        def compiled_fn(inp):
            return lambda x: layer_norm_eager(x, inp["scale"], inp["shift"])
    else:
        def explain_args(inp):
            return (inp["x"], inp["weight"], EPS), {}

        def call(inp, be):
            x, w = inp["x"], inp["weight"]
            return lambda: flashdiff.rms_norm(x, w, EPS, backend=be)

        def make_eager(inp):
            x, w = inp["x"], inp["weight"]
            return lambda: rms_norm_eager(x, w)

        def compiled_fn(inp):
            return lambda x: rms_norm_eager(x, inp["weight"])

    rows = _norm_rows(op, call, explain_args, backends, make_eager, compiled_fn, "torch.compile(eager)",
                      f"{op} {s} {DTYPE_NAME[dtype]}", compiler)
    item = torch.empty((), dtype=dtype).element_size()
    params = 2 * N * D if s.modulate else (D if op == "rms_norm" else 0)
    work = (2 * math.prod(s.shape) + params) * item  # read x, write y (+ scale/shift or weight)
    return Case(op, preset, batch, s.label, str(s), DTYPE_NAME[dtype], "GB/s", work,
                setup, rows, tol=_sanity_tol(dtype))


def layer_norm_cases(preset: str, batch: int, s: P.RowNormShape, dtype: torch.dtype, device: str,
                     backends: Sequence[str], compiler: _Compiler) -> Case:
    return _row_norm_case("layer_norm", preset, batch, s, dtype, device, backends, compiler)


def rms_norm_cases(preset: str, batch: int, s: P.RowNormShape, dtype: torch.dtype, device: str,
                   backends: Sequence[str], compiler: _Compiler) -> Case:
    return _row_norm_case("rms_norm", preset, batch, s, dtype, device, backends, compiler)


# ---- scheduler step
DDIM_A_T, DDIM_A_PREV, GUIDANCE = 0.35, 0.52, 7.5
FLOW_SIGMA, FLOW_SIGMA_NEXT = 0.8, 0.78


def ddim_cfg_eager(x, cond, uncond, a_t: float, a_prev: float, guidance: float):
    """The DDIM (eta = 0, epsilon) + CFG step as a pipeline writes it in torch ops."""
    eps = uncond + guidance * (cond - uncond)
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps


def flow_euler_eager(x, v, sigma: float, sigma_next: float):
    return x + (sigma_next - sigma) * v


def _diffusers_row(s: P.StepShape) -> Row:
    def make(inp):
        try:
            import diffusers
        except ImportError as err:
            raise Skip(f"diffusers is not installed ({err})") from None
        x, c, u = inp["x"], inp["cond"], inp["uncond"]
        if s.family == "ddim":
            sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                            beta_end=0.012, clip_sample=False, set_alpha_to_one=False)
            sched.set_timesteps(50)
            t = sched.timesteps[10]

            def fn():
                eps = u + GUIDANCE * (c - u) if s.cfg else c
                return sched.step(eps, t, x, eta=0.0).prev_sample
        else:
            sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
            sched.set_timesteps(50)
            t = sched.timesteps[10]

            def fn():
                sched._step_index = 10  # step() advances it; keep timing the same step
                eps = u + GUIDANCE * (c - u) if s.cfg else c
                return sched.step(eps, t, x).prev_sample
        fn()
        return fn

    return Row("diffusers step", "baseline", make)


def scheduler_cases(preset: str, batch: int, s: P.StepShape, dtype: torch.dtype, device: str,
                    backends: Sequence[str], compiler: _Compiler) -> Case:
    import flashdiff

    def setup():
        g = torch.Generator(device=device).manual_seed(0)
        mk = lambda: torch.randn(s.shape, device=device, generator=g).to(dtype)  # noqa: E731
        inp = {"x": mk(), "cond": mk(), "uncond": mk() if s.cfg else None}
        if s.family == "ddim":  # a row of the [steps, 12] table a fused scheduler precomputes
            inp["coefs"] = flashdiff.ddim_coefs(DDIM_A_T, DDIM_A_PREV,
                                                guidance_scale=GUIDANCE if s.cfg else 1.0, device=device)
        else:
            inp["coefs"] = flashdiff.flow_euler_coefs(FLOW_SIGMA, FLOW_SIGMA_NEXT,
                                                      guidance_scale=GUIDANCE if s.cfg else 1.0,
                                                      device=device)
        return inp

    def eager_fn(inp):
        x, c, u = inp["x"], inp["cond"], inp["uncond"]
        if s.family == "ddim":
            if s.cfg:
                return lambda: ddim_cfg_eager(x, c, u, DDIM_A_T, DDIM_A_PREV, GUIDANCE)
            return lambda: ddim_cfg_eager(x, c, c, DDIM_A_T, DDIM_A_PREV, 1.0)
        if s.cfg:
            return lambda: flow_euler_eager(x, u + GUIDANCE * (c - u), FLOW_SIGMA, FLOW_SIGMA_NEXT)
        return lambda: flow_euler_eager(x, c, FLOW_SIGMA, FLOW_SIGMA_NEXT)

    def step_args(inp):
        return (inp["x"], inp["cond"], inp["coefs"], inp["uncond"]), {}

    def call(inp, be):
        x, c, coefs, u = step_args(inp)[0]
        return lambda: flashdiff.scheduler_update(x, c, coefs, u, backend=be)

    rows = [auto_row("scheduler_update", call, step_args)]
    for be in with_variants("scheduler_update", backends):
        def make(inp, be=be):
            _explain_or_skip("scheduler_update", *step_args(inp)[0], backend=be)
            return call(inp, be)
        rows.append(Row(be, "flashdiff", make))

    def make_eager(inp):
        fn = eager_fn(inp)
        inp.setdefault("expected", fn())
        return fn

    def make_compiled(inp):
        fn = eager_fn(inp)  # closes over the inputs: compiled with them as constants' shapes
        compiled = compiler.compile(f"scheduler {s} {DTYPE_NAME[dtype]}", fn, lambda f: f())
        return compiled

    rows += [Row("torch eager", "baseline", make_eager), _diffusers_row(s)]
    if compiler.enabled:
        rows.append(Row("torch.compile(eager)", "baseline", make_compiled))
    item = torch.empty((), dtype=dtype).element_size()
    tensors = 4 if s.cfg else 3  # read x, cond (+ uncond), write prev
    work = tensors * math.prod(s.shape) * item
    return Case("scheduler", preset, batch, s.label, str(s), DTYPE_NAME[dtype], "GB/s", work,
                setup, rows, tol=_sanity_tol(dtype))
