"""torch.library.opcheck on every norm and sampler-update op, over input layouts and backends.

The fakes must return exactly the layout the kernels return (docs/design.md decision 4; the
layout rules are in each op's docstring and docs/internals.md, "Output layouts"). opcheck's
test_faketensor compares the fake's strides with the real output's; the other checks (schema,
autograd registration, AOT dispatch) run too. Small shapes: the whole file takes ~20 s on CPU.
"""
import importlib

import pytest
import torch

import flashdiff

# the modules, not the functions flashdiff.ops re-exports under the same names
gn_op = importlib.import_module("flashdiff.ops.group_norm")
sched_op = importlib.import_module("flashdiff.ops.scheduler")

from conftest import DEVICE_BACKENDS, require_backend

# Every check but test_aot_dispatch_dynamic for the triton interpreter: that one traces the
# backward, and a launcher cannot run on fake tensors (group norm's triton backward is called
# from the autograd formula, not through an op of its own). The compiled GPU run keeps it.
_ALL = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
_NO_AOT = _ALL[:3]


def _nchw(*shape):
    return torch.randn(*shape)


def _layouts_4d():
    """name -> a [2, 8, 5, 6] x in one layout (each a distinct case of the layout rules)."""
    base = _nchw(2, 8, 5, 6)
    cl = base.to(memory_format=torch.channels_last)
    return {
        "contiguous": base,
        "channels_last": cl,
        "transposed": _nchw(2, 8, 6, 5).transpose(2, 3),     # dense, spatial dims do not collapse
        "batch_permuted": _nchw(8, 2, 5, 6).transpose(0, 1),  # dense, collapsible, neither format
        "strided": _nchw(2, 8, 10, 6)[:, :, ::2],             # not dense
        "cl_channel_slice": _nchw(2, 16, 5, 6).to(memory_format=torch.channels_last)[:, :8],
    }


def _layouts_rows():
    """name -> a [..., D = 16] x in one layout."""
    return {
        "contiguous": torch.randn(2, 5, 16),
        "transposed": torch.randn(5, 2, 16).transpose(0, 1),
        "last_dim_strided": torch.randn(2, 5, 32)[..., ::2],
        "expanded": torch.randn(1, 5, 16).expand(2, 5, 16),
        "rank4_permuted": torch.randn(2, 3, 4, 16).permute(0, 2, 1, 3),
    }


def _utils(backend):
    return _NO_AOT if backend == "triton" else _ALL


def _grad(*tensors):
    return [t.detach().clone().requires_grad_() if i == 0 else t for i, t in enumerate(tensors)]


def _opcheck(op, args, backend):
    torch.library.opcheck(op, args, test_utils=_utils(backend))


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("layout", list(_layouts_4d()))
def test_group_norm_opcheck(device_backend, layout):
    device, backend = device_backend
    require_backend(device, backend)
    x = _layouts_4d()[layout].to(device)
    w, b = torch.randn(8, device=device), torch.randn(8, device=device)
    scale = torch.randn(2, 8, device=device)
    op = torch.ops.flashdiff.group_norm.default
    _opcheck(op, (x, 4, w, b, 1e-5, "silu", scale, None, backend), backend)
    # the eager result (what a user gets, through any path) has the fake's layout too
    y = flashdiff.group_norm(x, 4, w, b, activation="silu", scale=scale, backend=backend)
    assert y.stride() == gn_op.empty_output(x).stride(), (layout, y.stride())


def test_group_norm_layout_rule():
    """The documented function, spelled out (a fake that kept x's strides passed for the two
    formats and failed for these)."""
    layouts = _layouts_4d()
    assert gn_op.empty_output(layouts["channels_last"]).is_contiguous(memory_format=torch.channels_last)
    for name in ("transposed", "batch_permuted", "strided", "cl_channel_slice"):
        assert gn_op.empty_output(layouts[name]).is_contiguous(), name
    x3 = torch.randn(2, 7, 8).transpose(1, 2).transpose(1, 2)  # contiguous again
    assert gn_op.empty_output(x3).is_contiguous()
    x3cl = torch.randn(2, 7, 8).transpose(1, 2)                  # [N, C=8, L=7] stored [N, L, C]
    assert gn_op.empty_output(x3cl).stride() == x3cl.stride()


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("layout", list(_layouts_rows()))
@pytest.mark.parametrize("op_name", ["layer_norm", "rms_norm"])
def test_row_norm_opcheck(device_backend, layout, op_name):
    device, backend = device_backend
    require_backend(device, backend)
    x = _layouts_rows()[layout].to(device)
    w = torch.randn(16, device=device)
    if op_name == "layer_norm":
        scale = torch.randn(2, 16, device=device) if x.dim() == 3 else None  # per sample: x [N, T, D]
        args = (x, w, torch.randn(16, device=device), 1e-6, scale, None, "gelu", backend)
        y = flashdiff.layer_norm(x, 16, w, args[2], scale=args[4], activation="gelu", backend=backend)
    else:
        args = (x, w, 1e-6, backend)
        y = flashdiff.rms_norm(x, w, backend=backend)
    _opcheck(getattr(torch.ops.flashdiff, op_name).default, args, backend)
    assert y.is_contiguous() and y.shape == x.shape  # the documented layout


def _sched_cases(device):
    s = torch.randn(2, 4, 6, 5, device=device)
    cl = s.to(memory_format=torch.channels_last)
    tr = torch.randn(2, 4, 5, 6, device=device).transpose(2, 3)
    return {
        "contiguous": (s, torch.randn_like(s), None),
        "channels_last": (cl, torch.randn_like(cl), torch.randn_like(cl)),
        "cl_sample_contiguous_output": (cl, torch.randn_like(s), None),
        "contiguous_sample_cl_output": (s, torch.randn_like(cl), torch.randn_like(cl)),
        "transposed_mixed": (tr, torch.randn_like(s), torch.randn_like(tr)),
        "strided_sample": (torch.randn(2, 4, 12, 5, device=device)[:, :, ::2], torch.randn_like(s), None),
    }


@pytest.mark.parametrize("device_backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("case", list(_sched_cases("cpu")))
def test_scheduler_update_opcheck(device_backend, case):
    device, backend = device_backend
    require_backend(device, backend)
    sample, model_output, noise = _sched_cases(device)[case]
    coefs = flashdiff.ddim_coefs(0.5, 0.7, eta=0.3 if noise is not None else 0.0, device=device)
    op = torch.ops.flashdiff.scheduler_update.default
    _opcheck(op, (sample, model_output, coefs, None, noise, None, True, backend), backend)
    prev, x0 = flashdiff.scheduler_update(sample, model_output, coefs, noise=noise, return_x0=True,
                                          backend=backend)
    expected = sched_op.empty_output(sample).stride()
    assert prev.stride() == expected and x0.stride() == expected, (case, prev.stride(), expected)
