"""Reliability: devices and limits, faults that degrade with a message, thread safety.

(Output layouts and the fakes: tests/test_opcheck.py.)
"""
import importlib
import os
import subprocess
import sys
import textwrap
import threading
import time
import types

import pytest
import torch

import flashdiff
from flashdiff import _ext, reference
from flashdiff.testing import assert_close, poisoned_outputs

from conftest import require_backend

gn_op = importlib.import_module("flashdiff.ops.group_norm")
sched_op = importlib.import_module("flashdiff.ops.scheduler")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _triton_kernels():
    mod, why = _ext.load_triton()
    if mod is None:
        pytest.skip(f"triton unavailable: {why}")
    return mod


# ------------------------------------------------------------------ devices and limits
def test_every_triton_launcher_runs_on_its_tensors_device():
    """Triton launches on the current device and stream: tensors on cuda:1 with cuda:0 current
    went to the wrong device. Every launcher of the norms and the update carries the guard."""
    tk = _triton_kernels()
    layer_norm = importlib.import_module("flashdiff.triton_kernels.layer_norm")
    launchers = [tk.group_norm.group_norm_fwd, tk.group_norm.group_norm_fwd_onepass,
                 tk.group_norm.group_norm_bwd, tk.scheduler.scheduler_update,
                 layer_norm.layer_norm_fwd, layer_norm.layer_norm_bwd,
                 layer_norm.rms_norm_fwd, layer_norm.rms_norm_bwd]
    unguarded = [f.__name__ for f in launchers if not getattr(f, "on_tensor_device", False)]
    assert not unguarded, f"launchers without the device guard: {unguarded}"


def test_device_guard_enters_the_tensors_device(monkeypatch):
    """The guard itself, with stand-ins for a tensor on cuda:1 (no second GPU needed)."""
    tk = _triton_kernels()
    entered, seen = [], []

    class Recorder:
        def __init__(self, device):
            entered.append(torch.device(device))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    launcher = tk.group_norm.on_tensor_device(lambda t, k=None: seen.append((t, k)) or "ran")
    on_1 = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    assert launcher(on_1, k=3) == "ran" and entered == [torch.device("cuda", 1)]
    on_0 = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    launcher(on_0)  # already current: no context switch
    launcher(torch.zeros(1))  # CPU (interpreter): no CUDA call at all
    assert entered == [torch.device("cuda", 1)] and len(seen) == 3


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_second_device_matches_reference(backend):
    require_backend("cuda", backend)
    x = torch.randn(2, 64, 16, 16, device="cuda:1", dtype=torch.float16)
    with torch.cuda.device(0):
        y = flashdiff.group_norm(x, 32, activation="silu", backend=backend)
        c = torch.randn_like(x)
        prev = flashdiff.scheduler_update(x, c, flashdiff.ddim_coefs(0.5, 0.7, device=x.device), backend=backend)
    torch.cuda.synchronize(1)
    ref = reference.group_norm(x, 32, activation="silu", upcast=torch.float64)
    assert_close(y, ref, reference.group_norm(x, 32, activation="silu", upcast=False), "group_norm cuda:1")
    coefs = flashdiff.ddim_coefs(0.5, 0.7, device=x.device)
    ref_prev = reference.scheduler_update(x, c, coefs, upcast=torch.float64)[0]
    assert_close(prev, ref_prev, reference.scheduler_update(x, c, coefs, upcast=False)[0], "update cuda:1")


def test_triton_group_norm_declines_grids_past_the_limit():
    """N·G programs go in grid dim x (at most 2^31 − 1): more is declined with the reason, not
    launched. (An expanded x: no memory behind its 2.8e9 elements.)"""
    _triton_kernels()
    x = torch.zeros(1, 1, 1).expand(70_000, 40_000, 1)
    why = gn_op._dispatch.supports["triton"](x=x, num_groups=40_000, scale=None, activation=None)
    assert why is not None and "grid" in why and "2800000000" in why.replace(",", "")
    x_ok = torch.zeros(1, 1, 1).expand(4, 40_000, 1)
    assert gn_op._dispatch.supports["triton"](x=x_ok, num_groups=40_000, scale=None, activation=None) is None


def _tiled(numel, dtype, seed):
    """A tensor of numel elements tiled from a random block of a prime length (so no two
    groups or rows see the same values at the same offsets); fills at memcpy speed."""
    g = torch.Generator().manual_seed(seed)
    block = torch.randn(1_000_003, generator=g).to(dtype)
    out = torch.empty(numel, dtype=dtype)
    step = block.numel() * 64
    tile = block.repeat(64)
    for start in range(0, numel, step):
        n = min(step, numel - start)
        out[start:start + n].copy_(tile[:n])
    return out


def _no_nan(t):
    for chunk in t.view(-1).split(2**27):
        assert not torch.isnan(chunk).any(), "an output element was not written"


@pytest.mark.slow
def test_cpu_kernels_past_2_31_elements():
    """Group norm and the sampler update (cpu backend) on tensors of more than 2^31 elements,
    bf16 (~4.3 GB each, ~9 GB at the peak): outputs poisoned with NaN, every element checked
    written, and groups / slices at both ends (offsets below and past 2^31) checked against
    the float64 reference by the correctness rule."""
    require_backend("cpu", "cpu")
    N, C, G = 2, 32, 32
    S = (2**31 // (N * C)) + 9                      # N·C·S = 2^31 + 576
    numel = N * C * S
    assert numel > 2**31
    buf = _tiled(numel + 64, torch.bfloat16, 0)
    x = buf[:numel].view(N, C, S)
    w = torch.randn(C) * 0.5 + 1
    b = torch.randn(C)
    with poisoned_outputs():
        y = flashdiff.group_norm(x, G, w, b, activation="silu", backend="cpu")
    _no_nan(y)
    for n, g in ((0, 0), (1, 0), (1, G - 1)):      # (1, G − 1) starts past 2^31
        xs = x[n:n + 1, g:g + 1]
        args = (1, w[g:g + 1], b[g:g + 1], 1e-5, "silu")
        ref = reference.group_norm(xs, *args, upcast=torch.float64)
        assert_close(y[n:n + 1, g:g + 1], ref, reference.group_norm(xs, *args, upcast=False), f"group ({n}, {g})")
        del ref
    del y

    # model_output: the same buffer 64 elements on (other values at every offset, no copy)
    sample, model_output = buf[:numel], buf[64:]
    coefs = flashdiff.ddim_coefs(0.6, 0.8, clip_sample_range=1.5)
    with poisoned_outputs():
        prev = flashdiff.scheduler_update(sample, model_output, coefs, backend="cpu")
    _no_nan(prev)
    for start in (0, 2**31 - 1000, numel - 5000):
        sl = slice(start, start + 4000)
        ref = reference.scheduler_update(sample[sl], model_output[sl], coefs, upcast=torch.float64)[0]
        low = reference.scheduler_update(sample[sl], model_output[sl], coefs, upcast=False)[0]
        assert_close(prev[sl], ref, low, f"prev at {start}")


# ------------------------------------------------------------------ faults degrade with a message
_HIDE = textwrap.dedent("""
    import importlib.abc, sys
    HIDDEN = {hidden!r}
    ERROR = {error}

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in HIDDEN or name.split(".")[0] in HIDDEN:
                raise ERROR(f"simulated: {{name}} cannot be loaded")
            return None

    sys.meta_path.insert(0, Hide())
""")

_USE = textwrap.dedent("""
    import os, torch
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import flashdiff
    from flashdiff import cli
    x = torch.randn(2, 8, 4, 4)
    y = flashdiff.group_norm(x, 4, activation="silu")           # auto: serves with what is left
    ref = flashdiff.reference.group_norm(x, 4, activation="silu").float()
    assert torch.allclose(y, ref, atol=1e-5), "wrong result"
    prev = flashdiff.ddim_step(torch.randn_like(x), x, 0.5, 0.7)
    assert prev.shape == x.shape
    for name in {asked!r}:
        try:
            flashdiff.group_norm(x, 4, backend=name)
        except NotImplementedError as err:
            print("DECLINED", name, err)
        else:
            raise SystemExit(f"backend {{name}} served without its module")
    assert cli.main(["info"]) == 0
""")


def _run_hidden(hidden, error, asked):
    code = _HIDE.format(hidden=tuple(hidden), error=error) + _USE.format(asked=tuple(asked))
    env = {k: v for k, v in os.environ.items() if k != "FLASHDIFF_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, f"rc {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.parametrize("error", ["ImportError", "OSError", "RuntimeError"])
def test_compiled_modules_missing_or_failing_to_load(error):
    """flashdiff._cpu and flashdiff._cuda hidden (ImportError: not built) or failing to load
    (OSError: a corrupt .so or missing library; RuntimeError: an init that throws): flashdiff
    imports, auto serves with torch, an explicit cpu/cuda backend says why, info reports it."""
    out = _run_hidden(["flashdiff._cpu", "flashdiff._cuda"], error, ["cpu", "cuda"])
    assert "DECLINED cpu" in out and "simulated: flashdiff._cpu cannot be loaded" in out
    assert "module flashdiff._cpu: missing:" in out and "module flashdiff._cuda: missing:" in out
    assert "cpu        unavailable:" in out


@pytest.mark.parametrize("error", ["ImportError", "RuntimeError"])
def test_triton_not_importable(error):
    out = _run_hidden(["triton"], error, ["triton"])
    assert "DECLINED triton" in out and "simulated: triton" in out
    assert "triton: unavailable:" in out and "triton     unavailable:" in out


@pytest.fixture
def checkpoint(tmp_path):
    from flashdiff.models import UNet_models, save_checkpoint

    model = UNet_models["UNet-digits"]()
    path = str(tmp_path / "m.safetensors")
    save_checkpoint(model, path)
    return path, model


def test_checkpoint_round_trip_by_path(checkpoint):
    from flashdiff import models

    path, model = checkpoint
    loaded = models.load_pretrained(path)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("damage", ["truncated", "corrupted_header", "garbage", "empty", "no_metadata"])
def test_bad_checkpoint_gives_a_clear_error(checkpoint, damage, tmp_path):
    from safetensors.torch import save_file

    from flashdiff import models

    path, _ = checkpoint
    data = open(path, "rb").read()
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    elif damage == "corrupted_header":
        data = data[:8] + b"{not json" + data[17:]
    elif damage == "garbage":
        data = os.urandom(4096)
    elif damage == "empty":
        data = b""
    if damage == "no_metadata":
        save_file({"w": torch.zeros(2)}, path)
    else:
        open(path, "wb").write(data)
    with pytest.raises(models.CheckpointError, match="m.safetensors"):
        models.load_pretrained(path)


def test_unknown_model_name():
    from flashdiff import models

    with pytest.raises(ValueError, match="digits-unet"):
        models.load_pretrained("digits-transformer")
    with pytest.raises(FileNotFoundError):
        models.load_pretrained("/nonexistent/dir/m.safetensors")


def _oom(*_, **__):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB (simulated)")


def test_out_of_memory_in_a_launch_propagates(monkeypatch):
    """An OOM inside a kernel launch reaches the caller as torch.OutOfMemoryError (no hang, no
    silent fallback to another backend), and the next call, without the fault, works."""
    x = torch.randn(2, 8, 4, 4)
    c = torch.randn_like(x)
    coefs = flashdiff.ddim_coefs(0.5, 0.7)
    flashdiff.group_norm(x, 4, backend="cpu")  # warm the eager memo: the fault hits the fast path too
    fake_cpu = types.SimpleNamespace(group_norm_fwd=_oom, scheduler_update=_oom)
    monkeypatch.setitem(_ext._CACHE, "load_cpu", (fake_cpu, None))
    monkeypatch.setitem(sched_op._dispatch.impls, "cpu", lambda *a: sched_op._compiled_fwd(fake_cpu, *a))
    sched_op._CHOSEN.clear()
    cases = [lambda: flashdiff.group_norm(x, 4, backend="cpu"),
             lambda: flashdiff.scheduler_update(x, c, coefs, backend="cpu")]
    tk = _ext.load_triton()[0]
    if tk is not None and _ext.triton_interpreter_active():
        monkeypatch.setattr(tk.group_norm, "group_norm_fwd", _oom)
        monkeypatch.setattr(tk.scheduler, "scheduler_update", _oom)
        cases += [lambda: flashdiff.group_norm(x, 4, backend="triton"),
                  lambda: flashdiff.scheduler_update(x, c, coefs, backend="triton")]
    for case in cases:
        start = time.monotonic()
        with pytest.raises(torch.OutOfMemoryError, match="simulated"):
            case()
        assert time.monotonic() - start < 30
    monkeypatch.undo()
    sched_op._CHOSEN.clear()
    assert torch.allclose(flashdiff.group_norm(x, 4, backend="cpu"),
                          reference.group_norm(x, 4).float(), atol=1e-5)


# ------------------------------------------------------------------ threads
def _thread_calls():
    """Mixed signatures over the memoized paths (eager memos, choices, host-schedule coefs)."""
    calls = []
    for i, (shape, dtype, backend) in enumerate([
            ((2, 8, 4, 4), torch.float32, "cpu"), ((1, 16, 3, 5), torch.bfloat16, "cpu"),
            ((2, 8, 4, 4), torch.float32, "torch"), ((2, 8, 6), torch.float16, "reference"),
            ((2, 8, 4, 4), torch.float32, None)]):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(shape, generator=g).to(dtype)
        if i == 1:
            x = x.to(memory_format=torch.channels_last)
        calls.append(lambda x=x, b=backend: flashdiff.group_norm(x, 4, activation="silu", backend=b))
        m = torch.randn(shape, generator=g).to(dtype)
        calls.append(lambda x=x, m=m, b=backend, i=i: flashdiff.ddim_step(m, x, 0.3 + 0.1 * i, 0.8, backend=b))
        calls.append(lambda x=x, m=m, b=backend, i=i: flashdiff.flow_euler_step(m, x, 0.5, 0.1 * i, backend=b))
        rows = x.reshape(-1, shape[-1])
        calls.append(lambda r=rows, b=backend: flashdiff.layer_norm(r, r.shape[-1], activation="gelu", backend=b))
        calls.append(lambda r=rows, b=backend: flashdiff.rms_norm(r, backend=b))
    return calls


def test_threads_match_serial():
    """8 threads x 200 calls of mixed signatures give the serial results; the memo caches are
    cleared under them part-way (a new dispatch table does that) to race their refills."""
    calls = _thread_calls()
    flashdiff.backends.clear_choice_caches()
    serial = [call() for call in calls]
    flashdiff.backends.clear_choice_caches()
    errors, results = [], {}
    barrier = threading.Barrier(8)

    def worker(t):
        try:
            barrier.wait()
            for k in range(200):
                j = (t * 7 + k) % len(calls)
                if t == 0 and k % 50 == 25:
                    flashdiff.backends.clear_choice_caches()
                results[(t, k)] = (j, calls[j]())
        except Exception as err:  # reported below with the thread
            errors.append((t, repr(err)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, errors
    assert len(results) == 8 * 200
    for (t, k), (j, out) in results.items():
        torch.testing.assert_close(out, serial[j], rtol=0, atol=0, msg=lambda m: f"thread {t} call {k}: {m}")


# ------------------------------------------------------------------ house-keeping
def test_sampling_benchmarks_live_in_the_bench_package():
    """flashdiff.sampling is the sampling API; its measurements moved to
    flashdiff.bench.sampling_bench, and `python -m flashdiff.sampling` forwards there."""
    import flashdiff.sampling as sampling
    from flashdiff.bench import sampling_bench

    assert not any(hasattr(sampling, name) for name in ("bench_scheduler_step", "bench_unet_sampling", "main"))
    assert callable(sampling_bench.bench_scheduler_step) and callable(sampling_bench.bench_unet_sampling)
    proc = subprocess.run([sys.executable, "-m", "flashdiff.sampling", "--help"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "bench-step" in proc.stdout and "sampling_bench" in proc.stdout, proc.stderr
