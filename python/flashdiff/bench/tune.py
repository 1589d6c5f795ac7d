"""`flashdiff tune`: measure every backend that can serve each op over shape classes that cover
diffusion models, and write the dispatch table auto reads (flashdiff.dispatch_table).

Shape classes come from the model presets (SD 1.5, SDXL, DiT-XL/2, Flux, SD3) at batch 1 and 8;
attention also with a key-padding mask, group norm also channels_last, layer norm also without
the adaLN modulation, the update also without guidance. Each implementation is timed with the bench harness (bench.timing.measure:
do_bench on CUDA, L2 flushed) on the same inputs, and its output is compared with the torch
backend's: an implementation that disagrees is recorded as failed and never chosen.

    flashdiff tune --quick              # ~2-3 minutes on an H200; writes ~/.cache/flashdiff/...
    flashdiff tune --out table.json     # also copy the table there
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import dispatch_table, presets as P
from .core import DTYPES, EPS, _first_line, triton_tuning
from .machine import git_commit
from .timing import measure

# Cheapest first: the fair share of a time budget then carries what the update and the norms
# leave over to attention, whose Triton configs compile on first use.
TUNE_OPS = ("scheduler_update", "group_norm", "layer_norm", "rms_norm", "attention")
_PRESET_OP = {"attention": "attention", "group_norm": "group_norm", "layer_norm": "layer_norm",
              "rms_norm": "rms_norm", "scheduler_update": "scheduler"}


def _candidates(op: str) -> List[str]:
    from ..backends import REGISTRY

    impls = REGISTRY[op][0].impls
    return [name for name in impls if name.split(":")[0] in ("torch", "triton", "cuda", "cpu")]


# ------------------------------------------------------------------ classes (inputs + a call per impl)
def _attention_inputs(s: P.AttentionShape, dtype, device, masked: bool, g):
    q = torch.randn(s.B, s.H, s.Sq, s.D, device=device, dtype=dtype, generator=g)
    k = torch.randn(s.B, s.H, s.Skv, s.D, device=device, dtype=dtype, generator=g)
    v = torch.randn(s.B, s.H, s.Skv, s.D, device=device, dtype=dtype, generator=g)
    mask = None
    if masked:  # key padding: the shape's padded keys, else the last ~1/8 of every sample's keys
        keep = max(1, s.Skv - (s.masked_keys or s.Skv // 8))
        mask = (torch.arange(s.Skv, device=device) < keep).reshape(1, 1, 1, s.Skv).expand(s.B, 1, 1, s.Skv)
    return {"q": q, "k": k, "v": v, "attn_mask": mask}


def _norm_inputs(s: P.NormShape, dtype, device, g):
    N, C = s.shape[:2]
    x = (torch.randn(s.shape, device=device, generator=g) * 2 + 0.5).to(dtype)
    if s.channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    w = torch.randn(C, device=device, generator=g).to(dtype)
    b = torch.randn(C, device=device, generator=g).to(dtype)
    sc = (0.5 * torch.randn(N, C, device=device, generator=g)).to(dtype) if s.modulate else None
    sh = torch.randn(N, C, device=device, generator=g).to(dtype) if s.modulate else None
    return {"x": x, "num_groups": s.groups, "weight": w, "bias": b, "scale": sc, "shift": sh,
            "activation": s.activation}


def _row_norm_inputs(op: str, s: P.RowNormShape, dtype, device, g):
    """layer_norm: adaLN without affine, [N, D] scale/shift when modulated (the chunks models
    pass); rms_norm: a [D] weight."""
    N, D = s.shape[0], s.shape[-1]
    x = (torch.randn(s.shape, device=device, generator=g) * 2 + 0.5).to(dtype)
    inp = {"x": x, "weight": None, "scale": None, "shift": None}
    if op == "rms_norm":
        inp["weight"] = torch.randn(D, device=device, generator=g).to(dtype)
    elif s.modulate:
        inp["shift"], inp["scale"] = torch.randn(N, 2 * D, device=device, generator=g).to(dtype).chunk(2, dim=1)
    return inp


def _step_inputs(s: P.StepShape, dtype, device, g):
    import flashdiff

    mk = lambda: torch.randn(s.shape, device=device, generator=g).to(dtype)  # noqa: E731
    coefs = flashdiff.ddim_coefs(0.35, 0.52, guidance_scale=7.5 if s.cfg else 1.0, device=device)
    return {"sample": mk(), "model_output": mk(), "coefs": coefs, "model_output_uncond": mk() if s.cfg else None}


def _call(op: str, impl: Callable, inp: dict) -> Callable[[], torch.Tensor]:
    """A zero-argument call of one implementation (no public-API checks: the same for every
    implementation, so it does not change which is fastest)."""
    if op == "attention":
        scale = 1.0 / math.sqrt(inp["q"].shape[-1])
        return lambda: impl(inp["q"], inp["k"], inp["v"], inp["attn_mask"], scale)[0]
    if op == "group_norm":
        act = inp["activation"] or "none"
        return lambda: impl(inp["x"], inp["num_groups"], inp["weight"], inp["bias"], EPS, act,
                            inp["scale"], inp["shift"], stats=False)[0]
    if op == "layer_norm":  # the row norms' implementations return y itself
        return lambda: impl(inp["x"], None, None, EPS, inp["scale"], inp["shift"], "none")
    if op == "rms_norm":
        return lambda: impl(inp["x"], inp["weight"], EPS)
    return lambda: impl(inp["sample"], inp["model_output"], inp["coefs"], inp["model_output_uncond"],
                        None, None, False)[0]


def _features(op: str, inp: dict) -> dict:
    if op == "attention":
        return dispatch_table.attention_features(inp["q"], inp["k"], inp["attn_mask"])
    if op == "group_norm":
        return dispatch_table.group_norm_features(inp["x"], inp["num_groups"], inp["scale"], inp["activation"])
    if op in ("layer_norm", "rms_norm"):  # the op's own features (ops/layer_norm.py rows_features)
        from ..backends import REGISTRY

        return REGISTRY[op][0].features(**_support_inputs(op, inp))
    return dispatch_table.scheduler_features(inp["sample"], inp["model_output_uncond"])


def _support_inputs(op: str, inp: dict) -> dict:
    if op == "attention":
        return {k: inp[k] for k in ("q", "k", "v", "attn_mask")}
    if op == "group_norm":
        return {k: inp[k] for k in ("x", "num_groups", "scale", "activation")}
    if op == "layer_norm":
        return {k: inp[k] for k in ("x", "scale", "shift")}
    if op == "rms_norm":
        return {"x": inp["x"]}
    return {"sample": inp["sample"], "model_output_uncond": inp["model_output_uncond"]}


def shape_classes(op: str, quick: bool, device: str, preset_names: Optional[Sequence[str]] = None,
                  batches: Optional[Sequence[int]] = None) -> List[Tuple[str, Callable]]:
    """[(label, make_inputs(dtype, device, generator))] for one op."""
    names = list(preset_names or (P.MODEL_PRESETS if device == "cuda" else ["tiny"]))
    out: List[Tuple[str, Callable]] = []
    seen = set()
    for name, b, s in P.expand(names, _PRESET_OP[op], batches):
        if s in seen:
            continue
        seen.add(s)
        if op == "attention":
            out.append((str(s), lambda dt, dev, g, s=s: _attention_inputs(s, dt, dev, bool(s.masked_keys), g)))
            if not s.masked_keys and (not quick or b == 1):  # masks: every class in a full tune, batch 1 in a quick one
                out.append((f"{s} +mask", lambda dt, dev, g, s=s: _attention_inputs(s, dt, dev, True, g)))
        elif op == "group_norm":
            out.append((str(s), lambda dt, dev, g, s=s: _norm_inputs(s, dt, dev, g)))
            if not s.channels_last and not s.modulate and (not quick or b == 1):
                cl = P.NormShape(s.shape, s.groups, s.activation, s.modulate, s.label, channels_last=True)
                out.append((str(cl), lambda dt, dev, g, s=cl: _norm_inputs(s, dt, dev, g)))
        elif op in ("layer_norm", "rms_norm"):
            out.append((str(s), lambda dt, dev, g, s=s, op=op: _row_norm_inputs(op, s, dt, dev, g)))
            if op == "layer_norm" and s.modulate and (not quick or b == 1):  # plain LayerNorm rows too
                plain = P.RowNormShape(s.shape, False, s.label)
                out.append((str(plain), lambda dt, dev, g, s=plain: _row_norm_inputs(op, s, dt, dev, g)))
        else:
            out.append((str(s), lambda dt, dev, g, s=s: _step_inputs(s, dt, dev, g)))
            if s.cfg:
                plain = P.StepShape(s.shape, s.family, False, s.label)
                out.append((str(plain), lambda dt, dev, g, s=plain: _step_inputs(s, dt, dev, g)))
    return out


# ------------------------------------------------------------------ measuring
def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().float(), ref.detach().float()
    if y.shape != ref.shape:
        return math.inf
    both_nan = y.isnan() & ref.isnan()
    diff = (y - ref).abs().masked_fill(both_nan, 0)
    err = float(diff.max()) if diff.numel() else 0.0
    scale = float(ref.abs().nan_to_num(0).max()) if ref.numel() else 0.0
    return err / max(scale, 1e-6) if math.isfinite(err) else math.inf


def tune_class(op: str, label: str, inp: dict, device: torch.device, quick: bool, say) -> dict:
    """Time every implementation on one class's inputs; the torch output is the yardstick."""
    from ..backends import REGISTRY

    dispatch = REGISTRY[op][0]
    dtype = next(v for v in inp.values() if isinstance(v, torch.Tensor)).dtype
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    times: Dict[str, Optional[float]] = {}
    notes: Dict[str, str] = {}
    expected = None
    for impl_name in _candidates(op):
        backend = impl_name.split(":")[0]
        why = dispatch.reason(backend, device, _support_inputs(op, inp))
        if why is not None:
            notes[impl_name] = why
            continue
        fn = _call(op, dispatch.impls[impl_name], inp)
        try:
            with torch.inference_mode():
                out = fn()
                if expected is None and backend == "torch":
                    expected = out
                elif expected is not None:
                    err = _rel_error(out, expected)
                    if err > tol:
                        times[impl_name] = None
                        notes[impl_name] = f"output differs from torch's (relative error {err:.3g} > {tol})"
                        continue
                del out
                t = measure(fn, device.type, quick)
        except Exception as err:  # noqa: BLE001 - a failing implementation is a result, not the end
            times[impl_name] = None
            notes[impl_name] = f"failed: {_first_line(err)}"
            if device.type == "cuda":
                torch.cuda.synchronize()
            continue
        times[impl_name] = round(t.median_ms, 5)
    ranked = sorted(((k, v) for k, v in times.items() if v is not None), key=lambda kv: kv[1])
    entry = {"features": _features(op, inp), "shape": label, "times_ms": times}
    if notes:
        entry["notes"] = notes
    if ranked:
        entry["best"] = ranked[0][0]
        tt = min((v for k, v in ranked if k.startswith("torch")), default=None)
        if tt is not None:
            entry["best_vs_torch"] = round(tt / ranked[0][1], 3)
    say(f"  {label:40s} " + ", ".join(f"{k} {v * 1e3:.1f}us" for k, v in ranked)
        + (f"  -> {ranked[0][0]}" if ranked else "  -> nothing ran")
        + "".join(f"\n      {k}: {v}" for k, v in notes.items() if times.get(k, 0) is None))
    return entry


def _device_identity(device: torch.device) -> dict:
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return {"name": torch.cuda.get_device_name(idx), "capability": list(torch.cuda.get_device_capability(idx))}
    from .machine import _cpu_name

    return {"name": _cpu_name(), "capability": [0, 0]}


def _versions() -> dict:
    import flashdiff

    v = {"torch": torch.__version__, "cuda": torch.version.cuda, "flashdiff": flashdiff.__version__}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    return v


def run_tune(quick: bool = False, device: Optional[str] = None, ops: Sequence[str] = TUNE_OPS,
             dtypes: Sequence[str] = ("bf16",), presets: Optional[Sequence[str]] = None,
             batches: Optional[Sequence[int]] = None, time_budget_s: Optional[float] = None,
             out: Optional[str] = None, install: bool = True, say=None,
             precompile_workers: Optional[int] = None) -> dict:
    """Measure and return the table; with `install`, write it to the user cache dir (CUDA)
    and make auto use it at once. `out`: also write it there (after every op, so a time-out
    keeps what was measured). On CUDA the Triton attention kernels are first compiled in
    parallel by `precompile_workers` processes (default: one per core up to 16; 0: off)."""
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    t0 = time.perf_counter()
    ident = _device_identity(dev)
    table = {"schema": dispatch_table.SCHEMA, "device": ident, "versions": _versions(),
             "created": datetime.date.today().isoformat(), "commit": git_commit()["commit"],
             "source": "flashdiff tune" + (" --quick" if quick else ""), "entries": {}}
    say(f"flashdiff tune on {ident['name']} (torch {torch.__version__}); "
        f"{'quick' if quick else 'full'}, dtypes {', '.join(dtypes)}")
    g = torch.Generator(device=dev).manual_seed(0)
    bad = [op for op in ops if op not in TUNE_OPS]
    if bad:
        raise ValueError(f"op must be one of {TUNE_OPS}, got {bad}")
    if dev.type == "cuda" and "attention" in ops and precompile_workers != 0 and _triton_loads():
        from .precompile import precompile

        # at most half the budget: what is not warmed by then, the tuner compiles itself
        precompile(quick, dtypes, presets, batches, precompile_workers, say=say,
                   time_budget_s=None if time_budget_s is None else time_budget_s / 2)
    with triton_tuning(dev.type == "cuda"):  # Triton configs are tuned here, stored in the table
        for i, op in enumerate(ops):
            entries = table["entries"].setdefault(op, [])
            say(f"{op}:")
            deadline = math.inf  # each op gets a fair share of what is left of the budget
            if time_budget_s is not None:
                left = time_budget_s - (time.perf_counter() - t0)
                deadline = time.perf_counter() + left / (len(ops) - i)
            for dt in dtypes:
                for label, make in shape_classes(op, quick, dev.type, presets, batches):
                    if time.perf_counter() > deadline:
                        table.setdefault("skipped", []).append(f"{op} {label} {dt}: time budget spent")
                        continue
                    try:
                        inp = make(DTYPES[dt], dev, g)
                    except RuntimeError as err:  # out of memory on a small card
                        say(f"  {label}: skipped ({_first_line(err)})")
                        continue
                    entries.append(tune_class(op, f"{label} {dt}", inp, dev, quick, say))
                    del inp
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
            table["triton_configs"] = _triton_configs()
            table["wall_s"] = round(time.perf_counter() - t0, 1)
            if out:
                _write(table, out)
    if table.get("skipped"):
        say(f"time budget ({time_budget_s:.0f} s) spent: {len(table['skipped'])} classes not measured")
    if install and dev.type == "cuda":
        path = os.path.join(dispatch_table.cache_dir(),
                            dispatch_table.table_filename(ident["name"], ident["capability"]))
        _write(table, path)
        dispatch_table.reload()
        say(f"wrote {path} (auto uses it from now on)")
    say(f"tune took {table['wall_s']} s")
    return table


def _triton_loads() -> bool:
    from .. import _ext

    return _ext.load_triton()[0] is not None


def _triton_configs() -> dict:
    """The Triton attention configs chosen while tuning (seeded back when the table loads)."""
    from .. import _ext

    module = _ext.load_triton()[0]
    get = getattr(getattr(module, "attention", None), "tuned_configs", None)
    return {"attention": get()} if get is not None else {}


def _write(table: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
    os.replace(tmp, path)


def summary(table: dict) -> str:
    """One line per op: classes measured, how often each implementation won, and the range
    of the winner's speed over torch's."""
    lines = []
    for op, entries in table.get("entries", {}).items():
        wins: Dict[str, int] = {}
        ratios = [e["best_vs_torch"] for e in entries if "best_vs_torch" in e]
        for e in entries:
            if "best" in e:
                wins[e["best"]] = wins.get(e["best"], 0) + 1
        won = ", ".join(f"{k} {v}" for k, v in sorted(wins.items(), key=lambda kv: -kv[1]))
        rng = f"; winner vs torch {min(ratios):.2f}-{max(ratios):.2f}x" if ratios else ""
        lines.append(f"{op}: {len(entries)} classes; fastest: {won}{rng}")
    return "\n".join(lines)


# ------------------------------------------------------------------ a table from a bench results file
# Which bench row measured which implementation: the baselines that are exactly what a torch
# implementation runs (SDPA restricted to one kernel; the eager group norm and update).
_ROW_IMPL = {
    "attention": {"sdpa cudnn": "torch:cudnn", "sdpa flash": "torch:flash", "sdpa efficient": "torch:efficient",
                  "triton": "triton", "cuda": "cuda"},
    "group_norm": {"torch eager": "torch", "triton": "triton", "cuda": "cuda"},
    "scheduler": {"torch eager": "torch", "triton": "triton", "cuda": "cuda"},
}
_BENCH_OP = {"attention": "attention", "group_norm": "group_norm", "scheduler": "scheduler_update"}


def _meta_inputs(op: str, s, dtype) -> dict:
    """Inputs of a preset shape on the meta device (the features read shapes and layouts only)."""
    if op == "attention":
        q = torch.empty(s.B, s.H, s.Sq, s.D, dtype=dtype, device="meta")
        k = torch.empty(s.B, s.H, s.Skv, s.D, dtype=dtype, device="meta")
        mask = torch.empty(s.B, 1, 1, s.Skv, dtype=torch.bool, device="meta") if s.masked_keys else None
        return {"q": q, "k": k, "v": k, "attn_mask": mask}
    if op == "group_norm":
        x = torch.empty(s.shape, dtype=dtype, device="meta")
        if s.channels_last:
            x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        N, C = s.shape[:2]
        sc = torch.empty(N, C, dtype=dtype, device="meta") if s.modulate else None
        return {"x": x, "num_groups": s.groups, "scale": sc, "activation": s.activation}
    x = torch.empty(s.shape, dtype=dtype, device="meta")
    return {"sample": x, "model_output_uncond": x if s.cfg else None}


def table_from_results(result: dict, source: str) -> dict:
    """A dispatch table from a `flashdiff bench` results file of a GPU run: per op case, the
    times of the rows that measured an implementation (`_ROW_IMPL`), rows whose sanity check
    failed left out. The table says where it came from; `flashdiff tune` on that GPU replaces
    it with a direct measurement."""
    meta = result.get("meta", {})
    if meta.get("device") != "cuda" or not meta.get("card"):
        raise ValueError(f"{source}: not a GPU run (meta.device={meta.get('device')!r})")
    sm = str(meta.get("card_sm") or "00")
    table = {"schema": dispatch_table.SCHEMA,
             "device": {"name": meta["card"], "capability": [int(sm[:-1]), int(sm[-1])]},
             "versions": {"torch": meta.get("torch"), "triton": meta.get("triton"),
                          "cuda": meta.get("cuda_runtime"), "flashdiff": meta.get("flashdiff")},
             "created": str(meta.get("date", ""))[:10], "commit": meta.get("git_commit"),
             "source": f"derived from {source} (flashdiff bench rows; see bench/tune.py::_ROW_IMPL)",
             "entries": {}}
    cases: Dict[tuple, Dict[str, float]] = {}
    for r in result.get("results", []):
        impl = _ROW_IMPL.get(r["op"], {}).get(r["backend"])
        if impl is None or "median_ms" not in r or r.get("check") == "MISMATCH":
            continue
        cases.setdefault((r["op"], r["preset"], r["batch"], r["shape"], r["dtype"]), {})[impl] = round(r["median_ms"], 5)
    for (op, preset, batch, shape, dt), times in cases.items():
        found = [s for _, _, s in P.expand([preset], op, [batch]) if str(s) == shape]
        if not found:
            continue
        inp = _meta_inputs(op, found[0], DTYPES[dt])
        tune_op = _BENCH_OP[op]
        ranked = sorted(times.items(), key=lambda kv: kv[1])
        entry = {"features": _features(tune_op, inp), "shape": f"{shape} {dt} ({preset} b{batch})",
                 "times_ms": times, "best": ranked[0][0]}
        tt = min((v for k, v in ranked if k.startswith("torch")), default=None)
        if tt is not None:
            entry["best_vs_torch"] = round(tt / ranked[0][1], 3)
        table["entries"].setdefault(tune_op, []).append(entry)
    return table
