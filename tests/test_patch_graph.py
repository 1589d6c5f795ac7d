"""flashdiff.patch(..., cuda_graph=True): signature keying, fallbacks, output structures, unpatch.

This machine may have no GPU, so most tests substitute `FakeRunner` for cuda_graph._GraphRunner
(the one class that touches CUDA). The fake keeps the graph's contract: `capture` returns output
objects, and each `replay` re-runs the captured closure on the static inputs and writes the
result *into those same objects*, so aliasing, input copying and output cloning are exercised
for real. The test marked gpu captures a tiny U-Net on CUDA.
"""
import importlib

import pytest
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from flashdiff.patching import patch, patched, unpatch

diffusers = pytest.importorskip("diffusers")
cg = importlib.import_module("flashdiff.patching.cuda_graph")


class FakeRunner:
    """_GraphRunner's interface on the CPU; every instance is logged in `FakeRunner.made`."""
    made = []
    fail = None  # an exception to raise from capture

    @staticmethod
    def unsupported(tensors):
        return None

    def __init__(self, device, pool=None):
        self.pool = pool if pool is not None else object()
        self.replays = 0
        self.released = False
        FakeRunner.made.append(self)

    def capture(self, fn):
        if FakeRunner.fail is not None:
            raise FakeRunner.fail
        self.fn, self.out = fn, fn()
        return self.out

    def replay(self):
        self.replays += 1
        for dst, src in zip(tree_flatten(self.out)[0], tree_flatten(self.fn())[0]):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)

    def release(self):
        self.released = True


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(FakeRunner, "made", [])
    monkeypatch.setattr(FakeRunner, "fail", None)
    monkeypatch.setattr(cg, "_GraphRunner", FakeRunner)
    return FakeRunner


class Mlp(nn.Module):
    """A plain module with a kwarg that changes the computation and a tuple output."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, scale=None, double=False):
        y = self.lin(x) * (2 if double else 1)
        return (y if scale is None else y * scale, x.sum())


def tiny_unet(**kw):
    # attention_head_dim is diffusers' legacy name for the head count: 2 heads of 16, which the
    # fused attention kernels serve (they need head_dim >= 16), so a GPU capture includes them
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=8,
        norm_num_groups=8, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **kw).eval()


def unet_inputs(batch=2, device="cpu", dtype=torch.float32):
    return (torch.randn(batch, 4, 8, 8, device=device, dtype=dtype), torch.tensor(10, device=device),
            torch.randn(batch, 5, 32, device=device, dtype=dtype))


def eager(module, *args, **kwargs):
    """The original forward, bypassing the graphs (on the patched submodules, if any)."""
    fwd = module.forward
    with torch.no_grad():
        return (fwd.forward if isinstance(fwd, cg.GraphedForward) else fwd)(*args, **kwargs)


def why(report):
    return [reason for _, _, reason in report.graph_fallbacks]


# ------------------------------------------------------------------ keying
def test_same_signature_replays_new_signature_captures(fake):
    model = Mlp()
    report = patch(model, cuda_graph=True)
    graphed = model.forward
    assert report.counts() == {"cuda_graph": 1}
    with torch.no_grad():
        for _ in range(3):  # new values each call: they must reach the graph's static inputs
            x = torch.randn(2, 4)
            torch.testing.assert_close(model(x), eager(model, x), rtol=0, atol=0)
        assert graphed.stats == {"captures": 1, "replays": 3, "eager": 0}
        model(torch.randn(3, 4))                 # new shape
        model(torch.randn(2, 4, dtype=torch.float64).float())  # same signature as the first
        model(torch.randn(2, 4), double=True)    # a non-tensor argument is part of the key
        y, _ = model(torch.randn(2, 4), scale=torch.tensor(3.0))  # so is a tensor kwarg's presence
    assert graphed.stats["captures"] == 4 and len(graphed.graphs) == 4
    assert report.graph_fallbacks == []
    pools = {r.pool for r in fake.made}
    assert len(pools) == 1, "every graph of a module shares the first graph's pool"
    model.eval()  # the training flag is keyed too (dropout, batch norm)
    with torch.no_grad():
        model(torch.randn(2, 4))
    assert graphed.stats["captures"] == 5
    with torch.inference_mode():  # so is inference mode (its buffers are inference tensors)
        model(torch.randn(2, 4))
    with torch.no_grad():
        model(torch.randn(2, 4))
    assert graphed.stats["captures"] == 6 and graphed.stats["eager"] == 0
    unpatch(model)


def test_outputs_are_clones_not_the_static_buffers(fake):
    model = Mlp()
    patch(model, cuda_graph=True)
    with torch.no_grad():
        x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
        y1, _ = model(x1)
        kept = y1.clone()
        y2, _ = model(x2)  # the replay rewrote the static output
    assert torch.equal(y1, kept) and not torch.equal(y1, y2)
    assert y1.data_ptr() != fake.made[0].out[0].data_ptr()
    unpatch(model)


def test_signature_cap_runs_eagerly_with_reason(fake, monkeypatch):
    monkeypatch.setattr(cg, "MAX_GRAPHS", 2)
    model = Mlp()
    report = patch(model, cuda_graph=True)
    with torch.no_grad():
        for n in (1, 2, 3, 3, 1):
            x = torch.randn(n, 4)
            torch.testing.assert_close(model(x), eager(model, x), rtol=0, atol=0)
    assert model.forward.stats == {"captures": 2, "replays": 3, "eager": 2}
    assert why(report) == ["graph cap reached (2 capture attempts on this module)"], str(report)
    where, sig, _ = report.graph_fallbacks[0]
    assert where == "" and sig == "(float32[3, 4]@cpu)"
    assert "<root> (float32[3, 4]@cpu): graph cap reached" in str(report)
    unpatch(model)


def test_capture_failure_recorded_and_not_retried(fake):
    fake.fail = RuntimeError("operation not permitted when stream is capturing")
    model = Mlp()
    report = patch(model, cuda_graph=True)
    with torch.no_grad():
        x = torch.randn(2, 4)
        for _ in range(3):
            torch.testing.assert_close(model(x), eager(model, x), rtol=0, atol=0)
    assert len(fake.made) == 1, "a signature whose capture failed must not be tried again"
    assert why(report) == ["capture failed, not retried: RuntimeError: operation not permitted when "
                           "stream is capturing"]
    assert model.forward.stats == {"captures": 0, "replays": 0, "eager": 3}
    unpatch(model)


# ------------------------------------------------------------------ fallbacks
def test_cpu_inputs_fall_back_with_reason_once_per_signature():
    """The real runner on CPU tensors: eager, identical outputs, one record per signature."""
    model = Mlp()
    x = torch.randn(2, 4)
    ref = eager(model, x)
    report = patch(model, cuda_graph=True)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
        model(torch.randn(5, 4))
    assert why(report) == ["inputs on cpu, not CUDA"] * 2
    assert [sig for _, sig, _ in report.graph_fallbacks] == ["(float32[2, 4]@cpu)", "(float32[5, 4]@cpu)"]
    assert model.forward.stats == {"captures": 0, "replays": 0, "eager": 3}
    assert cg._GraphRunner.unsupported([x, torch.empty(1, device="meta")]) == "inputs span devices ['cpu', 'meta']"
    unpatch(model)


def test_fallback_records_are_bounded(monkeypatch):
    monkeypatch.setattr(cg, "MAX_RECORDS", 2)
    model = Mlp()
    report = patch(model, cuda_graph=True)
    with torch.no_grad():
        for n in range(1, 6):
            model(torch.randn(n, 4))
    assert why(report) == ["inputs on cpu, not CUDA"] * 2 + [
        "more than 2 fallback records on this module: no more are kept"]
    unpatch(model)


def test_grad_and_unhashable_fall_back(fake):
    model = Mlp()
    report = patch(model, cuda_graph=True)
    x = torch.randn(2, 4)
    model(x)  # grad mode on
    with torch.no_grad():
        model(x.clone().requires_grad_())
        model(x, scale=torch.tensor(2.0))  # captured
        model(x, double={1, 2})  # a set is an unhashable leaf
        model(x, double={1, 2})
    assert why(report)[:2] == ["grad mode is enabled (graphs serve inference: call under torch.no_grad())",
                               "an input requires grad"]
    assert len(why(report)) == 3 and why(report)[2].startswith("an argument is not hashable"), str(report)
    assert "requires_grad" in report.graph_fallbacks[1][1]
    assert model.forward.stats == {"captures": 1, "replays": 1, "eager": 4}
    unpatch(model)


def test_moved_weights_release_graphs(fake):
    model = Mlp()
    report = patch(model, cuda_graph=True)
    x = torch.randn(2, 4)
    with torch.no_grad():
        model(x)
        for p in model.parameters():  # what .to() does: new storage behind the same Parameters
            p.data = p.data.clone() + 1
        torch.testing.assert_close(model(x), eager(model, x), rtol=0, atol=0)
        model(x)
    assert fake.made[0].released and len(fake.made) == 2 and fake.made[1].replays == 2
    assert why(report) == ["weights moved since capture (.to(), offload): 1 graph(s) released, recapturing"]
    unpatch(model)


def test_offload_hook_moving_weights_inside_forward_recaptures_once(fake):
    """Like accelerate's model offload: a hook on the instance's forward brings the weights
    back (to new addresses) at the start of the call, after the wrapper has looked."""
    model = Mlp()
    offloaded = []

    def hooked(*args, **kwargs):
        while offloaded:  # onload
            offloaded.pop()
            for p in model.parameters():
                p.data = p.data.clone()
        return Mlp.forward(model, *args, **kwargs)

    model.forward = hooked
    patch(model, cuda_graph=True)
    x = torch.randn(2, 4)
    with torch.no_grad():
        model(x)
        offloaded.append(True)
        for p in model.parameters():  # offload
            p.data = p.data.clone()
        for _ in range(3):
            torch.testing.assert_close(model(x), eager(model, x), rtol=0, atol=0)
    assert len(fake.made) == 2 and fake.made[1].replays == 3
    unpatch(model)
    assert model.forward is hooked


def test_torch_compile_steps_aside(fake):
    model = Mlp()
    patch(model, cuda_graph=True)
    x = torch.randn(2, 4)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            y = torch.compile(model, backend="eager")(x)
        torch.testing.assert_close(y, eager(model, x))
        assert model.forward.stats == {"captures": 0, "replays": 0, "eager": 0} and not fake.made
    finally:
        torch._dynamo.reset()
        unpatch(model)


# ------------------------------------------------------------------ diffusers models and pipelines
def test_unet_kwargs_and_base_output(fake):
    model = tiny_unet()
    x, t, e = unet_inputs()
    with torch.no_grad():
        ref = model(x, t, encoder_hidden_states=e).sample
    report = patch(model, cuda_graph=True)  # with flashdiff's group norm and attention as well
    assert {"cuda_graph", "attention"} <= set(report.counts())
    with torch.no_grad():
        for _ in range(2):
            out = model(x, t, encoder_hidden_states=e)
            assert type(out).__name__ == "UNet2DConditionOutput"
            torch.testing.assert_close(out.sample, ref, rtol=1e-4, atol=1e-4)
        tup = model(x, t, encoder_hidden_states=e, return_dict=False)
        assert isinstance(tup, tuple) and len(tup) == 1
        torch.testing.assert_close(tup[0], out.sample, rtol=0, atol=0)
    assert model.forward.stats == {"captures": 2, "replays": 3, "eager": 0}, str(report)
    unpatch(model)
    assert "forward" not in model.__dict__


def test_pipeline_graphs_the_denoiser(fake):
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8).eval()
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(num_train_timesteps=100))

    def sample():
        return pipe(batch_size=2, num_inference_steps=3, output_type="np", return_dict=False,
                    generator=torch.Generator().manual_seed(0))[0]

    ref = sample()
    with patched(pipe, attention=False, group_norm=False, scheduler=False, cuda_graph=True) as report:
        assert report.replaced == [("cuda_graph", "unet", "forward captured per input signature (at most 8 graphs)")]
        graphed = pipe.unet.forward
        assert (sample() == ref).all()
        assert graphed.stats == {"captures": 1, "replays": 3, "eager": 0}
    assert "forward" not in unet.__dict__ and not graphed.graphs and fake.made[0].released

    class NoDenoiser:  # a pipeline-like object: components, but no unet/transformer
        components = {"vae": nn.Linear(2, 2)}

    obj = NoDenoiser()
    report = patch(obj, cuda_graph=True)
    assert report.left_alone[-1] == ("cuda_graph", "", "the pipeline has no unet or transformer to capture")
    unpatch(obj)


# ------------------------------------------------------------------ unpatch and the default
def test_unpatch_restores_forward_and_drops_graphs(fake):
    model = Mlp()
    patch(model, cuda_graph=True)
    graphed = model.forward
    with torch.no_grad():
        model(torch.randn(2, 4))
        model(torch.randn(3, 4))
    unpatch(model)
    assert "forward" not in model.__dict__ and model.forward.__func__ is Mlp.forward
    assert not graphed.graphs and all(r.released for r in fake.made) and len(fake.made) == 2
    graphed(torch.randn(2, 4))  # a stale reference still works: a plain pass-through
    assert len(fake.made) == 2

    own = model.forward  # an instance-level forward set by someone else (e.g. accelerate's hooks)
    model.forward = lambda *a, **k: own(*a, **k)
    mine = model.forward
    patch(model, cuda_graph=True)
    assert model.forward.forward is mine
    unpatch(model)
    assert model.__dict__["forward"] is mine

    patch(model, cuda_graph=True)
    graphed = model.forward
    model.forward = lambda *a, **k: graphed(*a, **k)  # wrapped after us: left in place on unpatch
    unpatch(model)
    assert not graphed.active and model(torch.randn(2, 4))[0].shape == (2, 4)


def test_patch_without_cuda_graph_is_unchanged():
    model = tiny_unet()
    report = patch(model)
    assert "forward" not in model.__dict__ and "cuda_graph" not in report.counts()
    assert report.graph_fallbacks == [] and "cuda graph" not in str(report)
    unpatch(model)


# ------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
def test_cuda_graph_replays_tiny_unet_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_unet().to("cuda", torch.float16)
    report = patch(model, cuda_graph=True)  # flashdiff's kernels inside the captured graph
    graphed = model.forward
    with torch.no_grad():
        for step in range(3):  # the first call captures, the others replay; new values each time
            x, t, e = unet_inputs(device="cuda", dtype=torch.float16)
            y = model(x, t, encoder_hidden_states=e).sample
            ref = eager(model, x, t, encoder_hidden_states=e).sample
            torch.testing.assert_close(y, ref, rtol=2e-3, atol=2e-3)
            assert graphed.stats["captures"] == 1 and graphed.stats["replays"] == step + 1, str(report)
        model(*unet_inputs(batch=1, device="cuda", dtype=torch.float16))  # new shape: a second graph
    assert graphed.stats == {"captures": 2, "replays": 4, "eager": 0} and report.graph_fallbacks == [], str(report)

    # inside someone else's capture the forward runs eagerly, recorded by that capture
    outer = torch.cuda.CUDAGraph()
    x, t, e = unet_inputs(batch=3, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        eager(model, x, t, e)  # warm-up for this shape, outside any capture
        with torch.cuda.graph(outer):
            y = model(x, t, e).sample
        outer.replay()
        torch.testing.assert_close(y, eager(model, x, t, e).sample, rtol=2e-3, atol=2e-3)
    assert why(report) == ["called inside another CUDA graph capture (the outer graph records this forward)"]

    unpatch(model)
    assert "forward" not in model.__dict__ and not graphed.graphs
