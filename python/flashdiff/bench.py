"""The benchmark engine behind `flashdiff bench` and benchmarks/ (pytest-benchmark).

Every case times flashdiff's backends next to the strongest baselines, in the same process,
on the same inputs:

    attention    F.scaled_dot_product_attention under each SDPA backend that runs
                 (flash, efficient, cudnn, math on a GPU; the default on a CPU)
    group_norm   F.silu(F.group_norm(x)) eager (+ the modulation when the case has one),
                 torch.compile of the reference, and a plain copy of x (the floor)
    scheduler    the eager torch expression of the step (DDIM + CFG: ~8 ops), diffusers'
                 scheduler step, torch.compile of the eager expression
    e2e          50-step DDIM + CFG sampling: eager reference vs fused vs fused + CUDA graph vs
                 torch.compile of the reference (images/s)

Timing: warm-up first, then the median and the 20 %/80 % quantiles: triton.testing.do_bench on
CUDA (it flushes L2 between calls), a time.perf_counter loop on the CPU. Ceilings are measured
once per run: the bandwidth of a large device-to-device copy (GB/s; memory-bound ops are a
fraction of it) and the rate of a large matmul (bf16 on CUDA, fp32 on the CPU: TFLOP/s;
attention is a fraction of it). Speedups are against the best baseline of the same case.

    from flashdiff import bench
    result = bench.run(bench.BenchOptions(ops=["group_norm"], quick=True))
    print(bench.format_tables(result))
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import presets as P

SCHEMA = "flashdiff-bench/1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAME = {v: k for k, v in DTYPES.items()}
EPS = 1e-5


class Skip(Exception):
    """A row or case that cannot run here; the message says why and goes into the results."""


def _first_line(err: BaseException, limit: int = 200) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:limit] if lines else ''}"


# ------------------------------------------------------------------ options
@dataclass
class BenchOptions:
    ops: Sequence[str] = P.OPS
    presets: Optional[Sequence[str]] = None      # None: presets.names(device)
    batches: Optional[Sequence[int]] = None      # None: each preset's batches
    dtypes: Optional[Sequence[str]] = None       # None: per-op defaults (see default_dtypes)
    device: Optional[str] = None                 # None: cuda if available, else cpu
    backends: Optional[Sequence[str]] = None     # flashdiff backends to time (None: all usable)
    quick: bool = False
    compile: Optional[bool] = None               # torch.compile baselines; None: on CUDA only
    compile_mode: Optional[str] = None           # None: max-autotune-no-cudagraphs (CUDA), default (CPU)
    compile_budget_s: float = 60.0               # per op: stop compiling new baselines past this
    time_budget_s: Optional[float] = None        # whole run; each op gets a fair share of what is left
    check: bool = True                           # sanity-compare flashdiff outputs to a baseline
    json_path: Optional[str] = None              # written after every case (partial runs survive)
    progress: Optional[Callable[[str], None]] = None


def default_dtypes(op: str, device: str) -> List[str]:
    if device == "cuda":
        return ["bf16"]
    return {"attention": ["fp32"], "e2e": ["fp32"]}.get(op, ["fp32", "bf16"])


# ------------------------------------------------------------------ machine description
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> Dict[str, Any]:
    """{'commit': sha or None, 'dirty': bool or None} of the checkout flashdiff runs from
    (FLASHDIFF_GIT_COMMIT overrides, e.g. on a machine that received a copy without .git)."""
    env = os.environ.get("FLASHDIFF_GIT_COMMIT")
    if env:
        return {"commit": env, "dirty": None}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": sha or None, "dirty": bool(dirty) if sha else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine_info(device: str) -> Dict[str, Any]:
    import flashdiff

    info: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **{f"git_{k}": v for k, v in git_commit().items()},
        "device": device,
        "card": torch.cuda.get_device_name() if device == "cuda" else None,
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "flashdiff": flashdiff.__version__,
        "backends": flashdiff.backend_status(),
    }
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)  # others sharing the machine inflate timings
    except (OSError, AttributeError):
        info["load_avg_1m"] = None
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["card_sm"] = f"{p.major}{p.minor}"
        info["card_memory_gib"] = round(p.total_memory / 2**30, 1)
    return info


# ------------------------------------------------------------------ timing
@dataclass
class Timing:
    median_ms: float
    q20_ms: float
    q80_ms: float
    reps: int


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _quantile(sorted_values: List[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _loop_timing(fn: Callable, device: str, warmup_s: float, budget_s: float, min_reps: int,
                 max_reps: int) -> Timing:
    """Time each call on its own (perf_counter; synchronized on CUDA)."""
    start = time.perf_counter()
    if warmup_s > 0:
        fn()
        _sync(device)
    while time.perf_counter() - start < warmup_s:
        fn()
        _sync(device)
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times))


def measure(fn: Callable, device: str, quick: bool = False, *, reps: Optional[int] = None) -> Timing:
    """Median and 20/80 % quantiles of fn() in milliseconds, after a warm-up.

    CUDA: triton.testing.do_bench (L2 flushed between calls). CPU, or `reps` given (long calls
    such as whole sampling loops, already warmed up by the caller): a perf_counter loop,
    synchronized on CUDA.
    """
    if reps is not None:
        return _loop_timing(fn, device, 0.0, 0.0, reps, reps)
    if device == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            warmup, rep = (10, 40) if quick else (25, 100)
            med, q20, q80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
            return Timing(float(med), float(q20), float(q80), -1)  # do_bench does not say how many
        return _loop_timing(fn, device, 0.05, 0.1 if quick else 0.4, 10, 1000)
    if quick:
        return _loop_timing(fn, device, 0.02, 0.25, 5, 400)
    return _loop_timing(fn, device, 0.1, 1.0, 10, 2000)


# ------------------------------------------------------------------ ceilings
def measure_ceilings(device: str, quick: bool = False) -> Dict[str, Any]:
    """Copy bandwidth (GB/s) and matmul rate (TFLOP/s), once per run."""
    out: Dict[str, Any] = {}
    if device == "cuda":
        n = (256 if quick else 1024) * 2**20
        src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
        dst = torch.empty_like(src)
        t = measure(lambda: dst.copy_(src), device, quick)
        out.update(copy_gbps=2 * n / t.median_ms / 1e6, copy_bytes=n,
                   copy_what=f"device-to-device copy of {n // 2**20} MiB (read + write)")
        del src, dst
        m = 4096 if quick else 8192
        a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
        t = measure(lambda: a @ b, device, quick)
        out.update(matmul_tflops=2 * m**3 / t.median_ms / 1e9, matmul_dtype="bf16",
                   matmul_what=f"bf16 matmul {m}×{m}×{m}")
        del a, b
        torch.cuda.empty_cache()
    else:
        n = (64 if quick else 256) * 2**20
        src = torch.rand(n // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)  # first touch outside the timing
        t = measure(lambda: dst.copy_(src), device, quick)
        out.update(copy_gbps=2 * n / t.median_ms / 1e6, copy_bytes=n,
                   copy_what=f"CPU copy of {n // 2**20} MiB (read + write)")
        m = 1024 if quick else 2048
        a, b = torch.randn(m, m), torch.randn(m, m)
        t = measure(lambda: a @ b, device, quick)
        out.update(matmul_tflops=2 * m**3 / t.median_ms / 1e9, matmul_dtype="fp32",
                   matmul_what=f"fp32 matmul {m}×{m}×{m} (CPU: no fast bf16 path, so fp32)")
    return out


# ------------------------------------------------------------------ cases
@dataclass
class Row:
    """One timed line of a case. make(inputs) returns the callable to time (it may compile or
    check that the row runs, and raise Skip)."""
    name: str
    role: str  # "flashdiff" | "baseline" | "copy"
    make: Callable[[dict], Callable[[], Any]]


@dataclass
class Case:
    op: str
    preset: str
    batch: int
    label: str
    shape: str
    dtype: str
    metric: str                 # "GB/s" | "TFLOP/s" | "images/s"
    work: float                 # bytes, FLOPs or images per call
    ceiling: Optional[str]      # "copy" | "matmul" | None
    setup: Callable[[], dict]
    rows: List[Row]
    reps: Optional[int] = None  # fixed repetition count (long calls)
    tol: float = 0.0            # relative tolerance of the sanity check (0: no check)

    @property
    def id(self) -> str:
        return f"{self.op}/{self.preset}/b{self.batch}/{self.label}/{self.dtype}"


def flashdiff_backends(device: str, wanted: Optional[Sequence[str]] = None) -> List[str]:
    """flashdiff backends worth timing on `device`: usable here, native to the device (the
    Triton interpreter on a CPU times nothing meaningful), restricted to `wanted`."""
    import flashdiff

    status = flashdiff.backend_status()
    native = ("cpu",) if device == "cpu" else ("triton", "cuda")
    names = list(wanted) if wanted else list(native)
    return [b for b in names if status.get(b) is None and (b in native or b == "reference")]


def _sanity_tol(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 5e-2


def _explain_or_skip(op: str, *args, **kwargs) -> None:
    import flashdiff

    try:
        flashdiff.explain(op, *args, **kwargs)
    except NotImplementedError as err:
        raise Skip(str(err).split(": ", 1)[-1]) from None


class _Compiler:
    """torch.compile baselines, one compile budget per run (compile time reported apart)."""

    def __init__(self, enabled: bool, mode: str, budget_s: float):
        self.enabled, self.mode, self.budget_s = enabled, mode, budget_s
        self.spent_s = 0.0
        self.times: Dict[str, float] = {}

    def new_op(self) -> None:
        """Each op family gets the whole budget (so e2e is not starved by the norms)."""
        self.spent_s = 0.0

    def compile(self, key: str, fn: Callable, warm: Callable[[Callable], Any]) -> Callable:
        if not self.enabled:
            raise Skip("torch.compile baselines are off (--compile turns them on; on a CPU each "
                       "compile takes ~30 s)")
        if self.spent_s >= self.budget_s:
            raise Skip(f"compile budget of {self.budget_s:.0f} s spent")
        torch._dynamo.reset()  # lambdas share code objects: avoid the recompile limit
        compiled = torch.compile(fn, mode=None if self.mode == "default" else self.mode, dynamic=False)
        t0 = time.perf_counter()
        try:
            warm(compiled)
        except Exception as err:  # noqa: BLE001 - a baseline that fails to compile is reported
            raise Skip(f"torch.compile failed: {_first_line(err)}")
        finally:
            self.spent_s += time.perf_counter() - t0
        self.times[key] = round(time.perf_counter() - t0, 2)
        return compiled


# ---- attention
_SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def _sdpa_row(backend_name: Optional[str]) -> Row:
    label = "sdpa" if backend_name is None else "sdpa " + backend_name.split("_")[0].lower()

    def make(inp):
        q, k, v = inp["q"], inp["k"], inp["v"]
        if backend_name is None:
            fn = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            be = getattr(SDPBackend, backend_name, None)
            if be is None:
                raise Skip(f"this torch has no SDPBackend.{backend_name}")

            def fn():
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, v)
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
        return {"q": q, "k": k, "v": v}

    rows = []
    for b in backends:
        def make(inp, b=b):
            import flashdiff

            _explain_or_skip("attention", inp["q"], inp["k"], inp["v"], backend=b)
            return lambda: flashdiff.attention(inp["q"], inp["k"], inp["v"], backend=b)
        rows.append(Row(b, "flashdiff", make))
    if device == "cuda":
        rows += [_sdpa_row(name) for name in _SDPA_BACKENDS]
    else:
        rows.append(_sdpa_row(None))
    return Case("attention", preset, batch, s.label, str(s), DTYPE_NAME[dtype], "TFLOP/s", s.flops,
                "matmul", setup, rows, tol=_sanity_tol(dtype))


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
        w = torch.randn(C, device=device, generator=g).to(dtype)
        b = torch.randn(C, device=device, generator=g).to(dtype)
        sc = (0.5 * torch.randn(N, C, device=device, generator=g)).to(dtype) if s.modulate else None
        sh = torch.randn(N, C, device=device, generator=g).to(dtype) if s.modulate else None
        return {"x": x, "w": w, "b": b, "scale": sc, "shift": sh}

    def args(inp):
        return inp["x"], s.groups, inp["w"], inp["b"]

    rows = []
    for be in backends:
        def make(inp, be=be):
            import flashdiff

            x, G, w, b = args(inp)
            kw = dict(activation=s.activation, scale=inp["scale"], shift=inp["shift"])
            _explain_or_skip("group_norm", x, G, w, b, **kw, backend=be)
            return lambda: flashdiff.group_norm(x, G, w, b, EPS, backend=be, **kw)
        rows.append(Row(be, "flashdiff", make))

    def make_eager(inp):
        x, G, w, b = args(inp)
        fn = lambda: group_norm_eager(x, G, w, b, s.activation, inp["scale"], inp["shift"])  # noqa: E731
        inp.setdefault("expected", fn())
        return fn

    def make_compiled(inp):
        from . import reference

        x, G, w, b = args(inp)

        def ref(x):
            y = reference.group_norm(x, G, w, b, EPS, s.activation, inp["scale"], inp["shift"],
                                     upcast=torch.float32)
            return y.to(x.dtype)
        compiled = compiler.compile(f"group_norm {s} {DTYPE_NAME[dtype]}", ref, lambda f: f(x))
        return lambda: compiled(x)

    def make_copy(inp):
        x = inp["x"]
        return lambda: x.clone()  # allocates its output, as the op does

    rows.append(Row("torch eager", "baseline", make_eager))
    if compiler.enabled:
        rows.append(Row("torch.compile(ref)", "baseline", make_compiled))
    rows.append(Row("copy", "copy", make_copy))
    item = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(s.shape)
    params = 2 * C + (2 * N * C if s.modulate else 0)
    work = (2 * numel + params) * item  # read x, write y (+ weight, bias, scale, shift)
    return Case("group_norm", preset, batch, s.label, str(s), DTYPE_NAME[dtype], "GB/s", work, "copy",
                setup, rows, tol=_sanity_tol(dtype))


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

    rows = []
    for be in backends:
        def make(inp, be=be):
            x, c, u, coefs = inp["x"], inp["cond"], inp["uncond"], inp["coefs"]
            _explain_or_skip("scheduler_update", x, c, coefs, u, backend=be)
            return lambda: flashdiff.scheduler_update(x, c, coefs, u, backend=be)
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
    return Case("scheduler", preset, batch, s.label, str(s), DTYPE_NAME[dtype], "GB/s", work, "copy",
                setup, rows, tol=_sanity_tol(dtype))


# ---- end-to-end sampling
def load_model(name: str, device: str, dtype: torch.dtype):
    """A compact model of flashdiff.models by config name (a key of DiT_models or UNet_models;
    "UNet-S" is built class-conditional on 32×32×4 latents like the DiTs), randomly initialised
    (timing does not depend on the weights), in eval mode. Raises Skip when it is missing."""
    try:
        from .models import DiT_models, UNet_models
    except ImportError as err:
        raise Skip(f"flashdiff.models is not available ({err})") from None
    if name in DiT_models:
        model = DiT_models[name]()
    elif name == "UNet-S":
        model = UNet_models[name](in_channels=4, sample_size=32, num_classes=1000)
    elif name in UNet_models:
        model = UNet_models[name]()
    else:
        raise Skip(f"no model {name!r} in flashdiff.models (DiT_models: {sorted(DiT_models)}, "
                   f"UNet_models: {sorted(UNet_models)})")
    return model.to(device=device, dtype=dtype).eval()


def set_model_backend(model: torch.nn.Module, backend: Optional[str]) -> None:
    """Switch a flashdiff model between the fused ops (None = auto) and the reference."""
    from .nn import set_backend

    set_backend(model, backend)


def _model_call(model, x, t, y):
    out = model(x, t, y)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out[:, : x.shape[1]]  # learned-sigma models output 2·C channels: keep eps


def _ddim_schedule(steps: int, train_steps: int = 1000):
    """DDIM timesteps (diffusers' 'leading' spacing) and ᾱ_t, ᾱ_prev from a linear β schedule,
    in float64, on the host."""
    betas = torch.linspace(1e-4, 0.02, train_steps, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)
    stride = train_steps // steps
    ts = torch.arange(0, steps, dtype=torch.long).flip(0) * stride
    a_t = ac[ts]
    a_prev = torch.where(ts - stride >= 0, ac[(ts - stride).clamp(min=0)], ac[0])
    return ts, a_t, a_prev


def e2e_cases(preset: str, batch: int, s: P.SamplingCase, dtype: torch.dtype, device: str,
              backends: Sequence[str], compiler: _Compiler) -> Case:
    import flashdiff

    def setup():
        model = load_model(s.model, device, dtype)
        C, size = model.config.in_channels, model.sample_size
        null = model.num_classes  # label num_classes is the null (unconditional) class
        g = torch.Generator(device=device).manual_seed(0)
        ts, a_t, a_prev = _ddim_schedule(s.steps)
        y = torch.randint(0, null, (s.batch,), device=device, generator=g)
        return {
            "model": model,
            "x_T": torch.randn(s.batch, C, size, size, device=device, generator=g).to(dtype),
            "y": torch.cat([y, torch.full_like(y, null)]),  # conditional half, unconditional half
            "t": ts.to(device),
            "a": list(zip(a_t.tolist(), a_prev.tolist())),
            "coefs": flashdiff.ddim_coefs(a_t.to(device), a_prev.to(device), guidance_scale=s.guidance),
        }

    def sample(inp, forward, fused: bool, x=None):
        x = inp["x_T"] if x is None else x
        y, tt, coefs = inp["y"], inp["t"], inp["coefs"]
        for i in range(s.steps):
            t = tt[i].expand(2 * s.batch)
            out = forward(torch.cat([x, x]), t, y)
            cond, uncond = out.chunk(2)
            if fused:
                x = flashdiff.scheduler_update(x, cond, coefs[i], uncond)
            else:
                x = ddim_cfg_eager(x, cond, uncond, *inp["a"][i], s.guidance)
        return x

    def with_backend(inp, backend):
        set_model_backend(inp["model"], backend)
        return lambda x, t, y: _model_call(inp["model"], x, t, y)

    def make_reference(inp):
        fwd = with_backend(inp, "reference")
        return lambda: sample(inp, fwd, fused=False)

    def make_fused(inp):
        if device == "cpu" and "cpu" not in backends or device == "cuda" and not backends:
            raise Skip("no fused backend available here")
        fwd = with_backend(inp, None)
        return lambda: sample(inp, fwd, fused=True)

    def make_graph(inp):
        if device != "cuda":
            raise Skip("CUDA graphs need a GPU")
        fwd = with_backend(inp, None)
        static_x = inp["x_T"].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # autotune and allocate outside the capture
                sample(inp, fwd, True, static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                inp["graph_out"] = sample(inp, fwd, True, static_x)
        except Exception as err:  # noqa: BLE001 - capture failures are results too
            raise Skip(f"CUDA graph capture failed: {_first_line(err)}")
        return graph.replay

    def make_compiled(inp):
        set_model_backend(inp["model"], "reference")
        model = inp["model"]
        fwd = lambda x, t, y: _model_call(model, x, t, y)  # noqa: E731
        x2, t2 = torch.cat([inp["x_T"]] * 2), inp["t"][0].expand(2 * s.batch)
        compiled = compiler.compile(f"e2e {s}", fwd, lambda f: (f(x2, t2, inp["y"]), f(x2, t2, inp["y"])))
        return lambda: sample(inp, compiled, fused=False)

    rows = [Row("fused", "flashdiff", make_fused),
            Row("fused + CUDA graph", "flashdiff", make_graph),
            Row("eager reference", "baseline", make_reference)]
    if compiler.enabled:
        rows.append(Row("torch.compile(ref)", "baseline", make_compiled))
    return Case("e2e", preset, batch, s.label or s.model, str(s), DTYPE_NAME[dtype], "images/s",
                s.batch, None, setup, rows, reps=2 if device == "cpu" else 5)


CASE_BUILDERS = {"attention": attention_cases, "group_norm": group_norm_cases,
                 "scheduler": scheduler_cases, "e2e": e2e_cases}


def build_cases(opts: BenchOptions, device: str, compiler: _Compiler) -> List[Case]:
    preset_names = list(opts.presets or P.names(device))
    backends = flashdiff_backends(device, opts.backends)
    cases = []
    for op in opts.ops:
        if op not in CASE_BUILDERS:
            raise ValueError(f"op must be one of {P.OPS}, got {op!r}")
        for dt in (opts.dtypes or default_dtypes(op, device)):
            if dt not in DTYPES:
                raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dt!r}")
            for preset, batch, shape in P.expand(preset_names, op, opts.batches):
                cases.append(CASE_BUILDERS[op](preset, batch, shape, DTYPES[dt], device, backends, compiler))
    return cases


# ------------------------------------------------------------------ running
def _rel_error(y, expected) -> float:
    y, e = y.detach().float(), expected.detach().float()
    if y.shape != e.shape:
        return float("inf")
    scale = float(e.abs().max()) if e.numel() else 0.0
    err = float((y - e).abs().max()) if e.numel() else 0.0
    return err / max(scale, 1e-6) if math.isfinite(err) else float("inf")


def _run_case(case: Case, device: str, opts: BenchOptions, ceilings: dict, say) -> List[dict]:
    records: List[dict] = []
    base = dict(op=case.op, preset=case.preset, batch=case.batch, case=case.label, shape=case.shape,
                dtype=case.dtype, metric=case.metric)
    try:
        inp = case.setup()
    except Exception as err:  # noqa: BLE001 - Skip, or a failure (OOM, a model API change): recorded
        why = str(err) if isinstance(err, Skip) else f"setup failed: {_first_line(err)}"
        say(f"  skipped {case.id}: {why}")
        return [dict(base, backend=r.name, role=r.role, skipped=why) for r in case.rows]
    # Baselines first: they produce the output the flashdiff rows are sanity-checked against.
    order = sorted(case.rows, key=lambda r: r.role == "flashdiff")
    outputs = {}
    for row in order:
        rec = dict(base, backend=row.name, role=row.role)
        try:
            with torch.inference_mode():
                fn = row.make(inp)
                out = fn()
                reps = case.reps if case.reps is None or not opts.quick else max(1, case.reps // 2)
                t = measure(fn, device, opts.quick, reps=reps)
        except Skip as why:
            rec["skipped"] = str(why)
            say(f"  {row.name:22s} skipped: {why}")
            records.append(rec)
            continue
        except Exception as err:  # noqa: BLE001 - one failing row (OOM, a kernel error) must not end the run
            rec["skipped"] = f"failed: {_first_line(err)}"
            say(f"  {row.name:22s} {rec['skipped']}")
            records.append(rec)
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        rec.update(asdict(t))
        rate = case.work / (t.median_ms * 1e-3)
        if case.metric == "GB/s":
            rec["value"] = rate / 1e9
            rec["fraction_of_ceiling"] = rec["value"] / ceilings["copy_gbps"] if ceilings.get("copy_gbps") else None
        elif case.metric == "TFLOP/s":
            rec["value"] = rate / 1e12
            rec["fraction_of_ceiling"] = (rec["value"] / ceilings["matmul_tflops"]
                                          if ceilings.get("matmul_tflops") else None)
        else:
            rec["value"] = rate
            rec["fraction_of_ceiling"] = None
        if opts.check and case.tol and row.role == "flashdiff" and isinstance(out, torch.Tensor) \
                and isinstance(inp.get("expected"), torch.Tensor):
            err = _rel_error(out, inp["expected"])
            rec["check_rel_error"] = err
            rec["check"] = "ok" if err <= case.tol else "MISMATCH"
        outputs[row.name] = rec
        records.append(rec)
        say(f"  {row.name:22s} {t.median_ms:10.4f} ms  ({t.q20_ms:.4f}–{t.q80_ms:.4f})  "
            f"{rec['value']:.4g} {case.metric}" + (f"  check {rec['check']}" if "check" in rec else ""))
    del inp
    if device == "cuda":
        torch.cuda.empty_cache()
    _add_ratios(records)
    return records


def _add_ratios(records: List[dict]) -> None:
    """Speedup of every row against the best (fastest) baseline of its case, and time relative
    to the copy row where the case has one."""
    timed = [r for r in records if "median_ms" in r]
    baselines = [r for r in timed if r["role"] == "baseline"]
    copy = next((r for r in timed if r["role"] == "copy"), None)
    best = min(baselines, key=lambda r: r["median_ms"]) if baselines else None
    for r in timed:
        if best is not None and r["role"] != "copy":
            r["best_baseline"] = best["backend"]
            r["speedup_vs_best_baseline"] = best["median_ms"] / r["median_ms"]
        if copy is not None and r["role"] != "copy":
            r["time_vs_copy"] = r["median_ms"] / copy["median_ms"]


def run(opts: BenchOptions) -> Dict[str, Any]:
    """Measure the ceilings, then every case; returns (and writes, with json_path) the results."""
    say = opts.progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    compile_on = opts.compile if opts.compile is not None else device == "cuda"
    mode = opts.compile_mode or ("max-autotune-no-cudagraphs" if device == "cuda" else "default")
    compiler = _Compiler(compile_on, mode, opts.compile_budget_s)
    t_start = time.perf_counter()
    result: Dict[str, Any] = {"schema": SCHEMA, "meta": machine_info(device)}
    result["meta"].update(argv=sys.argv[1:], quick=opts.quick, ops=list(opts.ops),
                          presets=list(opts.presets or P.names(device)), compile=compile_on,
                          compile_mode=mode if compile_on else None)
    say(f"flashdiff bench on {result['meta']['card'] or result['meta']['cpu']} "
        f"(torch {torch.__version__}, backends timed: {', '.join(flashdiff_backends(device, opts.backends)) or 'none'})")
    load = result["meta"].get("load_avg_1m")
    if device == "cpu" and load is not None and load > (os.cpu_count() or 1):
        say(f"WARNING: load average {load} on {os.cpu_count()} cores: other processes share this CPU, "
            "so timings (multi-threaded ones most) are inflated and noisy")
    say("measuring ceilings (large copy, large matmul) ...")
    result["ceilings"] = measure_ceilings(device, opts.quick)
    c = result["ceilings"]
    say(f"  copy {c['copy_gbps']:.1f} GB/s; {c['matmul_dtype']} matmul {c['matmul_tflops']:.3f} TFLOP/s")
    if not compile_on:
        say("torch.compile baselines: off (--compile turns them on; on a CPU each compile takes ~30 s)")
    cases = build_cases(opts, device, compiler)
    result["results"] = []
    ops_order = [op for op in opts.ops if any(c.op == op for c in cases)]
    op_deadline, current_op = math.inf, None
    for i, case in enumerate(cases, 1):
        if case.op != current_op:  # a new op family: its compile budget and its share of time
            current_op = case.op
            compiler.new_op()
            if opts.time_budget_s is not None:
                left = opts.time_budget_s - (time.perf_counter() - t_start)
                op_deadline = time.perf_counter() + left / (len(ops_order) - ops_order.index(case.op))
        if time.perf_counter() > op_deadline:
            why = f"time budget spent (--time-budget {opts.time_budget_s:.0f} s, shared among the ops)"
            result["results"] += [dict(op=case.op, preset=case.preset, batch=case.batch, case=case.label,
                                       shape=case.shape, dtype=case.dtype, metric=case.metric,
                                       backend=r.name, role=r.role, skipped=why) for r in case.rows]
            continue
        say(f"[{i}/{len(cases)}] {case.op} {case.preset} b{case.batch} {case.shape} {case.dtype}")
        result["results"] += _run_case(case, device, opts, result["ceilings"], say)
        result["compile_times_s"] = dict(compiler.times)
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        if opts.json_path:
            write_json(result, opts.json_path)
    result["compile_times_s"] = dict(compiler.times)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    if opts.json_path:
        write_json(result, opts.json_path)
    return result


def write_json(result: Dict[str, Any], path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)


# ------------------------------------------------------------------ reporting
def _fmt_ms(t: float) -> str:
    return f"{t:.4g}" if t < 1000 else f"{t:.0f}"


def format_tables(result: Dict[str, Any]) -> str:
    """Per op: case, dtype, backend, median (q20–q80), GB/s or TFLOP/s, fraction of ceiling,
    speedup vs the best baseline; skipped rows with their reason."""
    c = result.get("ceilings", {})
    lines = []
    meta = result.get("meta", {})
    lines.append(f"flashdiff bench — {meta.get('card') or meta.get('cpu')} — torch {meta.get('torch')}"
                 f" — {meta.get('date')} — commit {str(meta.get('git_commit'))[:10]}")
    if meta.get("device") == "cpu" and meta.get("load_avg_1m") is not None:
        lines.append(f"CPU: {meta.get('cpu_cores')} cores, {meta.get('torch_threads')} torch threads, "
                     f"load average {meta['load_avg_1m']} at the start")
    if c:
        lines.append(f"ceilings: {c.get('copy_what')}: {c.get('copy_gbps', 0):.1f} GB/s; "
                     f"{c.get('matmul_what')}: {c.get('matmul_tflops', 0):.3f} TFLOP/s")
    for op in P.OPS:
        recs = [r for r in result.get("results", []) if r["op"] == op]
        if not recs:
            continue
        metric = recs[0]["metric"]
        ceil = {"GB/s": "copy", "TFLOP/s": "matmul"}.get(metric, "")
        lines.append("")
        lines.append(f"== {op} ({metric}" + (f", fraction of the {ceil} ceiling" if ceil else "") + ")")
        header = (f"{'case':34s} {'dtype':5s} {'backend':20s} {'median ms (q20–q80)':>26s} "
                  f"{metric:>9s} {'%ceil':>6s} {'vs best baseline':>24s}  note")
        lines.append(header)
        lines.append("-" * len(header))
        last_case = None
        for r in recs:
            key = (r["preset"], r["batch"], r["case"], r["dtype"])
            case = f"{r['shape']}" if key != last_case else ""
            dtype = r["dtype"] if key != last_case else ""
            last_case = key
            if "median_ms" not in r:
                lines.append(f"{case[:34]:34s} {dtype:5s} {r['backend']:20s} skipped: {r.get('skipped')}")
                continue
            timing = f"{_fmt_ms(r['median_ms'])} ({_fmt_ms(r['q20_ms'])}–{_fmt_ms(r['q80_ms'])})"
            frac = r.get("fraction_of_ceiling")
            frac_s = f"{100 * frac:5.1f}%" if frac is not None else "     —"
            sp = r.get("speedup_vs_best_baseline")
            sp_s = f"{sp:.2f}× ({r['best_baseline']})" if sp is not None and r["role"] != "baseline" \
                else (f"{sp:.2f}×" if sp is not None else "—")
            notes = []
            if r["role"] != "copy" and r.get("time_vs_copy") is not None:
                notes.append(f"{r['time_vs_copy']:.2f}× copy time")
            if r.get("check") == "MISMATCH":
                notes.append(f"MISMATCH rel err {r['check_rel_error']:.2e}")
            lines.append(f"{case[:34]:34s} {dtype:5s} {r['backend']:20s} {timing:>26s} "
                         f"{r['value']:9.4g} {frac_s:>6s} {sp_s:>24s}  {'; '.join(notes)}")
    if not meta.get("compile"):
        lines.append("")
        lines.append("torch.compile baselines were off in this run (flashdiff bench --compile).")
    if result.get("compile_times_s"):
        lines.append("")
        lines.append("torch.compile times (s, excluded from the timings): " +
                     ", ".join(f"{k}: {v}" for k, v in result["compile_times_s"].items()))
    return "\n".join(lines)


def summary_rows(result: Dict[str, Any]) -> List[dict]:
    """Per case: the fastest flashdiff row against the best baseline."""
    out = []
    cases: Dict[tuple, List[dict]] = {}
    for r in result.get("results", []):
        cases.setdefault((r["op"], r["preset"], r["batch"], r["case"], r["dtype"]), []).append(r)
    for key, recs in cases.items():
        ours = [r for r in recs if r["role"] == "flashdiff" and "median_ms" in r]
        base = [r for r in recs if r["role"] == "baseline" and "median_ms" in r]
        best = min(ours, key=lambda r: r["median_ms"]) if ours else None
        bb = min(base, key=lambda r: r["median_ms"]) if base else None
        out.append({"op": key[0], "preset": key[1], "batch": key[2], "case": key[3], "dtype": key[4],
                    "shape": recs[0]["shape"], "metric": recs[0]["metric"],
                    "backend": best["backend"] if best else None,
                    "median_ms": best["median_ms"] if best else None,
                    "value": best["value"] if best else None,
                    "fraction_of_ceiling": best.get("fraction_of_ceiling") if best else None,
                    "baseline": bb["backend"] if bb else None,
                    "baseline_ms": bb["median_ms"] if bb else None,
                    "speedup": best.get("speedup_vs_best_baseline") if best else None,
                    "check": best.get("check") if best else None})
    return out


def summary_markdown(result: Dict[str, Any]) -> str:
    """A short Markdown table: per case, the fastest flashdiff backend vs the best baseline."""
    meta = result.get("meta", {})
    c = result.get("ceilings", {})
    lines = [f"**{meta.get('card') or meta.get('cpu')}**, {meta.get('date')}, commit "
             f"`{str(meta.get('git_commit'))[:10]}`, torch {meta.get('torch')}, triton {meta.get('triton')}",
             "",
             f"Ceilings: copy {c.get('copy_gbps', 0):.1f} GB/s; {c.get('matmul_dtype')} matmul "
             f"{c.get('matmul_tflops', 0):.3f} TFLOP/s.",
             "",
             "| op | preset | shape | dtype | flashdiff | median ms | rate | % ceiling | best baseline | its ms | speedup |",
             "|---|---|---|---|---|---:|---:|---:|---|---:|---:|"]
    for s in summary_rows(result):
        if s["median_ms"] is None and s["baseline_ms"] is None:
            continue
        frac = s["fraction_of_ceiling"]
        lines.append(
            f"| {s['op']} | {s['preset']} b{s['batch']} | {s['shape']} | {s['dtype']} | {s['backend'] or '—'} | "
            f"{_fmt_ms(s['median_ms']) if s['median_ms'] is not None else '—'} | "
            f"{'%.4g %s' % (s['value'], s['metric']) if s['value'] is not None else '—'} | "
            f"{'%.0f%%' % (100 * frac) if frac is not None else '—'} | {s['baseline'] or '—'} | "
            f"{_fmt_ms(s['baseline_ms']) if s['baseline_ms'] is not None else '—'} | "
            f"{'%.2f×' % s['speedup'] if s['speedup'] is not None else '—'}"
            f"{' MISMATCH' if s['check'] == 'MISMATCH' else ''} |")
    return "\n".join(lines)
