"""`patch(obj, cuda_graph=True)`: the denoiser's forward captured as CUDA graphs, one per input
signature, and replayed (as stable-fast does).

The denoiser is `pipe.unet` / `pipe.transformer` (and `pipe.transformer_2`) for a pipeline, or the
module itself. Its `forward` is replaced *on the instance* by a `GraphedForward`, so `unpatch`
restores the exact attribute that was there (usually none: the class's forward).

A call's signature is its (args, kwargs) tree: each tensor's shape, dtype, device and
requires_grad, each other value as is (so it must be hashable), `module.training`, and
whether inference mode is on.
The first call with a new signature warms up eagerly on a side stream, captures the forward into
a graph whose inputs are static buffers, and replays it; later calls with that signature copy
their tensors into the buffers and replay. All graphs of one module share one memory pool.
Outputs are cloned out of the graph's static outputs (see GraphedForward for why).

A call runs the original forward instead, with the reason recorded once per signature in
`report.graph_fallbacks`, when: grad mode is on or an input requires grad, an input is not on
CUDA (or inputs span devices), a CUDA graph capture is already under way (the outer graph then
records this forward), the signature cannot be hashed, MAX_GRAPHS capture attempts were
already made, or capturing this signature raised (never retried). Under torch.compile
tracing the wrapper steps aside without a record (tracing must not have side effects).

Only `_GraphRunner` touches CUDA; tests substitute a fake for it.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

MAX_GRAPHS = 8        # capture attempts (kept or failed) per module: each costs warm-up calls and a capture
MAX_RECORDS = 32      # fallback records per module, so a stream of new signatures cannot grow the report
WARMUP_CALLS = 2      # eager calls before capture: lazy init (cuBLAS workspaces, autotuning) off the graph
_DENOISERS = ("unet", "transformer", "transformer_2")  # transformer_2: Wan 2.2 switches between the two
_MISSING = object()
_SCALARS = (type(None), bool, int, float, complex, str, torch.dtype, torch.device)


class _GraphRunner:
    """One CUDA graph: warm-up on a side stream, capture, replay, release. The only code here
    that needs CUDA, so tests can swap in a fake with the same interface."""

    @staticmethod
    def unsupported(tensors: List[torch.Tensor]) -> Optional[str]:
        """Why these input tensors cannot be served by a graph here, or None."""
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            return f"inputs span devices {sorted(map(str, devices))}"
        device = next(iter(devices))
        if device.type != "cuda":
            return f"inputs on {device}, not CUDA"
        if torch.cuda.is_current_stream_capturing():
            return "called inside another CUDA graph capture (the outer graph records this forward)"
        return None

    def __init__(self, device: torch.device, pool: Any = None, warmup: int = WARMUP_CALLS):
        self.device, self.warmup = device, warmup
        self.graph: Optional[torch.cuda.CUDAGraph] = torch.cuda.CUDAGraph()
        self._pool = pool

    def capture(self, fn):
        """Warm `fn()` up off the graph, then capture it; returns the output objects the
        capture allocated (valid after each replay)."""
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())  # the static inputs were written there
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            inner = None
            try:
                with torch.cuda.graph(self.graph, pool=self._pool):
                    try:
                        return fn()
                    except Exception as e:
                        inner = e
                        raise
            except Exception as e:
                # capture_end's own error hides the cause: report what the forward raised
                if inner is not None and inner is not e:
                    raise inner from e
                raise

    @property
    def pool(self):
        """The handle later captures pass to share this graph's memory pool."""
        return self.graph.pool()

    def replay(self) -> None:
        with torch.cuda.device(self.device):
            self.graph.replay()

    def release(self) -> None:
        if self.graph is not None:
            self.graph.reset()
        self.graph = None


class _Captured:
    """One signature's graph: its static inputs (tensors in flattened-argument order) and
    static outputs (flattened, with their structure)."""

    def __init__(self, fn, leaves: List[Any], spec, runner_cls, pool):
        static = [v.detach().clone() if isinstance(v, torch.Tensor) else v for v in leaves]
        self.inputs = [v for v in static if isinstance(v, torch.Tensor)]
        args, kwargs = tree_unflatten(static, spec)
        self.runner = runner_cls(self.inputs[0].device, pool)
        out = self.runner.capture(lambda: fn(*args, **kwargs))
        self.outputs, self.out_spec = tree_flatten(out)
        bad = {type(v).__name__ for v in self.outputs if not isinstance(v, (torch.Tensor,) + _SCALARS)}
        if bad:  # an opaque output object may hold graph memory we could not clone out
            self.runner.release()
            raise TypeError(f"output holds {sorted(bad)}, which torch's pytree cannot open")

    def __call__(self, tensors: List[torch.Tensor]):
        for buf, t in zip(self.inputs, tensors):
            buf.copy_(t)
        self.runner.replay()
        return tree_unflatten([v.clone() if isinstance(v, torch.Tensor) else v for v in self.outputs],
                              self.out_spec)

    def release(self) -> None:
        self.runner.release()
        self.inputs = self.outputs = []


def _leaf_key(v):
    if isinstance(v, torch.Tensor):
        return (v.shape, v.dtype, v.device, v.requires_grad)
    return (type(v), v)  # the type too: 1, 1.0 and True hash alike


class _Leaf:
    """A leaf of a signature, printed short: `float32[2, 4, 8, 8]@cuda:0` or the value."""

    def __init__(self, key):
        self.key = key

    def __repr__(self):
        k = self.key
        if isinstance(k[0], torch.Size):
            grad = ", requires_grad" if k[3] else ""
            return f"{str(k[1]).replace('torch.', '')}{list(k[0])}@{k[2]}{grad}"
        return repr(k[1])[:60]


def _describe(leaf_keys, spec) -> str:
    args, kwargs = tree_unflatten([_Leaf(k) for k in leaf_keys], spec)
    parts = [repr(a) for a in args] + [f"{name}={v!r}" for name, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


class GraphedForward:
    """The instance-level `forward` that `patch(..., cuda_graph=True)` installs.

    Outputs are clones of the graph's static outputs. Returning the static tensors themselves
    would save one copy of the output per call, but the next replay overwrites them, and some
    diffusers pipelines call the denoiser twice per step with one signature before using either
    result (Wan's cond/uncond passes, Flux's true CFG): those would silently combine two copies
    of the second output. The clone is one device copy of a latent-sized tensor, small beside a
    U-Net or transformer forward, and returned tensors never pin the graphs' pool.

    `stats` counts captures, replays and eager calls.
    """

    def __init__(self, module: nn.Module, where: str, report):
        self.module, self.where, self.report = module, where, report
        self._saved = module.__dict__.get("forward", _MISSING)
        self.forward = module.forward  # what every eager call and every capture runs
        functools.update_wrapper(self, self.forward)  # inspect.signature(module.forward) still works
        self.graphs: Dict[Any, _Captured] = {}
        self.failed: Dict[Any, str] = {}   # signatures never to capture (again)
        self.stats = {"captures": 0, "replays": 0, "eager": 0}
        self.active = True
        self._noted = set()
        self._pool = None
        self._weights = None
        params = list(module.parameters())
        # `.to()` and offloading move all weights at once: two pointers show a move cheaply
        self._probe = [params[0], params[-1]] if params else []
        module.forward = self

    def __call__(self, *args, **kwargs):
        if not self.active or torch.compiler.is_compiling():
            return self.forward(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        leaf_keys = [_leaf_key(v) for v in leaves]
        # inference mode is keyed: its static buffers are inference tensors, not writable outside it
        key = (self.module.training, torch.is_inference_mode_enabled(), spec, tuple(leaf_keys))
        tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
        reason = self._eager_reason(key, tensors)
        if reason is None:
            graph = self.graphs.get(key)
            if graph is not None:
                self.stats["replays"] += 1
                return graph(tensors)
            reason = self.failed.get(key) or self._capture(key, leaves, spec)
            if reason is None:
                self.stats["replays"] += 1
                return self.graphs[key](tensors)
        self._note(key, leaf_keys, spec, reason)
        self.stats["eager"] += 1
        return self.forward(*args, **kwargs)

    def _eager_reason(self, key, tensors) -> Optional[str]:
        """Why this call cannot use a graph at all (before looking one up), or None. Releases
        the graphs when the weights have moved since they were captured."""
        if torch.is_grad_enabled():
            return "grad mode is enabled (graphs serve inference: call under torch.no_grad())"
        if not tensors:
            return "no tensor inputs"
        if any(t.requires_grad for t in tensors):
            return "an input requires grad"
        reason = _GraphRunner.unsupported(tensors)
        if reason is not None:
            return reason
        try:
            hash(key)
        except TypeError as e:
            return f"an argument is not hashable, so cannot key a graph ({e})"
        if self.graphs and self._weight_addresses() != self._weights:
            n = len(self.graphs)
            self.release()  # the graphs read the old addresses
            self._record("*", f"weights moved since capture (.to(), offload): {n} graph(s) released, recapturing")
        return None

    def _weight_addresses(self):
        return tuple(p.data_ptr() for p in self._probe)

    def _capture(self, key, leaves, spec) -> Optional[str]:
        """Capture `key`'s graph; None on success, else the reason (also kept in `failed`)."""
        if len(self.graphs) + len(self.failed) >= MAX_GRAPHS:  # not kept in `failed`: that stays bounded
            return f"graph cap reached ({MAX_GRAPHS} capture attempts on this module)"
        try:
            graph = _Captured(self.forward, leaves, spec, _GraphRunner, self._pool)
        except Exception as e:  # any failure: this signature runs eagerly from now on
            self.failed[key] = f"capture failed, not retried: {type(e).__name__}: {e}"[:400]
            return self.failed[key]
        self.stats["captures"] += 1
        # read after the capture: an offload hook inside the forward may have just moved the weights
        self._weights = self._weight_addresses()
        if self._pool is None:
            self._pool = graph.runner.pool
        self.graphs[key] = graph
        return None

    def _note(self, key, leaf_keys, spec, reason: str) -> None:
        try:
            tag = (key, reason)
            hash(tag)
        except TypeError:
            tag = reason  # unhashable signature: one record per reason
        if tag in self._noted or len(self._noted) > MAX_RECORDS:
            return
        self._noted.add(tag)
        if len(self._noted) > MAX_RECORDS:  # e.g. a new Python-float timestep every step
            self._record("*", f"more than {MAX_RECORDS} fallback records on this module: no more are kept")
        else:
            self._record(_describe(leaf_keys, spec), reason)

    def _record(self, signature: str, reason: str) -> None:
        self.report.graph_fallbacks.append((self.where, signature, reason))

    def release(self) -> None:
        """Drop every graph (their pool memory goes back to torch's caching allocator)."""
        for graph in self.graphs.values():
            graph.release()
        self.graphs.clear()
        self._pool = None

    def remove(self) -> None:
        """Undo: release the graphs and restore the module's own `forward` attribute. If
        something wrapped `forward` after us, we stay in its chain as a plain pass-through."""
        self.release()
        self.failed.clear()
        self.active = False
        if self.module.__dict__.get("forward") is self:
            if self._saved is _MISSING:
                del self.module.__dict__["forward"]
            else:
                self.module.__dict__["forward"] = self._saved


def _graph_denoisers(obj, state, report) -> None:
    """Install a GraphedForward on `obj`'s denoiser(s); record it in `state` for unpatch."""
    if isinstance(obj, nn.Module):
        targets = [("", obj)]
    else:
        targets = [(n, getattr(obj, n, None)) for n in _DENOISERS]
        targets = [(n, m) for n, m in targets if isinstance(m, nn.Module)]
        if not targets:
            report.left_alone.append(("cuda_graph", "", "the pipeline has no unet or transformer to capture"))
    for where, module in targets:
        if isinstance(module.__dict__.get("forward"), GraphedForward):
            report.left_alone.append(("cuda_graph", where, "forward already graphed by another patch"))
            continue
        state.graphs.append(GraphedForward(module, where, report))
        report.replaced.append(("cuda_graph", where, f"forward captured per input signature "
                                                     f"(at most {MAX_GRAPHS} graphs)"))
