"""The sampling loop is safe to capture as a CUDA graph: proven on the CPU, without a GPU.

A capture records device work only: a host->device copy, a read of a device value (`.item()`,
`aten._local_scalar_dense`, a sync) or a coefficient table built on the host and copied over
either fails the capture or bakes stale host state into every replay. Whether the loop does any
of that is decided by its Python control flow, so these tests run the real loop and the real
GraphedSampler on a stand-in device, with torch.cuda's stream and graph API replaced by
stand-ins whose capture window switches a recorder on. The recorder (a TorchDispatchMode) sees
every aten op and notes cross-device copies and device scalar reads; the schedulers'
`_build_table` is wrapped to note table builds.

The stand-in device is `meta` (shapes only, so the kernels never run). FakeTensorMode's fake
CUDA tensors would read closer, but a CPU-only torch build registers no CUDA device guard
(torch._C._ensureCUDADeviceGuardSet only patches CUDA builds without a device), so indexing a
fake CUDA tensor (`timesteps[i]`), setitem and copy_ raise "PyTorch is not linked with support
for cuda devices". For what is checked here meta is a device like any other: moving host data
to it is an `aten._to_copy` / `aten.copy_` from cpu, and reading a value is a
`_local_scalar_dense`. The model and scheduler run the reference backend: no compiled backend
is picked for a device it cannot run on.
"""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flashdiff import sampling
from flashdiff.models import DiT_models, UNet_models
from flashdiff.nn import set_backend
from flashdiff.ops import scheduler as sched_ops
from flashdiff.sampling import GraphedSampler, _loop, make_scheduler, sample

DEVICE = torch.device("meta")
STEPS = 4
_aten = torch.ops.aten
_DEVICE_DRAWS = (_aten.randn.default, _aten.randn.generator, _aten.normal_.default)


def _is_host(device) -> bool:
    return torch.device(device).type == "cpu"


def _host_event(func, args, kwargs):
    """What `func` would make the host do in the middle of a device stream, or None."""
    if func is _aten._local_scalar_dense.default:
        return None if _is_host(args[0].device) else "device scalar read"
    if func is _aten._to_copy.default:
        src, dst = args[0].device, kwargs.get("device") or args[0].device
    elif func is _aten.copy_.default:
        dst, src = args[0].device, args[1].device
    else:
        return None
    if _is_host(src) and not _is_host(dst):
        return "host->device copy"
    if not _is_host(src) and _is_host(dst):
        return "device->host copy"
    return None


class _Recorder(TorchDispatchMode):
    """Notes host traffic, table builds, device noise draws and fused updates while `on`."""

    def __init__(self):
        super().__init__()
        self.on = False
        self.events = []       # what a capture must not contain
        self.device_draws = 0  # noise drawn on the device (fine inside a graph)
        self.return_x0 = []    # per fused update: was x0 written

    def note(self, event):
        if self.on:
            self.events.append(event)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        event = _host_event(func, args, kwargs)
        if event:
            self.note(f"{event} ({func})")
        if self.on and func in _DEVICE_DRAWS:
            target = args[0].device if isinstance(args[0], torch.Tensor) else kwargs.get("device") or "cpu"
            self.device_draws += not _is_host(target)
        if event == "device scalar read":  # meta holds no value; the read itself is the finding
            return 0.0 if args[0].dtype.is_floating_point else 0
        return func(*args, **kwargs)


class _CudaGraphStandIns:
    """torch.cuda.Stream / stream / current_stream / CUDAGraph / graph as stand-ins: the
    capture runs its body eagerly with the recorder on."""

    def __init__(self, recorder):
        self.recorder = recorder
        self.captures = self.replays = 0

    def install(self, monkeypatch):
        outer = self

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        class CUDAGraph:
            def replay(self):
                outer.replays += 1

        @contextlib.contextmanager
        def graph(cuda_graph, *args, **kwargs):
            outer.captures += 1
            outer.recorder.on = True
            try:
                yield
            finally:
                outer.recorder.on = False

        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", CUDAGraph)
        monkeypatch.setattr(torch.cuda, "graph", graph)


@pytest.fixture
def rec(monkeypatch):
    """The recorder, active for the whole test, with table builds, hidden copies
    (torch.tensor / as_tensor of host data for a device dispatch no copy op) and the fused
    update's return_x0 wired into it."""
    recorder = _Recorder()
    for cls in sampling.SAMPLERS.values():
        def build(self, key, _orig=cls._build_table):
            recorder.note(f"table build ({type(self).__name__})")
            return _orig(self, key)
        monkeypatch.setattr(cls, "_build_table", build)
    for name in ("tensor", "as_tensor"):
        def make(data, *args, _orig=getattr(torch, name), **kwargs):
            device = kwargs.get("device")
            if device is not None and not _is_host(device) and not isinstance(data, torch.Tensor):
                recorder.note(f"host->device copy (torch.{_orig.__name__})")
            return _orig(data, *args, **kwargs)
        monkeypatch.setattr(torch, name, make)
    impl = sched_ops._dispatch.impls["reference"]

    def update(*args):
        if recorder.on:
            recorder.return_x0.append(args[-1])
        return impl(*args)
    monkeypatch.setitem(sched_ops._dispatch.impls, "reference", update)
    with recorder:
        yield recorder


@pytest.fixture
def graphs(rec, monkeypatch):
    standins = _CudaGraphStandIns(rec)
    standins.install(monkeypatch)
    # let sample(cuda_graph=True) take the stand-in device (raising=False: absent before the fix)
    monkeypatch.setattr(sampling, "_GRAPH_DEVICE_TYPES", ("cuda", DEVICE.type), raising=False)
    yield standins
    getattr(sampling, "clear_cuda_graphs", lambda: None)()


def _model(kind="unet"):
    torch.manual_seed(0)
    model = UNet_models["UNet-digits"]() if kind == "unet" else DiT_models["DiT-digits"](depth=1)
    return set_backend(model.eval(), "reference").to(DEVICE)


def _noisy_steps(scheduler, eta=0.0):
    """How many steps of the set schedule draw noise. DDPM at a device timestep draws at every
    step: its position is found on the device (diffusers' value lookup without the host read),
    so the host cannot tell the t = 0 step, whose row weights the noise by 0."""
    if isinstance(scheduler, sampling.DDPMScheduler):
        return len(scheduler._host_timesteps)
    if isinstance(scheduler, sampling.DDIMScheduler) and eta > 0:
        return len(scheduler._host_timesteps)
    return 0


CASES = [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("euler", 0.0), ("dpmpp", 0.0)]


@pytest.mark.parametrize("guidance", [None, 3.0])
@pytest.mark.parametrize("sampler,eta", CASES)
@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_graphed_capture_copies_reads_and_builds_nothing(rec, graphs, kind, sampler, eta, guidance):
    """Inside the capture: no host->device copy, no device scalar read, no table build; the
    noise of DDPM / DDIM eta > 0 is drawn on the device; x0 is written only where it is read
    (DPM-Solver++'s second-order term)."""
    model = _model(kind)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(rec.on))
    scheduler = make_scheduler(sampler, backend="reference")
    labels = torch.tensor([1, 2, 3]).to(DEVICE)
    with torch.no_grad():
        graphed = GraphedSampler(model, scheduler, labels, STEPS, guidance, eta)
    assert graphs.captures == 1
    assert forwards.count(True) == STEPS  # the capture window held the whole loop
    assert rec.events == []
    assert rec.device_draws == _noisy_steps(scheduler, eta)
    assert rec.return_x0 == [sampler == "dpmpp"] * STEPS
    with torch.no_grad():
        out = graphed(torch.randn(3, 1, 8, 8, device=DEVICE))
    assert graphs.replays == 1 and out.shape == (3, 1, 8, 8)


@pytest.mark.parametrize("generator", [None, "cpu"])
def test_eager_noise_comes_from_the_generator_given(rec, generator):
    """The eager loop draws a stochastic sampler's noise as diffusers does: from a CPU
    generator that is a host->device copy per noisy step (documented in flashdiff.sampling;
    GraphedSampler never passes one), without one it is drawn on the device."""
    model, scheduler = _model(), make_scheduler("ddpm", backend="reference")
    labels = torch.tensor([1, 2]).to(DEVICE)
    x = torch.randn(2, 1, 8, 8, device=DEVICE)
    scheduler.set_timesteps(STEPS, device=DEVICE)
    gen = None if generator is None else torch.Generator().manual_seed(0)
    with torch.no_grad():
        _loop(model, scheduler, x, labels, 3.0, gen, 0.0, False, None)  # builds the table
        scheduler.rewind()
        rec.on = True
        _loop(model, scheduler, x, labels, 3.0, gen, 0.0, False, None)
        rec.on = False
    noisy = _noisy_steps(scheduler)
    assert noisy == STEPS
    if generator is None:
        assert rec.events == [] and rec.device_draws == noisy
    else:
        assert rec.events == ["host->device copy (aten._to_copy.default)"] * noisy and rec.device_draws == 0


def test_sample_reuses_its_graph_and_respects_shape(rec, graphs):
    """sample(cuda_graph=True) captures once per settings and replays after that; `shape`
    is the captured sample's shape; every capture is clean."""
    model = _model("unet")

    def run(sampler="ddim", guidance=2.0, shape=(1, 16, 16), labels=(1, 2), **config):
        return sample(model, make_scheduler(sampler, backend="reference", **config), list(labels), STEPS, guidance,
                      device=DEVICE, cuda_graph=True, progress=False, shape=shape)

    assert run().shape == (2, 1, 16, 16) and (graphs.captures, graphs.replays) == (1, 1)
    assert run(labels=(7, 8)).shape == (2, 1, 16, 16) and (graphs.captures, graphs.replays) == (1, 2)
    run(guidance=3.0)
    assert graphs.captures == 2
    assert run(shape=(1, 8, 8)).shape == (2, 1, 8, 8) and graphs.captures == 3
    run(clip_sample=False)  # another schedule config: other coefficients, another graph
    assert graphs.captures == 4
    run()
    assert graphs.captures == 4 and graphs.replays == 6
    assert rec.events == []


@pytest.mark.parametrize("sampler", list(sampling.SAMPLERS))
def test_loop_fast_path_matches_public_step(sampler):
    """The loop's _prev_sample gives step(...).prev_sample bit for bit; the public output
    still carries pred_original_sample where diffusers' does (DDIM, DDPM)."""
    torch.manual_seed(0)
    x, cond, uncond = (torch.randn(2, 1, 8, 8) for _ in range(3))
    public, fast = make_scheduler(sampler, backend="reference"), make_scheduler(sampler, backend="reference")
    for s in (public, fast):
        s.set_timesteps(STEPS)
    extra = {"generator": None} if sampler != "euler" else {}
    for t in public.timesteps:
        noise = torch.randn_like(x) if sampler == "ddpm" else None
        kw = dict(model_output_uncond=uncond, guidance_scale=2.0, **extra)
        if noise is not None:
            kw["variance_noise"] = noise
        out = public.step(cond, t, x, **kw)
        prev = fast._prev_sample(cond, t, x, **kw)
        assert torch.equal(prev, out.prev_sample)
        if sampler in ("ddim", "ddpm"):
            assert out.pred_original_sample is not None and out.pred_original_sample.shape == x.shape
        x = prev
