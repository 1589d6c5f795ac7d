"""Offline sm_90 compiles of every shipped Triton attention config: no GPU needed.

For each kernel's default config (triton_kernels/attention.py's candidate table, first entry
per op and head-dim tier; attention_v2's per head dim; the merge kernel) this compiles the
kernel for GPUTarget("cuda", 90, 32) with the installed Triton, all the way to a cubin (Triton
ships ptxas), and checks:
  * it compiles (a config that fails here would fail on the first H100/H200 launch);
  * the PTX uses wgmma where Hopper's warpgroup MMA is expected: fp16/bf16 dots whose tile has
    ≥ 64 rows (M of the dot: BLOCK_M for fwd/dq, BLOCK_N for dkdv) with 4 or 8 warps;
  * the PTX uses TMA (cp.async.bulk.tensor) exactly where the config says so: the descriptor
    path of v2 ("fwd_tma", the dispatch variant "triton:tma"), with mbarrier waits (pipelined);
    the pointer path has none;
  * registers and stack bytes (spills land there), read from the cubin with cuobjdump
    (Triton's own n_regs/n_spills are filled only when a driver loads the binary); printed as
    a table (`pytest -s`), not asserted.

Compiles run in a subprocess without TRITON_INTERPRET (conftest sets it for the CPU tests, and
interpreted kernels cannot be compiled). The bf16 forward configs run by default (seconds);
the full sweep (every dtype, backward kernels) is marked `slow`.
Run it alone: `python tests/test_offline_compile.py [--all]` prints the table.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

HEAD_DIMS = (16, 32, 40, 64, 72, 80, 96, 128, 160, 256)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ================================================================== the worker (no pytest state)
def _kernel_modules():
    try:
        from flashdiff.triton_kernels import attention, attention_v2, merge_attention
    except ImportError:  # not installed: the source tree
        sys.path[:0] = [os.path.join(ROOT, "python"), ROOT]
        from triton_kernels import attention, attention_v2, merge_attention
    return attention, attention_v2, merge_attention


_ELEM = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
_DATA_PTRS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "O0", "O1", "O2", "O3", "OUT"}
_F32_PTRS = {"LSE", "DELTA", "L0", "L1", "L2", "L3", "LSE_OUT"}
_UNIT_STRIDES = re.compile(r"^(stride_\w*d|stride_mn|s\dd)$")  # last-dim strides: 1 at run time


def _compile(jit_fn, dtype, constexprs, num_warps, num_stages, aligned_rows, descs=None):
    """triton.compile of one specialisation for sm_90, like a launch with contiguous inputs
    (16-byte aligned pointers, last-dim strides 1, row strides divisible by 16 where
    aligned_rows); descs = {argument name: block shape} for host tensor-descriptor arguments.
    Returns (ptx, cubin bytes, shared bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    elem = _ELEM[dtype]
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(jit_fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif descs and name in descs:
            sig[name] = f"tensordesc<{elem}[{','.join(map(str, descs[name]))}]>"
        elif name in _DATA_PTRS:
            sig[name] = f"*{elem}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _F32_PTRS:
            sig[name] = "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "MASK":
            sig[name] = "*u8"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif _UNIT_STRIDES.match(name):
            sig[name], consts[name] = "constexpr", 1
        elif name in ("qk_scale", "scale"):
            sig[name] = "fp32"
        else:  # sizes and other strides
            sig[name] = "i32"
            if aligned_rows and (name.startswith("stride_") or re.match(r"^s\d[bhs]$|^so_", name)):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(jit_fn, sig, consts, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    return k.asm["ptx"], k.asm.get("cubin"), getattr(k.metadata, "shared", None)


def _resources(cubin):
    """(registers, spill bytes) of a cubin, from cuobjdump's resource usage; (None, None) when
    no cuobjdump is found (Triton's wheel ships one next to ptxas)."""
    import triton
    tool = shutil.which("cuobjdump") or os.path.join(os.path.dirname(triton.__file__),
                                                     "backends", "nvidia", "bin", "cuobjdump")
    if cubin is None or not os.path.exists(tool):
        return None, None
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    spill = None if not (stack or local) else max(int(m.group(1)) for m in (stack, local) if m)
    return (int(regs.group(1)) if regs else None), spill


def _cases(full):
    """(label, dtype, make) for every shipped default; make() -> compile arguments."""
    attention, attention_v2, merge_attention = _kernel_modules()
    import torch
    dtypes = ("bfloat16", "float16", "float32") if full else ("bfloat16",)
    ops = ("fwd", "dkdv", "dq") if full else ("fwd",)
    cases = []
    kernels = {"fwd": attention._attention_fwd_kernel.fn, "dkdv": attention._attention_bwd_dkdv_kernel,
               "dq": attention._attention_bwd_dq_kernel}
    for dtype in dtypes:
        tdt = getattr(torch, dtype)
        for op in ops:
            seen = set()
            for d in HEAD_DIMS:
                block_d = attention._block_d(d)
                cfg = attention._CANDIDATES[op][attention._tier(block_d, tdt)][0]
                if (block_d, tuple(cfg.values())) in seen:
                    continue  # one compile per BLOCK_D: D itself is a run-time argument in v1
                seen.add((block_d, tuple(cfg.values())))
                consts = dict(HAS_MASK=True, DOT_F32=False, PRECISION=attention._precision(tdt),
                              BLOCK_D=block_d, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
                if op == "fwd":
                    consts["MASK_N"] = True  # the tail-masked variant: the larger one
                rows = cfg["BLOCK_N"] if op == "dkdv" else cfg["BLOCK_M"]
                cases.append(dict(label=f"v1 {op} d{block_d}", dtype=dtype, fn=kernels[op], consts=consts,
                                  cfg=cfg, rows=rows, aligned=True))
        cands = attention._CANDIDATES[attention_v2.OP]
        for d in HEAD_DIMS:
            pieces = attention_v2.head_dim_pieces(d)
            dp = sum(pieces)
            for op, tma in ((attention_v2.OP, False), (attention_v2.OP_TMA, True)):
                if tma and dtype == "float16":
                    continue  # the same code as bf16 (the sweep's time goes to what differs)
                cfg = attention.default_config(op, tdt, dp)
                consts = dict(HEAD_D=d, D0=pieces[0], D1=pieces[1], D2=pieces[2], BLOCK_D=dp, NEG_SCALE=False,
                              HAS_MASK=True, DOT_F32=False, PRECISION=attention._precision(tdt),
                              BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], TAIL_N=True, USE_DESC=tma)
                descs = {}
                for j, p in enumerate(pieces):  # absent pieces, and every piece of the pointer path: None
                    for t in "QKVO":
                        if tma and p:
                            descs[f"{t}D{j}"] = [1, 1, cfg["BLOCK_N" if t in "KV" else "BLOCK_M"], p]
                        else:
                            consts[f"{t}D{j}"] = None
                cases.append(dict(label=f"v2{'tma' if tma else ''} fwd hd{d}", dtype=dtype,
                                  fn=attention_v2._attention_fwd_v2_kernel.fn, consts=consts, cfg=cfg,
                                  rows=cfg["BLOCK_M"], aligned=d % 16 == 0, descs=descs, tma=tma))
    if full:
        cases.append(dict(label="merge n4 d128", dtype="bfloat16", fn=merge_attention._merge_attention_kernel,
                          consts=dict(N=4, BLOCK_R=32, BLOCK_D=128), cfg=dict(num_warps=4, num_stages=1),
                          rows=0, aligned=True))
    return cases


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()


def _run_case(case):
    cfg = case["cfg"]
    try:
        ptx, cubin, shared = _compile(case["fn"], case["dtype"], case["consts"], cfg["num_warps"],
                                      cfg["num_stages"], case["aligned"], case.get("descs"))
    except Exception as err:  # reported, and the test fails on it
        return dict(label=case["label"], dtype=case["dtype"], error=f"{type(err).__name__}: {err}"[:400])
    regs, spill = _resources(cubin)
    half = case["dtype"] in ("float16", "bfloat16")
    return dict(label=case["label"], dtype=case["dtype"], error=None,
                config=[cfg.get("BLOCK_M"), cfg.get("BLOCK_N"), cfg["num_warps"], cfg["num_stages"]],
                wgmma="wgmma" in ptx, expect_wgmma=half and case["rows"] >= 64 and cfg["num_warps"] in (4, 8),
                cp_async="cp.async" in ptx, regs=regs, spill=spill, shared=shared,
                tma=ptx.count("cp.async.bulk.tensor"), mbarrier_waits=len(re.findall(r"mbarrier\.try_wait", ptx)),
                expect_tma=bool(case.get("tma")))


def _run_case_by_index(args):  # picklable entry for the pool (cases hold functions)
    full, i = args
    return _run_case(_cases(full)[i])


def worker_main(full):
    from concurrent.futures import ProcessPoolExecutor
    n = len(_cases(full))
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return list(pool.map(_run_case_by_index, [(full, i) for i in range(n)]))


def format_table(results):
    lines = [f"{'kernel':<17} {'dtype':<9} {'BM,BN,w,s':<14} {'wgmma':<9} {'tma':>4} {'regs':>5} {'stack B':>8} "
             f"{'smem B':>7}"]
    for r in results:
        if r["error"]:
            lines.append(f"{r['label']:<17} {r['dtype']:<9} ERROR {r['error']}")
            continue
        wg = ("yes" if r["wgmma"] else "no") + ("" if r["wgmma"] == r["expect_wgmma"] else " (!)")
        lines.append(f"{r['label']:<17} {r['dtype']:<9} {','.join(map(str, r['config'])):<14} {wg:<9} "
                     f"{r.get('tma', 0):>4} "
                     f"{r['regs'] if r['regs'] is not None else '?':>5} {r['spill'] if r['spill'] is not None else '?':>8} "
                     f"{r['shared'] if r['shared'] is not None else '?':>7}")
    return "\n".join(lines)


# ================================================================== the tests
def _sweep(full):
    pytest.importorskip("triton", reason="triton is not installed: nothing to compile")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this triton has no offline compile API ({err})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--json"] + (["--all"] if full else []),
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        if "nvidia" in proc.stderr.lower() and "backend" in proc.stderr.lower():
            pytest.skip(f"triton's nvidia backend is unavailable: {proc.stderr[-300:]}")
        raise AssertionError(f"offline compile worker failed:\n{proc.stderr[-3000:]}")
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    print("\n" + format_table(results))
    failed = [r for r in results if r["error"]]
    assert not failed, "configs that do not compile for sm_90:\n" + format_table(failed)
    wrong = [r for r in results if r["expect_wgmma"] and not r["wgmma"]]
    assert not wrong, "no wgmma where a >= 64-row fp16/bf16 tile should use it:\n" + format_table(wrong)
    # TMA where the config asks for descriptors (and pipelined: mbarrier waits), none elsewhere
    wrong = [r for r in results if bool(r.get("tma")) != r.get("expect_tma", False)
             or (r.get("expect_tma") and not r.get("mbarrier_waits"))]
    assert not wrong, "TMA copies where none are expected, or missing where the config asks:\n" + format_table(wrong)
    return results


def test_bf16_forward_defaults_compile_for_sm90():
    """Registers and stack bytes are reported (-s shows the table), not asserted: the numbers
    depend on the Triton version and on the specialisation (mask, tail, stride alignment)."""
    results = _sweep(full=False)
    if all(r["regs"] is None for r in results):
        pytest.skip("compiled and checked for wgmma; no cuobjdump to read registers/spills")


@pytest.mark.slow
def test_every_shipped_config_compiles_for_sm90():
    """fp16/bf16/fp32 × fwd/dkdv/dq × head-dim buckets, v2 per head dim, and the merge kernel.
    Spills are reported, not asserted (fp32 and some backward tiers are known to spill)."""
    _sweep(full=True)


if __name__ == "__main__":
    full = "--all" in sys.argv
    res = worker_main(full)
    if "--json" in sys.argv:
        print(json.dumps(res))
    else:
        print(format_table(res))
