"""Multi-GPU attention and sampling on torch.distributed (docs/distributed.md).

Sequence parallelism splits the token sequence of one image across ranks:

    ulysses_attention(q, k, v, group)   all-to-all sequence-sharded -> head-sharded, local
                                        attention over the whole sequence, all-to-all back
    ring_attention(q, k, v, group)      K/V blocks travel around the ring (overlapped with the
                                        attention of the block in hand); partial results
                                        (flashdiff.attention(return_lse=True) where it exists)
                                        are merged by log-sum-exp
    usp_attention(q, k, v, ug, rg)      both: Ulysses inside `ug`, ring across `rg`

q, k, v are [B, H, S_local, D] on every rank: rank i of the group holds sequence shard i, and
every rank holds shards of equal length (S divisible by the degree; `parallelize` pads a
model's tokens to make it so). A key-padding mask is bool [B, 1, 1, Skv_local], sharded along
keys with K/V (True = attend). Sq may differ from Skv (q and k/v sharded separately).

Model-level parallelism for flashdiff's DiT:

    model = parallelize(load_pretrained("digits-dit"), ulysses=2, cfg=2)   # 4 ranks
    x = flashdiff.sampling.sample(model, scheduler, labels, generator=...)  # same x on every rank
    unparallelize(model)                                                     # the DiT, as before

and `sample_data_parallel` (a batch of labels split across ranks, samples gathered).

Everything here is forward-only (no autograd through the collectives): it is for sampling.
Collectives are torch.distributed's (NCCL on GPUs, gloo on CPUs); nothing here is a transport.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import _validate as check
from .ops.attention import attention

__all__ = [
    "attention_with_lse", "merge_attention", "ulysses_attention", "ring_attention", "usp_attention",
    "usp_groups", "parallelize", "unparallelize", "ParallelDiT", "sample_data_parallel", "communication_model",
]


# ================================================================== partial attention + merge
def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       key_padding_mask: Optional[torch.Tensor] = None,
                       scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over one block of keys, with its log-sum-exp: (out, lse).

    q [B, H, Sq, D], k/v [B, H, Skv, D]; key_padding_mask bool [B, Skv] (True = attend) or None.
    out: [B, H, Sq, D] in q's dtype; lse: fp32 [B, H, Sq], natural log of Σ_j exp(scale·q·k_j)
    over the attended keys. A row with no key to attend gives out 0 and lse -inf.

    This is the torch reference (scores are materialized in fp32, one [B, H, Sq, Skv] block):
    the ring uses it only where `flashdiff.attention` has no `return_lse` (see _block_attention).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale       # [B, H, Sq, Skv]
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                        # -inf on empty rows
    # exp(-inf - 0) = 0 on empty rows, where exp(scores - lse) would be exp(nan)
    p = torch.exp(scores - _finite_or_zero(lse).unsqueeze(-1))
    return torch.matmul(p, v.float()).to(q.dtype), lse


def merge_attention(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor],
                    out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over disjoint key blocks: (out, lse) of the union of the blocks.

    outs[i] [B, H, Sq, D] (any float dtype), lses[i] fp32 [B, H, Sq] (natural log).
    out = Σ_i exp(lse_i − lse)·out_i with lse = log Σ_i exp(lse_i), computed in fp32.
    An empty block (lse -inf, or +inf as FlashAttention-2 writes it) contributes nothing; a row
    empty in every block gives out 0 and lse -inf, never NaN. out_dtype defaults to outs[0]'s.
    This is the torch reference; the ring takes `flashdiff.merge_attention` (same contract,
    fused) where this build has it.
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"outs and lses must be non-empty and of equal length, got {len(outs)} and {len(lses)}")
    lse_all = torch.stack([_as_lse(l) for l in lses])                              # [n, B, H, Sq]
    lse = torch.logsumexp(lse_all, dim=0)                                        # -inf if all are
    weights = torch.exp(lse_all - _finite_or_zero(lse))                           # 0 for empty blocks
    out = sum(w.unsqueeze(-1) * o.float() for w, o in zip(weights, outs))
    return out.to(out_dtype or outs[0].dtype), lse


def _finite_or_zero(lse):
    return torch.where(torch.isinf(lse), torch.zeros((), dtype=lse.dtype, device=lse.device), lse)


def _as_lse(lse):
    lse = lse.float()
    return torch.where(torch.isposinf(lse), torch.full((), float("-inf"), device=lse.device), lse)


try:  # the fused kernels' lse and merge, where this build has them
    from .ops import merge_attention as _fused_merge
    FUSED_PARTIALS = "return_lse" in inspect.signature(attention).parameters
except ImportError:
    _fused_merge, FUSED_PARTIALS = None, False


def _block_attention(q, k, v, mask, scale, backend=None):
    """(out, lse) of q over one K/V block, the ring's partial result (mask bool [B, Skv] or None):
    `flashdiff.attention(..., return_lse=True)` where it exists (fused, no [Sq, Skv] scores in
    memory), else the torch reference `attention_with_lse`. Same contract: lse fp32, -inf on a
    row without keys (out 0 there)."""
    if FUSED_PARTIALS:
        return attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :], scale=scale,
                         backend=backend, return_lse=True)
    return attention_with_lse(q, k, v, mask, scale)


def _merge_into(out, lse, o_i, lse_i):
    """The ring's running merge, fp32: the first block starts it (out None)."""
    if out is None:
        return o_i.float(), lse_i
    merge = _fused_merge if FUSED_PARTIALS else merge_attention
    return merge([out, o_i], [lse, lse_i], torch.float32)


# ================================================================== validation
def _check_group(name, group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group first")
    if group is None:
        return dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"{name}: this rank ({dist.get_rank()}) is not a member of the group")
    return group


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check.tensor(name, t, dim=4)
    check.same_device("q", q, k=k, v=v)
    check.same_dtype("q", q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q and k must share batch, heads and head_dim ([B, H, ., D]): "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}")


def _local_key_mask(attn_mask, q, k):
    """The local key-padding mask as bool [B, Skv_local], or None."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask must be a bool key-padding mask (True = attend), got {attn_mask.dtype}")
    check.same_device("q", q, attn_mask=attn_mask)
    B, Skv = q.shape[0], k.shape[2]
    if attn_mask.dim() != 4 or attn_mask.shape[1:3] != (1, 1) or attn_mask.shape[0] not in (1, B) \
            or attn_mask.shape[3] != Skv:
        raise ValueError(f"attn_mask must be a key-padding mask [B, 1, 1, Skv_local] = [{B}, 1, 1, {Skv}] "
                         f"(this rank's key shard), got shape {tuple(attn_mask.shape)}")
    return attn_mask[:, 0, 0, :].expand(B, Skv)


def _gather_key_mask(mask, group):
    """All ranks' key masks [B, Skv_local] -> [B, P·Skv_local] in group-rank order (the order of
    the gathered sequence). gloo has no bool collectives, hence uint8."""
    parts = [torch.empty_like(mask, dtype=torch.uint8) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mask.to(torch.uint8).contiguous(), group=group)
    return torch.cat(parts, dim=1).bool()


# ================================================================== Ulysses
def _seq_to_heads(x, P, group):
    """[n, B, H, S_l, D] sequence-sharded -> [n, B, H/P, P·S_l, D] head-sharded (one all-to-all)."""
    n, B, H, S, D = x.shape
    send = x.reshape(n, B, P, H // P, S, D).permute(2, 0, 1, 3, 4, 5).contiguous()   # chunk j -> rank j
    recv = torch.empty_like(send)                                                  # [P(src), n, B, H/P, S_l, D]
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 3, 0, 4, 5).reshape(n, B, H // P, P * S, D)


def _heads_to_seq(x, P, group):
    """Inverse of _seq_to_heads for one tensor: [B, H/P, P·S_l, D] -> [B, H, S_l, D]."""
    B, Hp, S, D = x.shape
    send = x.reshape(B, Hp, P, S // P, D).permute(2, 0, 1, 3, 4).contiguous()         # seq chunk j -> rank j
    recv = torch.empty_like(send)                                                  # [P(head chunk), B, H/P, S_l, D]
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 0, 2, 3, 4).reshape(B, P * Hp, S // P, D)


def _ulysses(q, k, v, group, mask, local):
    """Ulysses around `local(q, k, v, mask) -> o`, the attention over the whole sequence
    (mask: the gathered bool [B, Skv] or None)."""
    P = dist.get_world_size(group)
    if P == 1:
        return local(q, k, v, mask)
    if q.shape == k.shape:  # one all-to-all for q, k and v
        q, k, v = _seq_to_heads(torch.stack((q, k, v)), P, group)
    else:                   # Sq != Skv: q alone, k and v together
        q = _seq_to_heads(q[None], P, group)[0]
        k, v = _seq_to_heads(torch.stack((k, v)), P, group)
    mask = None if mask is None else _gather_key_mask(mask, group)
    return _heads_to_seq(local(q, k, v, mask), P, group)


def _check_heads(H, P, name="group"):
    if H % P:
        raise ValueError(f"the number of heads ({H}) must be divisible by the Ulysses degree (size of {name}: {P}): "
                         "the all-to-all gives each rank H/P whole heads; use ring_attention or usp_attention "
                         "with a Ulysses degree that divides the heads")


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None,
                      attn_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                      backend: Optional[str] = None) -> torch.Tensor:
    """DeepSpeed-Ulysses attention: sequence-sharded in, sequence-sharded out.

    q [B, H, Sq_local, D], k/v [B, H, Skv_local, D] on each rank of `group` (None = the default
    group), rank i holding shard i; equal shard lengths on every rank. One all-to-all turns
    q, k, v into [B, H/P, S, D] (whole sequence, H/P heads), `flashdiff.attention` runs locally
    (with `backend`), one all-to-all brings the output back to [B, H, Sq_local, D].
    H must be divisible by the group size P. attn_mask: bool [B, 1, 1, Skv_local] or None.
    Bytes sent per rank: (P−1)/P of q, k, v and o's local shards.
    """
    group = _check_group("group", group)
    _check_qkv(q, k, v)
    mask = _local_key_mask(attn_mask, q, k)
    _check_heads(q.shape[1], dist.get_world_size(group))

    def local(q, k, v, mask):
        return attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :], scale=scale,
                         backend=backend)
    return _ulysses(q, k, v, group, mask, local)


# ================================================================== ring
def _ring(q, k, v, group, mask, scale, backend=None):
    """Ring attention core. mask: this rank's bool [B, Skv_local] or None."""
    P, r = dist.get_world_size(group), dist.get_rank(group)
    if P == 1:
        return _block_attention(q, k, v, mask, scale, backend)[0]
    masks = None if mask is None else _gather_key_mask(mask, group).chunk(P, dim=1)
    nxt_rank, prv_rank = dist.get_global_rank(group, (r + 1) % P), dist.get_global_rank(group, (r - 1) % P)
    cur = torch.stack((k, v))               # one message per hop: K and V together
    buf = torch.empty_like(cur)
    out = lse = None
    for step in range(P):
        pending = []
        if step < P - 1:  # post the next hop before computing on the block in hand (overlap)
            pending = dist.batch_isend_irecv([dist.P2POp(dist.isend, cur, nxt_rank, group),
                                              dist.P2POp(dist.irecv, buf, prv_rank, group)])
        src = (r - step) % P                # the rank whose K/V shard is in hand
        o_i, lse_i = _block_attention(q, cur[0], cur[1], None if masks is None else masks[src], scale, backend)
        # running merge in fp32: one rounding to q's dtype at the end
        out, lse = _merge_into(out, lse, o_i, lse_i)
        for work in pending:
            work.wait()
        cur, buf = buf, cur                 # the sent block's buffer receives the next hop
    return out.to(q.dtype)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None,
                   attn_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                   backend: Optional[str] = None) -> torch.Tensor:
    """Ring attention: sequence-sharded in, sequence-sharded out, no constraint on heads.

    q [B, H, Sq_local, D], k/v [B, H, Skv_local, D] on each rank of `group` (None = the default
    group), equal shard lengths on every rank. P steps: each rank attends its queries to the
    K/V block in hand (`flashdiff.attention(..., return_lse=True)` with `backend` where this
    build has it, else `attention_with_lse`) while `batch_isend_irecv` passes the block on to
    the next rank; partial results are combined by log-sum-exp in fp32 (`flashdiff.merge_attention`,
    else this module's `merge_attention`). attn_mask: bool [B, 1, 1, Skv_local] (this rank's
    keys) or None. Bytes sent per rank: K and V's local shards, P−1 times.
    """
    group = _check_group("group", group)
    _check_qkv(q, k, v)
    if scale is not None:
        check.finite_number("scale", scale)
    return _ring(q, k, v, group, _local_key_mask(attn_mask, q, k), scale, backend)


# ================================================================== USP
def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ulysses_group, ring_group,
                  attn_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """Unified sequence parallelism (USP): Ulysses inside `ulysses_group`, ring across `ring_group`.

    The sequence is sharded over Pu·Pr ranks; the all-to-all inside a Ulysses group gathers its
    Pu shards for H/Pu heads, the ring then passes those gathered K/V chunks around the ring
    group. Build the two groups with `usp_groups(ulysses, ring)` (rank i of the parent holds
    shard i). H must be divisible by Pu. attn_mask: bool [B, 1, 1, Skv_local] or None.
    """
    ulysses_group = _check_group("ulysses_group", ulysses_group)
    ring_group = _check_group("ring_group", ring_group)
    _check_qkv(q, k, v)
    if scale is not None:
        check.finite_number("scale", scale)
    mask = _local_key_mask(attn_mask, q, k)
    _check_heads(q.shape[1], dist.get_world_size(ulysses_group), "ulysses_group")
    return _ulysses(q, k, v, ulysses_group, mask,
                    lambda q, k, v, m: _ring(q, k, v, ring_group, m, scale))


# ================================================================== groups
_SUBGROUPS: dict = {}


def _subgroup(ranks: Sequence[int]):
    """The process group of these global ranks (created once; only members call this: the groups
    use local synchronization, so each rank creates just the groups it belongs to)."""
    ranks = tuple(ranks)
    world = dist.group.WORLD
    if _SUBGROUPS.get("world") is not world:  # a new init_process_group: the old groups are gone
        _SUBGROUPS.clear()
        _SUBGROUPS["world"] = world
    if ranks not in _SUBGROUPS:
        _SUBGROUPS[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
    return _SUBGROUPS[ranks]


def _degree(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


@dataclass
class _Layout:
    """Where this rank sits: cfg branch x (ring x ulysses) grid, contiguous Ulysses groups
    (the all-to-all is the bandwidth-hungry collective: keep it on the closest ranks)."""
    ranks: tuple      # the parent group's global ranks, in group-rank order
    ulysses: int
    ring: int
    cfg: int
    index: int        # this rank's position in `ranks`

    @property
    def sp(self):
        return self.ulysses * self.ring

    @property
    def branch(self):
        return self.index // self.sp

    @property
    def sp_rank(self):
        return self.index % self.sp

    def sp_ranks(self):
        base = self.branch * self.sp
        return self.ranks[base:base + self.sp]

    def ulysses_ranks(self):
        base = self.branch * self.sp + (self.sp_rank // self.ulysses) * self.ulysses
        return self.ranks[base:base + self.ulysses]

    def ring_ranks(self):
        base = self.branch * self.sp + self.sp_rank % self.ulysses
        return self.ranks[base:base + self.sp:self.ulysses]

    def cfg_ranks(self):
        return self.ranks[self.sp_rank::self.sp]


def _layout(ulysses, ring, cfg, group):
    group = _check_group("group", group)
    degrees = [_degree(n, v) for n, v in (("ulysses", ulysses), ("ring", ring), ("cfg", cfg))]
    size = dist.get_world_size(group)
    if math.prod(degrees) != size:
        raise ValueError(f"ulysses × ring × cfg must equal the group size: {ulysses} × {ring} × {cfg} != {size}")
    ranks = tuple(dist.get_process_group_ranks(group))
    return _Layout(ranks, ulysses, ring, cfg, dist.get_rank(group))


def usp_groups(ulysses: int, ring: int, group=None):
    """(ulysses_group, ring_group) of this rank for `usp_attention`, ulysses × ring = size of
    `group` (None = default group). Every rank of `group` must call it (same arguments)."""
    lay = _layout(ulysses, ring, 1, group)
    return _subgroup(lay.ulysses_ranks()), _subgroup(lay.ring_ranks())


# ================================================================== DiT parallelism
def _all_gather_cat(x, group, dim):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _SeqState:
    """Per-forward token bookkeeping: T tokens padded to T + pad, key mask for the padding."""

    def __init__(self, tokens, sp, batch, device):
        self.tokens = tokens
        self.pad = (-tokens) % sp
        self.local = (tokens + self.pad) // sp
        self.key_mask = None
        if self.pad:
            keep = torch.arange(tokens + self.pad, device=device) < tokens
            self.key_mask = keep.expand(batch, -1)


class ParallelDiT(nn.Module):
    """A DiT whose forward runs sequence-parallel (Ulysses / ring / both) and CFG-parallel.
    Built by `parallelize`; attributes not found here are the wrapped model's (num_classes,
    sample_size, checkpoint_info, ...), so `flashdiff.sampling.sample` takes it as a model."""

    def __init__(self, model: nn.Module, layout: _Layout):
        super().__init__()
        self.module = model
        self.layout = layout
        self._state: Optional[_SeqState] = None
        self._handles = []
        self._patched = []
        lay = layout
        self.cfg_group = _subgroup(lay.cfg_ranks()) if lay.cfg > 1 else None
        self.sp_group = _subgroup(lay.sp_ranks()) if lay.sp > 1 else None
        ug = _subgroup(lay.ulysses_ranks()) if lay.ulysses > 1 else None
        rg = _subgroup(lay.ring_ranks()) if lay.ring > 1 else None
        if lay.sp > 1:
            self._attend = self._make_attend(ug, rg)
            self._install()
        model._flashdiff_parallel = True

    def _make_attend(self, ug, rg):
        """attend(q, k, v, key_mask_local [B, S_l] or None, backend) -> o, on sequence shards."""
        def attend(q, k, v, mask, backend):
            if ug is not None and rg is not None:
                return _ulysses(q, k, v, ug, mask, lambda q, k, v, m: _ring(q, k, v, rg, m, None, backend))
            if ug is not None:
                return _ulysses(q, k, v, ug, mask, lambda q, k, v, m: attention(
                    q, k, v, attn_mask=None if m is None else m[:, None, None, :], backend=backend))
            return _ring(q, k, v, rg, mask, None, backend)
        return attend

    def _install(self):
        model = self.module
        self._handles.append(model.blocks[0].register_forward_pre_hook(self._shard_tokens))
        self._handles.append(model.final_layer.register_forward_hook(self._gather_tokens))
        for block in model.blocks:
            # cross-attention needs nothing: its keys (the context) are whole on every rank
            block.attn.forward = functools.partial(_sequence_parallel_self_attention, block.attn, self)
            self._patched.append(block.attn)

    def _shard_tokens(self, _module, args):
        x, rest = args[0], args[1:]                                               # (N, T, D)
        st = self._state
        if st is None:
            raise RuntimeError("this DiT is parallelized: call the wrapper parallelize returned "
                               "(or unparallelize it first)")
        if st.pad:
            x = torch.cat([x, x.new_zeros(x.shape[0], st.pad, x.shape[2])], dim=1)
        i = self.layout.sp_rank
        return (x[:, i * st.local:(i + 1) * st.local], *rest)

    def _gather_tokens(self, _module, _args, out):
        return _all_gather_cat(out, self.sp_group, dim=1)[:, :self._state.tokens]  # (N, T, p²·C)

    def forward(self, x, t, y, context=None, context_mask=None):
        lay = self.layout
        if lay.cfg > 1:
            if x.shape[0] % lay.cfg:
                raise ValueError(f"x: cfg={lay.cfg} splits the batch (cond | uncond) in {lay.cfg} equal parts; "
                                 f"got batch {x.shape[0]}")
            n, b = x.shape[0] // lay.cfg, lay.branch
            part = lambda a: a if a is None or a.dim() == 0 else a[b * n:(b + 1) * n]  # noqa: E731
            x, t, y, context, context_mask = map(part, (x, t, y, context, context_mask))
        if lay.sp > 1:
            grid = self.module.grid
            self._state = _SeqState(grid * grid, lay.sp, x.shape[0], x.device)
        try:
            out = self.module(x, t, y, context, context_mask)
        finally:
            self._state = None
        return out if lay.cfg == 1 else _all_gather_cat(out, self.cfg_group, dim=0)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":  # not set yet (during __init__): no recursion
                raise
            return getattr(self.module, name)

    def restore(self) -> nn.Module:
        for handle in self._handles:
            handle.remove()
        for module in self._patched:
            del module.forward  # back to the class's forward
        self._handles, self._patched = [], []
        model = self.module
        del model._flashdiff_parallel
        return model


def _sequence_parallel_self_attention(module, wrapper, x, context=None, key_padding_mask=None):
    """flashdiff.nn.Attention.forward for one self-attention layer on a token shard: the same
    projections, the distributed attention between them. x: [B, S_local, dim]."""
    if key_padding_mask is not None:
        raise NotImplementedError("sequence-parallel self-attention takes no key_padding_mask (the DiT passes none)")
    B, S, _ = x.shape
    H, D = module.heads, module.head_dim
    q, k, v = module.to_qkv(x).view(B, S, 3, H, D).permute(2, 0, 3, 1, 4)          # 3 × (B, H, S_l, D)
    st = wrapper._state
    mask = None
    if st.key_mask is not None:
        i = wrapper.layout.sp_rank
        mask = st.key_mask[:B, i * st.local:(i + 1) * st.local]
    o = wrapper._attend(q, k, v, mask, module.backend)                               # (B, H, S_l, D)
    return module.proj(o.transpose(1, 2).reshape(B, S, H * D))


def parallelize(model: nn.Module, ulysses: int = 1, ring: int = 1, cfg: int = 1, group=None) -> ParallelDiT:
    """Run a flashdiff DiT on ulysses × ring × cfg ranks of `group` (None = default group).

    Every rank of the group calls this (and then the sampler) with the same model weights and
    arguments. Per forward, every rank patchifies the whole input and keeps its slice of the
    tokens (padded to a multiple of ulysses × ring; the padding is masked out of every key
    set); self-attention runs as Ulysses, ring or USP attention; the final layer's tokens are
    all-gathered, so every rank returns the whole output. cfg=2 runs the two halves of the
    batch (the sampler's cond | uncond) on two rank groups and all-gathers the outputs, so the
    fused scheduler step combines them identically on every rank.

    Rank layout (group ranks): cfg branch-major, then ring, then Ulysses (contiguous Ulysses
    groups). The model is patched in place (hooks on blocks[0] and final_layer, the blocks'
    self-attention forward): `unparallelize` undoes it.
    """
    from .models.dit import DiT

    if not isinstance(model, DiT):
        raise TypeError(f"model must be a flashdiff DiT (flashdiff.models.DiT), got {type(model).__name__}")
    if getattr(model, "_flashdiff_parallel", None) is not None:
        raise ValueError("model is already parallelized: call unparallelize(wrapper) first")
    layout = _layout(ulysses, ring, cfg, group)
    _check_heads(model.config.num_heads, ulysses, "the Ulysses degree")
    return ParallelDiT(model, layout)


def unparallelize(wrapper: ParallelDiT) -> nn.Module:
    """Undo `parallelize`: remove the hooks and the attention swap; returns the plain model."""
    if not isinstance(wrapper, ParallelDiT):
        raise TypeError(f"wrapper must be what parallelize returned (ParallelDiT), got {type(wrapper).__name__}")
    return wrapper.restore()


# ================================================================== data parallel
def sample_data_parallel(model: nn.Module, scheduler, labels, group=None, seed: int = 0,
                         **sample_kwargs) -> torch.Tensor:
    """Split `labels` across the ranks of `group` (contiguous chunks, sizes differing by at most
    one), sample each chunk with `flashdiff.sampling.sample` (generator seeded seed + rank) and
    all-gather: every rank returns all N samples, in label order. The samples therefore depend
    on the number of ranks (each chunk draws its own noise). Every rank calls it alike."""
    from .sampling import sample

    group = _check_group("group", group)
    if "generator" in sample_kwargs:
        raise ValueError("generator: sample_data_parallel seeds one generator per rank (seed + rank); pass seed")
    P, r = dist.get_world_size(group), dist.get_rank(group)
    device = torch.device(sample_kwargs.get("device") or next(model.parameters()).device)
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {tuple(labels.shape)}")
    sizes = [len(c) for c in torch.tensor_split(torch.arange(len(labels)), P)]
    start, most = sum(sizes[:r]), max(sizes)
    shape = tuple(sample_kwargs.get("shape") or (model.in_channels, model.sample_size, model.sample_size))
    dtype = next(model.parameters()).dtype
    mine = torch.zeros((most, *shape), dtype=dtype, device=device)  # padded: all_gather takes equal sizes
    if sizes[r]:
        gen = torch.Generator(device).manual_seed(seed + r)
        mine[:sizes[r]] = sample(model, scheduler, labels[start:start + sizes[r]], generator=gen, **sample_kwargs)
    parts = [torch.empty_like(mine) for _ in range(P)]
    dist.all_gather(parts, mine, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


# ================================================================== communication model
def communication_model(seq_len: int, heads: int, head_dim: int, ranks: int, bytes_per_element: int = 2,
                        link_gbytes_per_s: float = 450.0, attention_tflops: float = 400.0) -> dict:
    """Per attention layer and rank: bytes sent and modelled seconds of Ulysses vs ring
    (docs/distributed.md states the assumptions). M = seq_len·heads·head_dim·bytes (one of q,
    k, v, o whole); Ulysses sends 4 tensors' (P−1)/P of the local shard (not overlapped),
    ring sends K and V's local shards P−1 times (overlapped with the block attention).
    Returns bytes, seconds and the sequence length above which ring is faster."""
    P, b = ranks, bytes_per_element
    bw, flops = link_gbytes_per_s * 1e9, attention_tflops * 1e12
    M = seq_len * heads * head_dim * b
    ulysses_bytes = 4 * (M / P) * (P - 1) / P
    ring_bytes = 2 * (M / P) * (P - 1)
    block_compute = 4 * heads * (seq_len / P) ** 2 * head_dim / flops             # one ring step
    block_comm = 2 * (M / P) / bw                                                  # one K/V hop
    attn = P * block_compute                                                       # all of a rank's attention
    ulysses_s = attn + ulysses_bytes / bw
    ring_s = block_compute + (P - 1) * max(block_compute, block_comm)
    # ring wins once (1 − 2/P)·block_comm < block_compute, i.e. S > (P − 2)·b·F / (2·BW)
    crossover = (P - 2) * b * flops / (2 * bw)
    return {"ulysses_bytes": ulysses_bytes, "ring_bytes": ring_bytes, "attention_s": attn,
            "ulysses_s": ulysses_s, "ring_s": ring_s, "ring_wins_above_seq_len": crossover,
            "ring_hidden_above_seq_len": P * b * flops / (2 * bw)}
