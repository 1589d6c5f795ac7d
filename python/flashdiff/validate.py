"""`flashdiff validate`: every usable backend of every op against flashdiff.reference, here.

Each check draws a fresh random hostile case (prime and one-past-a-block sizes, single
elements, head_dim 40/72/80/160/256, Sq ≠ Skv, batch 1, channels_last and strided views,
masks, CFG, noise, every prediction type), runs the op with an explicit backend inside
`poisoned_outputs()` (an unwritten element stays NaN and fails), and applies the tolerance
rule of DESIGN.md through flashdiff.testing.compare:

    max|y − ref| ≤ 2·max|y_torch_d − ref| + atol_d      (ref in float64)

It prints one line per check with the error ratio (error / bound, below 1 passes) and a
summary per (op, backend, device); the exit status is non-zero when any check fails. A
backend that declines a case (NotImplementedError with its reason: fp32 on the CUDA attention
kernel, a general mask on a fused kernel) is counted as declined, not failed.

    python -m flashdiff validate                   # all usable backends, 4 cases per dtype
    python -m flashdiff validate --backend cpu --cases 20 --seed 123
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

OPS = ("attention", "group_norm", "layer_norm", "rms_norm", "qk_norm_rope", "scheduler")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAME = {v: k for k, v in DTYPES.items()}


@dataclass
class Check:
    op: str
    backend: str
    device: str
    dtype: str
    case: str
    status: str                # "pass" | "FAIL" | "declined" | "error"
    ratio: Optional[float] = None
    detail: str = ""


# ------------------------------------------------------------------ hostile cases
# Each generator returns (description, run(backend) -> list of output tensors,
# reference(upcast) -> list of tensors) for one random case.
def _strided_like(rng: random.Random, t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "channels_last":
        perm = (0, *range(2, t.dim()), 1)
        inverse = (0, t.dim() - 1, *range(1, t.dim() - 1))
        return t.permute(perm).contiguous().permute(inverse)
    if kind == "strided":
        return torch.cat([t, t], dim=-1)[..., ::2]
    return t


def _group_norm_case(rng: random.Random, dtype, device):
    import flashdiff
    from . import reference

    dims = rng.choice([1, 2, 2, 2, 3])
    groups = rng.choice([1, 2, 3, 5, 8, 32])
    C = groups * rng.choice([1, 2, 3, 5, 10])
    N = rng.choice([1, 1, 2, 3])
    if rng.random() < 0.25:  # a group larger than any block: the multi-pass / split path
        spatial = [rng.choice([97, 129, 161])] * 2 if dims >= 2 else [rng.choice([4097, 9001])]
        spatial += [1] * (dims - len(spatial))
        C, groups = max(groups, 2) * 2, max(groups, 2)
    else:
        spatial = [rng.choice([1, 2, 3, 5, 7, 11, 13, 17, 31, 33, 65]) for _ in range(dims)]
    shape = (N, C, *spatial)
    layout = rng.choice(["contiguous", "contiguous", "channels_last", "strided"])
    activation = rng.choice([None, "silu", "gelu"])
    affine, modulate = rng.random() < 0.8, rng.random() < 0.5
    x = _strided_like(rng, (torch.randn(shape, device=device) * 2 + 0.5).to(dtype), layout)
    w = torch.randn(C, device=device).to(dtype) if affine else None
    b = torch.randn(C, device=device).to(dtype) if affine else None
    s = (0.5 * torch.randn(N, C, device=device)).to(dtype) if modulate else None
    t = torch.randn(N, C, device=device).to(dtype) if modulate else None
    args = (x, groups, w, b, 1e-5, activation, s, t)
    desc = (f"x{list(shape)} G{groups} {layout} act={activation}"
            + (" affine" if affine else "") + (" +scale/shift" if modulate else ""))
    return (desc,
            lambda be: [flashdiff.group_norm(*args, backend=be)],
            lambda up: [reference.group_norm(*args, upcast=up)])


def _attention_case(rng: random.Random, dtype, device):
    import flashdiff
    from . import reference

    B, H = rng.choice([1, 1, 2]), rng.choice([1, 2, 3])
    Sq = rng.choice([1, 7, 33, 64, 65, 77, 128, 129, 257])
    Skv = Sq if rng.random() < 0.4 else rng.choice([1, 5, 64, 65, 77, 129, 300])
    D = rng.choice([16, 32, 40, 64, 72, 80, 96, 128, 160, 256])
    layout = rng.choice(["contiguous", "bshd", "qkv-packed"])
    if layout == "qkv-packed" and Skv != Sq:
        layout = "bshd"

    def bhsd(S):
        t = torch.randn(B, S, H, D, device=device).to(dtype)
        return t.permute(0, 2, 1, 3) if layout == "bshd" else t.permute(0, 2, 1, 3).contiguous()

    if layout == "qkv-packed":  # views of one fused projection [B, S, 3, H, D]
        qkv = torch.randn(B, Sq, 3, H, D, device=device).to(dtype)
        q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    else:
        q, k, v = bhsd(Sq), bhsd(Skv), bhsd(Skv)
    mask_kind = rng.choice([None, None, "key-padding", "key-padding-empty-row", "additive"])
    mask = None
    if mask_kind and mask_kind.startswith("key-padding"):
        mask = torch.rand(B, 1, 1, Skv, device=device) < 0.7
        mask[..., 0] = True
        if mask_kind.endswith("empty-row"):
            mask[0] = False  # a sample whose keys are all padding: zeros out
    elif mask_kind == "additive":
        mask = torch.randn(1, H, Sq, Skv, device=device).to(dtype)
    desc = f"B{B} H{H} Sq{Sq} Skv{Skv} D{D} {layout} mask={mask_kind}"
    return (desc,
            lambda be: [flashdiff.attention(q, k, v, mask, backend=be)],
            lambda up: [reference.attention(q, k, v, mask, upcast=up)])


def _scheduler_case(rng: random.Random, dtype, device):
    import flashdiff
    from . import reference

    shape = rng.choice([(1,), (7, 3), (2, 4, 9, 7), (1, 4, 17, 19), (3, 4, 33, 33), (1, 16, 64, 65),
                        (2, 4, 64, 64)])
    channels_last = len(shape) == 4 and rng.random() < 0.3
    x, m, u, n, d = (_strided_like(rng, torch.randn(shape, device=device).to(dtype),
                                   "channels_last" if channels_last else "contiguous") for _ in range(5))
    family = rng.choice(["ddim", "ddpm", "flow-euler", "dpmpp-2m"])
    prediction = "epsilon" if family == "flow-euler" else rng.choice(["epsilon", "sample", "v_prediction"])
    cfg, noisy = rng.random() < 0.5, rng.random() < 0.5
    guidance = dict(model_output_uncond=u, guidance_scale=rng.uniform(1.5, 9.0)) if cfg else {}
    a_t = rng.uniform(0.05, 0.9)
    a_prev = min(a_t + rng.uniform(0.01, 0.3), 0.9999)
    if family == "ddim":
        kw = dict(eta=rng.choice([0.0, 0.5, 1.0]) if noisy else 0.0, noise=n if noisy else None,
                  prediction_type=prediction, clip_sample_range=rng.choice([None, 1.0, 1.5]),
                  use_clipped_model_output=rng.random() < 0.3, **guidance)
        op, ref, args = flashdiff.ddim_step, reference.ddim_step, (m, x, a_t, a_prev)
    elif family == "ddpm":
        kw = dict(noise=n if noisy else None, prediction_type=prediction,
                  variance_type=rng.choice(["fixed_small", "fixed_large"]),
                  clip_sample_range=rng.choice([None, 1.0]), **guidance)
        op, ref, args = flashdiff.ddpm_step, reference.ddpm_step, (m, x, a_t, a_prev)
    elif family == "flow-euler":
        sigma = rng.uniform(0.05, 1.0)
        kw = dict(noise=n if noisy else None, **guidance)
        op, ref, args = flashdiff.flow_euler_step, reference.flow_euler_step, (m, x, sigma, sigma * rng.uniform(0.5, 0.99))
    else:
        sigma = rng.uniform(0.3, 5.0)
        kw = dict(prediction_type=prediction, **guidance)
        if noisy:
            kw.update(sigma_prev=sigma * rng.uniform(1.1, 2.0), prev_x0=d)
        op, ref, args = flashdiff.dpmpp_2m_step, reference.dpmpp_2m_step, (m, x, sigma * rng.uniform(0.3, 0.9), sigma)
    desc = (f"{family} {prediction} {list(shape)}" + (" channels_last" if channels_last else "")
            + (" cfg" if cfg else "") + (" noise/2nd-order" if noisy else ""))
    return (desc,
            lambda be: list(op(*args, **kw, return_x0=True, backend=be)),
            lambda up: list(ref(*args, **kw, upcast=up)))


def _row_norm_x(rng: random.Random, shape, dtype, device):
    """x [..., D]: contiguous, a transposed view, or rows of a wider tensor."""
    layout = rng.choice(["contiguous", "contiguous", "transposed", "sliced"])
    x = (torch.randn(shape, device=device) * 2 + rng.choice([0.5, 0.5, 100.0])).to(dtype)
    if layout == "transposed" and x.dim() >= 2:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "sliced":
        x = torch.cat([x, x], dim=-1)[..., : shape[-1]]
    return x, layout


def _layer_norm_case(rng: random.Random, dtype, device):
    import flashdiff
    from . import reference

    D = rng.choice([1, 7, 64, 72, 128, 1152, 1536, 3072, 4097])
    N, T = rng.choice([1, 2, 3]), rng.choice([1, 3, 17, 64, 257])
    x, layout = _row_norm_x(rng, (N, T, D), dtype, device)
    mod = rng.choice([None, "sample", "sample", "token"])
    mshape = (N, D) if mod == "sample" else (N, T, D)
    s = (0.5 * torch.randn(mshape, device=device)).to(dtype) if mod else None
    t = torch.randn(mshape, device=device).to(dtype) if mod else None
    affine = rng.random() < 0.3
    w = torch.randn(D, device=device).to(dtype) if affine else None
    b = torch.randn(D, device=device).to(dtype) if affine else None
    activation = rng.choice([None, None, "silu", "gelu"])
    args = (x, (D,), w, b, 1e-6, s, t, activation)
    desc = (f"x{[N, T, D]} {layout} act={activation}" + (" affine" if affine else "")
            + (f" +scale/shift per {mod}" if mod else ""))
    return (desc,
            lambda be: [flashdiff.layer_norm(*args, backend=be)],
            lambda up: [reference.layer_norm(*args, upcast=up)])


def _rms_norm_case(rng: random.Random, dtype, device):
    import flashdiff
    from . import reference

    D = rng.choice([1, 7, 40, 64, 72, 128, 256, 3072, 4097])
    shape = rng.choice([(1,), (3,), (2, 5), (2, 3, 17), (1, 4, 33, 2)])[:-1] + (D,)
    x, layout = _row_norm_x(rng, shape, dtype, device)
    w = torch.randn(D, device=device).to(dtype) if rng.random() < 0.7 else None
    desc = f"x{list(shape)} {layout}" + (" weight" if w is not None else "")
    return (desc,
            lambda be: [flashdiff.rms_norm(x, w, 1e-6, backend=be)],
            lambda up: [reference.rms_norm(x, w, 1e-6, upcast=up)])


def _qk_norm_rope_case(rng: random.Random, dtype, device):
    import flashdiff
    from . import reference

    rope = rng.choice(["interleaved", "interleaved", "half", None])
    D = rng.choice([16, 18, 40, 64, 72, 80, 128, 256] + ([] if rope else [1, 7]))
    B, H, S = rng.choice([1, 2]), rng.choice([1, 2, 3]), rng.choice([1, 7, 33, 77, 129])
    Hk = rng.choice([H, 1])
    layout = rng.choice(["bshd", "bshd", "contiguous", "qkv-packed"])
    if layout == "qkv-packed":  # views of one fused projection [B, S, 3, H, D], as Flux's to_qkv
        qkv = torch.randn(B, S, 3, H, D, device=device).to(dtype)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1, :Hk].transpose(1, 2)
    else:
        q, k = (torch.randn(B, S, h, D, device=device).to(dtype).transpose(1, 2) for h in (H, Hk))
        if layout == "contiguous":
            q, k = q.contiguous(), k.contiguous()
    weights = rng.random() < 0.8
    qw, kw = ((torch.randn(D, device=device).to(dtype), torch.randn(D, device=device).to(dtype))
              if weights else (None, None))
    cos = sin = None
    if rope:
        angles = torch.randn(S, D, device=device) * 3
        cos, sin = torch.cos(angles), torch.sin(angles)
    args = (q, k, qw, kw, cos, sin, 1e-6, rope != "half")
    desc = f"q[{B}, {H}, {S}, {D}] Hk{Hk} {layout} rope={rope}" + (" weights" if weights else "")
    return (desc,
            lambda be: list(flashdiff.qk_norm_rope(*args, backend=be)),
            lambda up: list(reference.qk_norm_rope(*args, upcast=up)))


GENERATORS: Dict[str, Callable] = {"attention": _attention_case, "group_norm": _group_norm_case,
                                   "layer_norm": _layer_norm_case, "rms_norm": _rms_norm_case,
                                   "qk_norm_rope": _qk_norm_rope_case, "scheduler": _scheduler_case}


# ------------------------------------------------------------------ running
def device_backends(wanted: Optional[Sequence[str]] = None) -> Tuple[List[Tuple[str, str]], Dict[str, str]]:
    """([(device, backend)] to validate here, {backend: why it is not}) for the usable backends,
    each on the device it serves (the Triton interpreter on a CPU only when TRITON_INTERPRET=1)."""
    import flashdiff

    from .backends import variant_names

    status = flashdiff.backend_status()
    pairs, missing = [], {}
    cuda = torch.cuda.is_available()
    # Variants ("cuda:onepass", "torch:cudnn", ...) are what a dispatch table may pick on a GPU:
    # validated there beside their backend (an op without the variant declines it).
    default = ("reference", "torch", "cpu", "triton", "cuda") + (tuple(variant_names()) if cuda else ())
    for be in (wanted or default):
        base = be.split(":")[0]
        if status.get(base, f"unknown backend {be!r}") is not None:
            missing[be] = status.get(base) or f"unknown backend {be!r}"
            continue
        if ":" in be:
            if cuda:
                pairs.append(("cuda", be))
        elif be in ("reference", "torch"):
            pairs.append(("cpu", be))
            if cuda:
                pairs.append(("cuda", be))
        elif be == "cpu":
            pairs.append(("cpu", be))
        elif be == "triton":
            pairs.append(("cuda", be) if cuda else ("cpu", be))  # cpu: interpreter, status allowed it
        elif be == "cuda" and cuda:
            pairs.append(("cuda", be))
    return pairs, missing


def _one_check(op: str, backend: str, device: str, dtype, rng: random.Random) -> Check:
    from .testing import compare, poisoned_outputs

    name = DTYPE_NAME[dtype]
    try:
        desc, run, ref = GENERATORS[op](rng, dtype, device)
    except Exception as err:  # noqa: BLE001 - a broken generator is a failure of validate itself
        return Check(op, backend, device, name, "?", "error", detail=f"case generation: {err!r}")
    try:
        with poisoned_outputs(), torch.no_grad():
            outs = run(backend)
    except NotImplementedError as err:
        return Check(op, backend, device, name, desc, "declined", detail=str(err).split(": ", 2)[-1][:160])
    except Exception as err:  # noqa: BLE001 - any crash of a backend is a failure
        return Check(op, backend, device, name, desc, "error", detail=f"{type(err).__name__}: {err}"[:300])
    with torch.no_grad():
        refs64, refs_d = ref(True), ref(False)
    worst, details, ok = 0.0, [], True
    for i, (y, r64, rd) in enumerate(zip(outs, refs64, refs_d)):
        try:
            c = compare(y, r64, rd, dtype)
        except AssertionError as err:  # wrong shape
            return Check(op, backend, device, name, desc, "FAIL", math.inf, str(err))
        if not (isinstance(y, torch.Tensor) and y.dtype == dtype):
            ok = False
            details.append(f"output {i} has dtype {getattr(y, 'dtype', type(y).__name__)}, expected {dtype}")
        worst = max(worst, c.ratio if math.isfinite(c.ratio) else math.inf)
        if not c.ok:
            ok = False
            details.append(f"output {i}: {c}")
    return Check(op, backend, device, name, desc, "pass" if ok else "FAIL", worst, "; ".join(details)[:400])


def run(ops: Sequence[str] = OPS, backends: Optional[Sequence[str]] = None,
        dtypes: Sequence[str] = tuple(DTYPES), cases: int = 4, seed: Optional[int] = None,
        verbose: bool = True, out=None, json_path: Optional[str] = None) -> Tuple[int, List[Check]]:
    """Run the checks; returns (exit status, checks). Status 1 on any failure or error, 2 when
    nothing could be checked. json_path: also write every check there."""
    status, checks, seed = _run(ops, backends, dtypes, cases, seed, verbose, out or sys.stdout)
    if json_path:
        write_json(checks, status, json_path, seed)
    return status, checks


def _run(ops, backends, dtypes, cases, seed, verbose, out):
    seed = int(time.time() * 1000) % 2**31 if seed is None else seed
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pairs, missing = device_backends(backends)
    print(f"flashdiff validate: seed {seed} (rerun with --seed {seed}); torch {torch.__version__}; "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}", file=out)
    for be, why in missing.items():
        print(f"  backend {be}: not validated: {why}", file=out)
    checks: List[Check] = []
    for op in ops:
        if op not in GENERATORS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        for device, backend in pairs:
            for dt in dtypes:
                for _ in range(cases):
                    c = _one_check(op, backend, device, DTYPES[dt], rng)
                    checks.append(c)
                    if verbose or c.status in ("FAIL", "error"):
                        ratio = f"{c.ratio:6.3f}" if c.ratio is not None and math.isfinite(c.ratio) else \
                            ("   inf" if c.ratio is not None else "     —")
                        print(f"  {c.status:8s} ratio {ratio}  {op:12s} {backend:9s} {device:4s} {dt:4s}  {c.case}"
                              + (f"  [{c.detail}]" if c.detail and c.status != "pass" else ""), file=out)
    print(format_summary(checks), file=out)
    failed = sum(c.status in ("FAIL", "error") for c in checks)
    passed = sum(c.status == "pass" for c in checks)
    if failed:
        print(f"FAILED: {failed} of {len(checks)} checks (seed {seed})", file=out)
        return 1, checks, seed
    if passed == 0:
        print("nothing was checked: no usable backend served any case", file=out)
        return 2, checks, seed
    print(f"OK: {passed} checks passed, {len(checks) - passed} declined (seed {seed})", file=out)
    return 0, checks, seed


def format_summary(checks: List[Check]) -> str:
    groups: Dict[tuple, List[Check]] = {}
    for c in checks:
        groups.setdefault((c.op, c.backend, c.device), []).append(c)
    lines = ["", f"{'op':12s} {'backend':9s} {'device':6s} {'pass':>5s} {'fail':>5s} {'declined':>8s} {'worst ratio':>11s}"]
    for (op, be, dev), cs in groups.items():
        ratios = [c.ratio for c in cs if c.ratio is not None]
        worst = max(ratios) if ratios else None
        lines.append(f"{op:12s} {be:9s} {dev:6s} {sum(c.status == 'pass' for c in cs):5d} "
                     f"{sum(c.status in ('FAIL', 'error') for c in cs):5d} "
                     f"{sum(c.status == 'declined' for c in cs):8d} "
                     f"{('%.3f' % worst) if worst is not None and math.isfinite(worst) else ('inf' if worst else '—'):>11s}")
    return "\n".join(lines)


def write_json(checks: List[Check], status: int, path: str, seed: Optional[int] = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    summary = {}
    for c in checks:
        s = summary.setdefault(f"{c.op}/{c.backend}/{c.device}", {"pass": 0, "fail": 0, "declined": 0,
                                                                    "worst_ratio": 0.0})
        s["fail" if c.status in ("FAIL", "error") else c.status] += 1
        if c.ratio is not None:
            s["worst_ratio"] = max(s["worst_ratio"], c.ratio)
    with open(path, "w") as f:
        json.dump({"status": status, "seed": seed, "torch": torch.__version__, "summary": summary,
                   "checks": [asdict(c) for c in checks]}, f, indent=1, default=str)
