"""``flex_attention`` on sequence-sharded q/k/v: Ulysses inside, Ring across, with global mask semantics.

Shape legend: B batch, H / Hk query / key-value heads, s local sequence length, S a ring chunk (what a
rank holds after the Ulysses exchange), D head dim, Dv value head dim.

**The algorithm** (``flex_sp_attention``). Ulysses trades sequence for heads inside the ring row
(``scatter_heads``: a rank then holds its heads, ``HeadSplit.q_ranges[u]``, of the whole ring chunk);
Ring rotates K/V chunks between rows (``RingPass``); each visiting block is one local ``flex_attention``
call whose ``mask_mod`` / ``score_mod`` are wrapped to see *global* indices: head ``h + q_ranges[u][0]``,
query ``q_idx + ring chunk offset``, key ``kv_idx + offset of the visiting chunk`` (integer arithmetic on
the index tensors; no host reads). The blocks merge by log-sum-exp (``merge_partials``). flex's own
log-sum-exp is natural log at the public API (the operator works in log2 and the API multiplies by
``ln 2``), and a row with no keys gets ``lse = -inf`` and ``out = 0``: meshsp's convention already.

**The mask.** A ``BlockMask`` means: key block ``kb`` is visible to query block ``qb`` when listed
(partial or full), and inside a partial block ``mask_mod`` decides. The local call gets a BlockMask
rebuilt for its own shape (``create_block_mask``, the given mask's block size and batch/head
broadcasting) from ``effective(b, h, q, kv) = listed[qb, kb] & (full[qb, kb] | mask_mod(b, h, q, kv))``
at global indices, which is exactly the given mask whatever its origin (for a mask made by
``create_block_mask`` it equals ``mask_mod``; for one built from block lists, such as a block-sparse
pattern with ``mask_mod=None``, the lists decide). flex's eager math path on one device reads only
``mask_mod`` and ignores the lists, so hand-built block lists agree with it only where they agree with
``mask_mod``. Ring steps that the mask leaves empty are not skipped: knowing it takes a host read of
the block counts (a sync on GPUs); compiled flex kernels skip empty blocks themselves.

**How calls are intercepted, and why so.** ``torch.nn.attention.flex_attention.flex_attention`` is a
Python function without ``__torch_function__`` dispatch, so no ``TorchFunctionMode`` sees it. Its
operator, the HigherOrderOperator ``flex_attention_hop``, does dispatch to modes (with the local q, k, v,
``score_mod``, the BlockMask as a tuple, the scale, kernel options) — but eager callers reach it only
inside flex's own ``torch.compile(..., fullgraph=True)`` of a wrapper, so a mode sees it while dynamo
traces, where no collective can run and no graph break is allowed. Making dynamo skip that frame does
not help either: a ``TorchDispatchMode`` does (dynamo skips frames under one), but fullgraph then
raises "found no compiled frames"; ``torch.compiler.set_stance("force_eager")`` works but turns every
compiled function in the process eager. The narrowest switch is flex's own documented one,
``_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG``: flex then calls its operator directly (the same eager math,
no dynamo trace, ``score_mod``/``mask_mod`` run as plain Python), and the routing mode sees the operator
with real tensors. ``RoutesFlex`` sets it when a routing mode is entered and restores the previous
value when it is left (an exception in the forward included: the plan's exit hook is always called).
The switch is process-wide while set: another thread's eager flex call in that window also skips the
compile wrapper, which changes no result (the wrapper compiles with the eager backend). Inside a model
the user compiled, dynamo reaches the operator from flex's compiling branch, inlines the mode, and the
routed call is a graph break into eager code (as SDPA routing is).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.attention.flex_attention as _flex
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention
from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_hop

from meshsp.ops import ulysses as _ulysses
from meshsp.ops.checks import check_attention_inputs
from meshsp.ops.comm import RingPass
from meshsp.ops.consensus import agree
from meshsp.ops.ring import _kv_buffer, _unpack, merge_partials
from meshsp.placements import HeadSplit, SeqLayout

__all__ = ["RoutesFlex", "WholeSequenceMask", "dtensor_flex", "flex_attention_hop", "flex_sp_attention",
           "hand_masks_over", "is_flex_call", "plan_flex", "stand_in"]

_LN2 = math.log(2.0)
_NEG_INF = float("-inf")


@contextlib.contextmanager
def eager_operator():
    """``flex_attention`` calls its operator directly inside this block (flex's own switch; the previous
    value comes back on exit, an exception included). meshsp's local calls run so too: each passes new
    ``mask_mod`` / ``score_mod`` closures, which the compile wrapper would re-trace at every call."""
    saved = _flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG
    _flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True
    try:
        yield
    finally:
        _flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = saved


class RoutesFlex:
    """Mixin for a routing ``TorchFunctionMode``: while it is entered, ``flex_attention`` calls its
    operator without flex's internal ``torch.compile``, so the mode sees the operator (module docstring)."""

    def __enter__(self):
        switch = eager_operator()
        switch.__enter__()
        self.__dict__.setdefault("_flex_switches", []).append(switch)
        try:
            return super().__enter__()
        except BaseException:
            self._flex_switches.pop().__exit__(None, None, None)
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._flex_switches.pop().__exit__(None, None, None)


def is_flex_call(func) -> bool:
    return func is flex_attention_hop


class WholeSequenceMask:
    """The ``mask_mod`` of a stand-in BlockMask: it carries a BlockMask made for the whole sequence
    to the routed operator call (``GlobalMask.from_call``); evaluated anywhere else, it raises."""

    def __init__(self, block_mask: _flex.BlockMask) -> None:
        self.block_mask = block_mask

    def __call__(self, b, h, q_idx, kv_idx):
        raise ValueError("a BlockMask that a meshsp plan handed to a routed module was used outside that module's "
                         "flex_attention call; pass the model's own BlockMask there instead.")


def stand_in(block_mask: _flex.BlockMask) -> _flex.BlockMask:
    """A BlockMask that flex's local-length check accepts on a rank's shard (flex skips the check for its
    no-op block size) and that carries ``block_mask``, made for the whole sequence, to the operator."""
    device = block_mask.kv_num_blocks.device
    return _flex.BlockMask.from_kv_blocks(
        torch.ones(1, 1, 1, dtype=torch.int32, device=device), torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=device),
        BLOCK_SIZE=_flex._LARGE_SPARSE_BLOCK_SIZE, mask_mod=WholeSequenceMask(block_mask), seq_lengths=(1, 1))


def hand_masks_over(module: torch.nn.Module) -> None:
    """Before each forward of a routed ``module``, replace BlockMask arguments (made for the whole
    sequence, while the module's q/k/v are shards) by ``stand_in``s: flex_attention checks a mask's
    lengths against its q/k before it reaches the operator, where the routing maps indices."""

    @torch.compiler.disable
    def pre_hook(mod, args, kwargs):
        swap = lambda x: stand_in(x) if isinstance(x, _flex.BlockMask) else x  # noqa: E731
        return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}

    module.register_forward_pre_hook(pre_hook, with_kwargs=True)


@dataclass(frozen=True)
class HopCall:
    """The operator's arguments: ``flex_attention_hop(q, k, v, score_mod, block_mask_tuple, scale,
    kernel_options, score_mod_buffers, mask_mod_buffers)``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    score_mod: Callable
    block_mask: tuple
    scale: float
    kernel_options: dict
    score_buffers: tuple = ()
    mask_buffers: tuple = ()

    @classmethod
    def of(cls, args, kwargs) -> HopCall:
        return cls(*args, **(kwargs or {}))

    def lse_in_log2(self, compiling: bool) -> bool:
        """Whether flex's API multiplies the operator's lse by ln 2 (it does unless a compiled
        FLASH-backend call returns natural-log statistics)."""
        return not compiling or self.kernel_options.get("BACKEND") != "FLASH"


# --- the mask at global indices ---------------------------------------------------------------

@dataclass(frozen=True)
class GlobalMask:
    """What a local block needs of the caller's mask and score_mod, at global indices.

    ``listed`` / ``full``: dense [Bm, Hm, nQ, nK] block tables of the given BlockMask (None: no
    BlockMask, every key visible); ``mask_mod`` its mask_mod (None: none); ``block`` its
    (Q, KV) block size, which the local masks reuse.
    """

    seq_lengths: tuple[int, int]
    block: tuple[int, int]
    listed: torch.Tensor | None
    full: torch.Tensor | None
    mask_mod: Callable | None
    mask_buffers: tuple
    score_mod: Callable | None
    score_buffers: tuple

    @classmethod
    def from_call(cls, call: HopCall) -> GlobalMask:
        t = call.block_mask
        if isinstance(t[-1], WholeSequenceMask):  # a plan's stand-in: the whole sequence's mask it carries
            t = t[-1].block_mask.as_tuple()
        q_len, kv_len, kv_num, kv_idx, full_num, full_idx = t[:6]
        block, mask_mod = (t[-3], t[-2]), t[-1]
        score_mod = None if call.score_mod is _flex._identity else call.score_mod
        if block == (_flex._LARGE_SPARSE_BLOCK_SIZE,) * 2 and mask_mod is _flex.noop_mask:
            # flex's default mask (no block_mask given): every key, no lists to look up
            return cls((q_len, kv_len), (_flex._DEFAULT_SPARSE_BLOCK_SIZE,) * 2, None, None, None, (),
                       score_mod, call.score_buffers)
        n_kv = -(-kv_len // block[1])
        listed = _dense_blocks(kv_num, kv_idx, n_kv)
        full = _dense_blocks(full_num, full_idx, n_kv) if full_num is not None else torch.zeros_like(listed)
        listed = listed | full
        mask_mod = None if mask_mod is _flex.noop_mask else mask_mod
        return cls((q_len, kv_len), block, listed, full, mask_mod, call.mask_buffers, score_mod, call.score_buffers)


def _dense_blocks(num: torch.Tensor, indices: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Ordered block lists (counts [Bm, Hm, nQ], indices [Bm, Hm, nQ, n]) -> bool [Bm, Hm, nQ, n_kv]."""
    cols = torch.arange(indices.shape[-1], device=indices.device)
    slot = torch.where(cols < num[..., None], indices.long(), n_kv)  # unlisted entries go to a spare column
    dense = torch.zeros(*indices.shape[:-1], n_kv + 1, dtype=torch.bool, device=indices.device)
    return dense.scatter_(-1, slot, True)[..., :n_kv]


@dataclass(frozen=True)
class Offsets:
    """Global index of local head 0, local query 0 and local key 0 of one block."""

    head: int
    q: int
    kv: int


def _local_mask_mod(g: GlobalMask, at: Offsets) -> Callable | None:
    if g.listed is None and g.mask_mod is None:
        return None
    bm, hm = (g.listed.shape[0], g.listed.shape[1]) if g.listed is not None else (1, 1)

    def mask_mod(b, h, q_idx, kv_idx):
        h, q_idx, kv_idx = h + at.head, q_idx + at.q, kv_idx + at.kv
        keep = None
        if g.mask_mod is not None:
            keep = g.mask_mod(b, h, q_idx, kv_idx, *g.mask_buffers)
        if g.listed is not None:
            cell = (b % bm, h % hm, q_idx // g.block[0], kv_idx // g.block[1])
            keep = g.listed[cell] & (g.full[cell] | keep) if keep is not None else g.listed[cell]
        return keep

    return mask_mod


def _local_score_mod(g: GlobalMask, at: Offsets) -> Callable | None:
    if g.score_mod is None:
        return None

    def score_mod(score, b, h, q_idx, kv_idx):
        return g.score_mod(score, b, h + at.head, q_idx + at.q, kv_idx + at.kv, *g.score_buffers)

    return score_mod


def _block_flex(q, k, v, g: GlobalMask, at: Offsets, scale):
    """One local flex call at global indices -> (out [B, h, Sq, Dv], natural lse [B, h, Sq])."""
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if sq == 0 or sk == 0 or h == 0:
        return q.new_zeros(b, h, sq, v.shape[-1]), q.new_full((b, h, sq), _NEG_INF, dtype=lse_dtype)
    mask_mod = _local_mask_mod(g, at)
    block_mask = None
    if mask_mod is not None:
        mb, mh = (g.listed.shape[0], g.listed.shape[1]) if g.listed is not None else (1, 1)
        block_mask = create_block_mask(mask_mod, b if mb > 1 else None, h if mh > 1 else None, sq, sk,
                                       device=q.device, BLOCK_SIZE=g.block)
    with eager_operator():
        out, aux = flex_attention(q, k, v, score_mod=_local_score_mod(g, at), block_mask=block_mask, scale=scale,
                                  enable_gqa=h != k.shape[1], return_aux=AuxRequest(lse=True))
    return out, aux.lse.to(lse_dtype)


# --- Ring across, Ulysses inside ----------------------------------------------------------------

def _ring_flex(q, k, v, g: GlobalMask, *, group, kv_layout: SeqLayout, q_off: int, head: int, scale):
    """q [B, h, S, D] (own heads of ring chunk r) over every ring chunk's K/V -> (out, lse)."""
    size = dist.get_world_size(group) if group is not None else 1
    me = dist.get_rank(group) if group is not None else 0
    kv_offsets = [sum(kv_layout.ring_lens[:i]) for i in range(size)]
    if size == 1:
        return _block_flex(q, k, v, g, Offsets(head, q_off, kv_offsets[0]), scale)
    b, hk, _, d = k.shape
    dv = v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    block = _kv_buffer(k, v, None)
    out = lse = None
    for step in range(size):
        src = (me - step) % size
        nxt = (src - 1) % size
        pending = RingPass(group, block, b * hk * kv_layout.ring_lens[nxt] * (d + dv)) if step + 1 < size else None
        k_i, v_i, _ = _unpack(block, b, hk, kv_layout.ring_lens[src], d, dv, False)
        out_i, lse_i = _block_flex(q, k_i, v_i, g, Offsets(head, q_off, kv_offsets[src]), scale)
        if out is None:
            out, lse = out_i.to(acc), lse_i
        else:
            out, lse = merge_partials(out, lse, out_i, lse_i, into_a=True)
        if pending is not None:
            block = pending.wait()
    return out.to(q.dtype), lse


def _ulysses_flex(q, k, v, g: GlobalMask, *, ring_group, ulysses_group, q_layout, kv_layout, r, u, scale, with_lse):
    """Exchange sequence for heads, attend over the ring, exchange back -> (out [B, H, s, Dv], lse [B, H, s])."""
    from meshsp.ops.attention import _cut_group, _expand_heads

    heads = HeadSplit(q.shape[1], k.shape[1], q_layout.ulysses)
    q_h, k_h, v_h, _ = _ulysses.scatter_heads(q, k, v, None, group=ulysses_group, heads=heads,
                                               q_lens=q_layout.lens[r], kv_lens=kv_layout.lens[r])
    expand = _cut_group(heads, u)
    if expand is not None:  # query heads cut through a GQA group: one K/V head per query head
        k_h, v_h = _expand_heads(k_h, *expand), _expand_heads(v_h, *expand)
    q_h, k_h, v_h = q_h.contiguous(), k_h.contiguous(), v_h.contiguous()
    out, lse = _ring_flex(q_h, k_h, v_h, g, group=ring_group, kv_layout=kv_layout, q_off=q_layout.offset(r, 0),
                          head=heads.q_ranges[u][0], scale=scale)
    gather = dict(group=ulysses_group, heads=heads, q_lens=q_layout.lens[r])
    out = _ulysses.gather_heads(out, **gather)
    if not with_lse:  # the statistics travel back only when the caller asked for them
        return out, lse.new_empty(0)
    return out, _ulysses.gather_heads(lse.unsqueeze(-1), **gather).squeeze(-1)


def _check_global_mask(g: GlobalMask, q_layout: SeqLayout, kv_layout: SeqLayout) -> None:
    if g.listed is not None and g.seq_lengths != (q_layout.total, kv_layout.total):
        raise ValueError(
            f"flex_attention's block_mask was made for (Q_LEN, KV_LEN) = {g.seq_lengths}, but the sequence-parallel "
            f"call attends {q_layout.total} queries over {kv_layout.total} keys in all; build the BlockMask for the "
            "whole (global) sequence: meshsp runs it on each rank's shard at global indices."
        )


def _refuse_backward(q, k, v) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError(
            "flex_attention on sequence-sharded q/k/v has no backward yet (its Ulysses and Ring exchanges "
            "are forward only): run it under torch.no_grad() (inference), or train with "
            "F.scaled_dot_product_attention, whose sequence-parallel backward is exact.")


def _sp_flex(q, k, v, g: GlobalMask, *, ring_group, ulysses_group, q_layout, kv_layout, uaa, scale, validate,
             with_lse=True):
    r = dist.get_rank(ring_group) if ring_group is not None else 0
    u = dist.get_rank(ulysses_group) if ulysses_group is not None else 0
    check = dict(q_layout=q_layout, kv_layout=kv_layout, ring_rank=r, ulysses_rank=u, uaa=uaa)
    error = None
    try:
        check_attention_inputs(q, k, v, None, **check)
        _check_global_mask(g, q_layout, kv_layout)
        _refuse_backward(q, k, v)
    except Exception as exc:  # any local failure must reach every rank before the first collective
        if not validate:
            raise
        error = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
    if validate:
        shared = (f"flex layouts q={q_layout.lens} kv={kv_layout.lens}; q {tuple(q.shape[:2])}+{tuple(q.shape[3:])}, "
                  f"k {tuple(k.shape[:2])}+{tuple(k.shape[3:])}, v {tuple(v.shape[:2])}+{tuple(v.shape[3:])}, "
                  f"{q.dtype}, mask {g.seq_lengths} {g.block}, uaa {uaa}, scale {scale}")
        agree("flex_sp_attention", shared, error, (ulysses_group, ring_group), q.device.type)
    if q_layout.ulysses > 1:
        return _ulysses_flex(q, k, v, g, ring_group=ring_group, ulysses_group=ulysses_group, q_layout=q_layout,
                             kv_layout=kv_layout, r=r, u=u, scale=scale, with_lse=with_lse)
    return _ring_flex(q.contiguous(), k.contiguous(), v.contiguous(), g, group=ring_group, kv_layout=kv_layout,
                      q_off=q_layout.offset(r, 0), head=0, scale=scale)


def flex_sp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    score_mod: Callable | None = None,
    block_mask_or_mask_mod=None,
    *,
    ring_group: dist.ProcessGroup | None,
    ulysses_group: dist.ProcessGroup | None,
    q_layout: SeqLayout,
    kv_layout: SeqLayout | None = None,
    uaa: bool = False,
    scale: float | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``flex_attention`` of this rank's query shard over every rank's keys, with the mask and
    score_mod of the whole sequence. Returns (out [B, H, s_q, Dv], natural-log lse [B, H, s_q]).

    q [B, H, s_q, D] and k, v [B, Hk, s_kv, D] are this rank's shards of sequences laid out as the
    layouts say (``kv_layout`` defaults to ``q_layout``); grouped-query attention when ``H != Hk``.
    ``block_mask_or_mask_mod`` is a ``BlockMask`` made for the whole sequence, a ``mask_mod`` (then
    taken as ``create_block_mask(mask_mod, None, None, S_q, S_kv)``), or None; ``mask_mod`` and
    ``score_mod`` see global batch, head, query and key indices. With ``validate`` the ranks agree on
    their inputs first and raise the same ``ValueError`` on every rank.

    Example::

        layout = SeqLayout.from_global(1000, ring=2, ulysses=2)
        causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
        out, lse = flex_sp_attention(q, k, v, None, causal, ring_group=mesh["ring"].get_group(),
                                     ulysses_group=mesh["ulysses"].get_group(), q_layout=layout, uaa=True)
    """
    kv_layout = kv_layout or q_layout
    for name, group, degree in (("ring_group", ring_group, q_layout.ring), ("ulysses_group", ulysses_group, q_layout.ulysses)):
        if degree > 1 and group is None:
            raise ValueError(f"{name} is None but the layout has degree {degree} on that axis; pass the axis group.")
    mask = block_mask_or_mask_mod
    if mask is None or isinstance(mask, _flex.BlockMask):
        mask = mask if mask is not None else _flex._create_empty_block_mask(q, k)
        g = GlobalMask.from_call(HopCall(q, k, v, score_mod or _flex._identity, mask.as_tuple(), scale, {}))
    else:  # a mask_mod: the whole (S_q, S_kv) grid, mask_mod decides every pair
        g = GlobalMask((q_layout.total, kv_layout.total), (_flex._DEFAULT_SPARSE_BLOCK_SIZE,) * 2, None, None,
                       mask, (), score_mod, ())
    return _sp_flex(q, k, v, g, ring_group=ring_group if q_layout.ring > 1 else None,
                    ulysses_group=ulysses_group if q_layout.ulysses > 1 else None, q_layout=q_layout,
                    kv_layout=kv_layout, uaa=uaa, scale=scale, validate=validate)


# --- the routed operator call: plans and the DTensor scope ----------------------------------------

def _hop_result(call: HopCall, out, lse, compiling: bool):
    """(out, lse, max_scores) as the operator returns them: lse in log2 units where flex's API
    multiplies by ln 2; no max scores (refused before)."""
    if call.kernel_options.get("OUTPUT_LOGSUMEXP", True) and lse.numel():
        lse = lse / _LN2 if call.lse_in_log2(compiling) else lse
    return out, lse, lse.new_empty(0)


def _refuse_max_scores(call: HopCall, where: str) -> None:
    if call.kernel_options.get("OUTPUT_MAX", False):
        raise ValueError(f"{where}: flex_attention(return_aux=AuxRequest(max_scores=True)) is not supported under "
                         "sequence parallelism; request lse only (AuxRequest(lse=True)).")


@torch.compiler.disable  # collectives and Python bookkeeping: eager, a graph break in a compiled model
def plan_flex(style, sp, args, kwargs, compiling: bool):
    """The operator call inside a module a plan routes (``ParallelAttention``): q/k/v are the module's
    local shards; global indices are the plan layout's order (ring chunks, then Ulysses pieces), exact
    when the plan shards this attention's tokens as one sequence."""
    call = HopCall.of(args, kwargs)
    where = f"plan '{style.key}'"
    _refuse_max_scores(call, where)
    if style.queries != "sharded":
        raise ValueError(f"{where}: flex_attention needs ParallelAttention(queries='sharded'); whole queries over "
                         "sharded keys are supported for F.scaled_dot_product_attention only.")
    lens = style.state.rank_lens(sp, style.key, (call.q.shape[2], call.k.shape[2]))
    q_layout = SeqLayout(tuple(tuple(n[0] for n in row) for row in lens))
    kv_layout = SeqLayout(tuple(tuple(n[1] for n in row) for row in lens))
    style.state.attention_tokens[0] += call.q.shape[2]
    style.state.attention_tokens[1] += q_layout.total
    out, lse = _sp_flex(call.q, call.k, call.v, GlobalMask.from_call(call), ring_group=sp.ring_group,
                        ulysses_group=sp.ulysses_group, q_layout=q_layout, kv_layout=kv_layout, uaa=style.state.uaa,
                        scale=call.scale, validate=False,
                        with_lse=call.kernel_options.get("OUTPUT_LOGSUMEXP", True))
    return _hop_result(call, out, lse, compiling)


@torch.compiler.disable
def dtensor_flex(args, kwargs, uaa: bool, compiling: bool):
    """The operator call on DTensors q/k/v [B, H, S, D] sharded ``Shard(2)`` on every SP axis (the
    ``sequence_parallel_attention`` scope): runs on the local shards, returns DTensors alike."""
    from torch.distributed.tensor import DTensor

    from meshsp.ops.dtensor import _axis_sizes, _check_placements

    call = HopCall.of(args, kwargs)
    _refuse_max_scores(call, "flex_attention on DTensors")
    if not all(isinstance(t, DTensor) for t in (call.q, call.k, call.v)):
        raise ValueError("flex_attention under sequence_parallel_attention: query, key and value must all be "
                         "DTensors (or none of them).")
    mesh = call.q.device_mesh
    if not (mesh == call.k.device_mesh == call.v.device_mesh):
        raise ValueError("query, key and value must live on the same device mesh.")
    ring, ulysses = _axis_sizes(mesh)
    for name, t in (("query", call.q), ("key", call.k), ("value", call.v)):
        _check_placements(name, t, 2)
    q_layout = SeqLayout.from_global(call.q.shape[2], ring=ring, ulysses=ulysses)
    kv_layout = SeqLayout.from_global(call.k.shape[2], ring=ring, ulysses=ulysses)
    with_lse = call.kernel_options.get("OUTPUT_LOGSUMEXP", True)
    out, lse = _sp_flex(call.q.to_local(), call.k.to_local(), call.v.to_local(), GlobalMask.from_call(call),
                        ring_group=mesh["ring"].get_group() if ring > 1 else None,
                        ulysses_group=mesh["ulysses"].get_group() if ulysses > 1 else None,
                        q_layout=q_layout, kv_layout=kv_layout, uaa=uaa, scale=call.scale, validate=True,
                        with_lse=with_lse)
    (b, h, s), dv, placements = call.q.shape[:3], call.v.shape[-1], call.q.placements
    # Ulysses returns token-major memory ([B, s, H, Dv] seen as [B, H, s, Dv]); the global strides say so too.
    token_major = not out.is_contiguous()
    stride = torch.empty(b, s, h, dv, device="meta")
    stride = (stride.transpose(1, 2) if token_major else stride.view(b, h, s, dv)).stride()
    out = DTensor.from_local(out, mesh, placements, run_check=False, shape=torch.Size((b, h, s, dv)), stride=stride)
    if with_lse:
        lse = DTensor.from_local(lse.contiguous(), mesh, placements, run_check=False, shape=torch.Size((b, h, s)),
                                 stride=(h * s, s, 1))
    return _hop_result(call, out, lse, compiling)
