"""GPU check of flashdiff.patch on diffusion transformers (bf16, cuda): accuracy rule vs fp64,
spy counts, impl chosen, forced triton, inductor fullgraph compile, and timing."""
import importlib, statistics, sys, time, traceback
import torch
sys.path.insert(0, "tests")
import test_patch_transformers as T
import flashdiff
from flashdiff.patching import patch, unpatch
from flashdiff.testing import compare
fattn = importlib.import_module("flashdiff.patching.attention")
import os
dev, bf = os.environ.get("DEV", "cuda"), torch.bfloat16
print(torch.__version__, dev, flashdiff.backend_status() if hasattr(flashdiff, "backend_status") else "")

def to_dev(kw, dtype):
    def c(v):
        if isinstance(v, dict): return {k: c(x) for k, x in v.items()}
        if torch.is_tensor(v):
            v = v.to(dev)
            return v.to(dtype) if v.is_floating_point() and v.dim() > 1 else v
        return v
    return c(kw)

calls = []
real = fattn._fd_attention
def spy(q, k, v, m, s, backend=None):
    impl = flashdiff.explain("attention", q, k, v, m, None, backend).impl
    calls.append((tuple(q.shape), None if m is None else tuple(m.shape), impl))
    return real(q, k, v, m, s, backend=backend)
fattn._fd_attention = spy

CASES = {
    "Flux-hd128": (lambda: T.tiny_flux(128), T.flux_inputs),
    "Flux-hd72-mask": (lambda: T.tiny_flux(72), lambda d: T.flux_inputs(d, mask=True)),
    "SD3-hd64": (lambda: T.tiny_sd3(64), T.sd3_inputs),
    "PixArt": (T.tiny_pixart, T.pixart_inputs),
    "DiT": (T.tiny_dit, T.dit_inputs),
}
for name, (build, inputs) in CASES.items():
    for backend in (None, "triton"):
        try:
            torch.manual_seed(0)
            m = build()
            kw = inputs(torch.float32)
            ref = T._run(T._twin(m, torch.float64).to(dev), to_dev(kw, torch.float64))
            m.to(dev, bf)
            kwb = to_dev(kw, bf)
            y_t = T._run(m, kwb)
            patch(m, backend=backend)
            calls.clear()
            y = T._run(m, kwb)
            res = compare(y, ref, y_t)
            unpatch(m)
            exact = torch.equal(T._run(m, kwb), y_t)
            print(f"{name:16} backend={backend}: ok={res.ok} {res} calls={len(calls)} impls={sorted(set(c[2] for c in calls))} unpatch_exact={exact}")
        except Exception:
            print(f"{name} backend={backend}: FAILED"); traceback.print_exc()

if dev == "cpu": sys.exit(0)
# inductor fullgraph
try:
    torch.manual_seed(0)
    m = T.tiny_flux(128).to(dev, bf); kwb = to_dev(T.flux_inputs(torch.float32), bf)
    y_t = T._run(m, kwb); patch(m)
    t0 = time.time(); c = torch.compile(m, fullgraph=True); y = T._run(c, kwb)
    print("inductor fullgraph Flux: %.1fs maxdiff %.3g" % (time.time() - t0, (y.float() - y_t.float()).abs().max()))
    unpatch(m); torch._dynamo.reset()
except Exception:
    print("inductor FAILED"); traceback.print_exc()

# timing on a Flux-sized block stack (real dims, 2+2 blocks)
import diffusers
fattn._fd_attention = real
def bench(model, kw, n=10):
    for _ in range(3): T._run(model, kw)
    ts = []
    for _ in range(n):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record(); T._run(model, kw); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    return statistics.median(ts)
for name, build, kw in [
    ("Flux 24x128, 4096+512 tok", lambda: diffusers.FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=[16, 56, 56]),
     lambda: dict(hidden_states=torch.randn(1, 4096, 64), encoder_hidden_states=torch.randn(1, 512, 4096), pooled_projections=torch.randn(1, 768), timestep=torch.tensor([0.5]), img_ids=torch.randint(0, 64, (4096, 3)).float(), txt_ids=torch.zeros(512, 3))),
    ("SD3.5 24x64, 64x64 lat", lambda: diffusers.SD3Transformer2DModel(sample_size=64, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=64, num_attention_heads=24, caption_projection_dim=1536, joint_attention_dim=4096, pooled_projection_dim=2048, out_channels=16, qk_norm="rms_norm"),
     lambda: dict(hidden_states=torch.randn(1, 16, 128, 128), encoder_hidden_states=torch.randn(1, 333, 4096), pooled_projections=torch.randn(1, 2048), timestep=torch.tensor([500]))),
]:
    try:
        with torch.device(dev):
            m = build().eval().to(bf)
        kwb = to_dev(kw(), bf)
        t_u = bench(m, kwb); patch(m); t_p = bench(m, kwb); unpatch(m); t_u2 = bench(m, kwb)
        print(f"{name}: unpatched {t_u:.2f}/{t_u2:.2f} ms, patched {t_p:.2f} ms")
        del m; torch.cuda.empty_cache()
    except Exception:
        print(f"{name} FAILED"); traceback.print_exc()
