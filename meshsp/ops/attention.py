"""Sequence-parallel attention on local shards: Ulysses inside, Ring across, or either alone.

Shape legend: B batch, H / Hk query / key-value heads, s local sequence length, D head dim.

Rank (r, u) of the ``("ring", "ulysses")`` mesh holds every head of its sequence shard. Ulysses
trades sequence for heads inside the ring row r (``scatter_heads``); Ring then rotates the K/V chunks
of those heads between rows (``ring_attention``); Ulysses trades back (``gather_heads``). The whole
thing is one ``torch.library`` custom op, so ``torch.compile`` sees a single opaque node.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from meshsp.ops.blocks import PairMask, block_attention, block_attention_backward
from meshsp.ops.checks import check_attention_inputs
from meshsp.ops.consensus import agree
from meshsp.ops.kernel import local_attention
from meshsp.ops.kernel_backward import local_attention_backward
from meshsp.ops.masks import RunMask
from meshsp.ops.ring import ring_attention, ring_attention_backward
from meshsp.ops import ulysses as _ulysses
from meshsp.placements import HeadSplit, SeqLayout

__all__ = ["sp_attention"]


def _group(name: str) -> dist.ProcessGroup | None:
    return _resolve_process_group(name) if name else None


def _grid(flat: list[int], ring: int, ulysses: int) -> SeqLayout:
    return SeqLayout(tuple(tuple(flat[r * ulysses : (r + 1) * ulysses]) for r in range(ring)))


def _cut_group(heads: HeadSplit, u: int) -> tuple[int, int, int] | None:
    """(group, first, count) when rank ``u``'s query heads cut through a GQA group: its K/V heads,
    each repeated ``group`` times, narrowed to ``count`` heads from ``first``; None when aligned."""
    index = heads.kv_index(u)
    if index is None:
        return None
    group = heads.q_heads // heads.kv_heads
    first = heads.q_ranges[u][0] - heads.kv_ranges[u][0] * group
    return group, first, len(index)


def _expand_heads(t: torch.Tensor, group: int, first: int, count: int) -> torch.Tensor:
    """[B, hk, S, D] -> [B, count, S, D], query head i reading K/V head (first + i) // group: by
    shapes alone (an index list would be copied to the device on every call)."""
    b, hk, s, d = t.shape
    return t[:, :, None].expand(b, hk, group, s, d).reshape(b, hk * group, s, d).narrow(1, first, count)


class _Call:
    """One ``sp_attention`` call as its op arguments describe it: groups, layouts, heads, mask; the
    attention of one rank's own heads (``attend``) and its backward (``attend_backward``)."""

    def __init__(self, q_shape, k_shape, ring_group, ulysses_group, q_lens, kv_lens, ring, ulysses, scale,
                 pair_rows, pair_q_start, q_runs, kv_runs, rule) -> None:
        self.pair = None
        if rule:
            self.pair = PairMask(runs=RunMask.decode(q_runs or [], kv_runs or [], rule))
        elif pair_rows is not None:
            self.pair = PairMask(rows=pair_rows, q_start=pair_q_start)
        self.ring_pg, self.ulysses_pg = _group(ring_group), _group(ulysses_group)
        self.r = dist.get_rank(self.ring_pg) if self.ring_pg is not None else 0
        self.u = dist.get_rank(self.ulysses_pg) if self.ulysses_pg is not None else 0
        self.q_layout, self.kv_layout = _grid(q_lens, ring, ulysses), _grid(kv_lens, ring, ulysses)
        self.ring, self.ulysses, self.scale = ring, ulysses, scale
        self.heads = HeadSplit(q_shape[1], k_shape[1], ulysses)
        self.expand = _cut_group(self.heads, self.u) if ulysses > 1 else None
        self.q_starts, self.kv_starts = _starts(self.q_layout.ring_lens), _starts(self.kv_layout.ring_lens)

    def _needs(self):
        if self.pair is None or self.pair.runs is None:
            return None
        q_starts, kv_starts, ql, kl = self.q_starts, self.kv_starts, self.q_layout.ring_lens, self.kv_layout.ring_lens
        return lambda src, dst: self.pair.needs((q_starts[dst], q_starts[dst] + ql[dst]), (kv_starts[src], kv_starts[src] + kl[src]))

    def _ring_kwargs(self):
        return dict(group=self.ring_pg, kv_lens=self.kv_layout.ring_lens, scale=self.scale, needs=self._needs())

    def attend(self, q, k, v, mask, heads=None):
        """(out, lse) of own heads ``heads`` (global query heads) over every key."""
        heads = heads or (0, q.shape[1])
        if self.expand is not None:  # query heads cut through a GQA group: one K/V head per query head
            k, v = _expand_heads(k, *self.expand), _expand_heads(v, *self.expand)
        pair, scale = self.pair, self.scale
        if pair is None:
            if self.ring > 1:
                return ring_attention(q, k, v, mask, **self._ring_kwargs())
            return local_attention(q, k, v, mask, scale)

        def block(src, q, k, v, mask):
            return block_attention(q, k, v, pair, q0=self.q_starts[self.r], k0=self.kv_starts[src], heads=heads, scale=scale)
        if self.ring > 1:
            return ring_attention(q, k, v, None, attend=block, **self._ring_kwargs())
        part = block(0, q, k, v, None)
        if part is not None:
            return part
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_zeros(*q.shape[:3], v.shape[-1]), torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)

    def attend_backward(self, q, k, v, mask, out, dout, lse, heads=None):
        """(dq, dk, dv) of ``attend``, in float32 (float64 for float64)."""
        heads = heads or (0, q.shape[1])
        k_shape, v_shape = k.shape, v.shape
        if self.expand is not None:
            k, v = _expand_heads(k, *self.expand), _expand_heads(v, *self.expand)
        pair, scale = self.pair, self.scale
        if pair is None:
            if self.ring > 1:
                dq, dk, dv = ring_attention_backward(q, k, v, out, dout, lse, mask, **self._ring_kwargs())
            else:
                dq, dk, dv = local_attention_backward(q, k, v, out, dout, lse, mask, scale)
        else:
            def block(src, q, k, v, mask, out, dout, lse):
                return block_attention_backward(q, k, v, out, dout, lse, pair, q0=self.q_starts[self.r],
                                                k0=self.kv_starts[src], heads=heads, scale=scale)
            if self.ring > 1:
                dq, dk, dv = ring_attention_backward(q, k, v, out, dout, lse, None, attend_backward=block,
                                                     **self._ring_kwargs())
            else:
                part = block(0, q, k, v, None, out, dout, lse)
                acc = torch.float64 if q.dtype == torch.float64 else torch.float32
                dq, dk, dv = part if part is not None else (
                    q.new_zeros(q.shape, dtype=acc), k.new_zeros(k.shape, dtype=acc), v.new_zeros(v.shape, dtype=acc))
        if self.expand is not None:
            dk, dv = _sum_expanded(dk, k_shape, *self.expand), _sum_expanded(dv, v_shape, *self.expand)
        return dq, dk, dv

    def chunks(self, q, k, v) -> int:
        """Ulysses' head chunks: pipelined on Ulysses alone, for exchanges big enough to gain from it
        (the hybrid runs one ring over all own heads). Decided from what every rank of the group knows
        alike (never from uneven local sizes), so that all of them issue the same collectives: the
        group's mean q, k, v bytes per rank."""
        if self.ulysses == 1 or self.ring > 1:
            return 1
        tokens_q, tokens_kv = sum(self.q_layout.lens[self.r]), sum(self.kv_layout.lens[self.r])
        per_rank = (tokens_q * q.shape[1] * q.shape[3] + tokens_kv * k.shape[1] * (k.shape[3] + v.shape[3]))
        big = q.shape[0] * per_rank * q.element_size() // self.ulysses >= _ulysses.pipeline_min_bytes(self.ulysses_pg)
        return _ulysses.CHUNKS if big else 1


def _sum_expanded(t: torch.Tensor, shape, group: int, first: int, count: int) -> torch.Tensor:
    """The adjoint of ``_expand_heads``: [B, count, S, D] -> [B, hk, S, D], copies of a head summed."""
    b, hk, s, d = shape
    full = t.new_zeros(b, hk * group, s, d)
    full.narrow(1, first, count).copy_(t)
    return full.view(b, hk, group, s, d).sum(2)


def _check(q, k, v, mask, call: _Call, uaa, scale, validate) -> None:
    check = dict(q_layout=call.q_layout, kv_layout=call.kv_layout, ring_rank=call.r, ulysses_rank=call.u, uaa=uaa)
    if not validate:
        check_attention_inputs(q, k, v, mask, **check)
        return
    error = None
    try:
        check_attention_inputs(q, k, v, mask, **check)
    except Exception as exc:  # any local failure must reach every rank before a collective
        error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)
    # Everything but the local lengths must match across ranks (local lengths are checked above).
    shared = (f"layouts q={call.q_layout.lens} kv={call.kv_layout.lens}; q {tuple(q.shape[:2])}+{tuple(q.shape[3:])}, "
              f"k {tuple(k.shape[:2])}+{tuple(k.shape[3:])}, v {tuple(v.shape[:2])}+{tuple(v.shape[3:])}, "
              f"{q.dtype}, mask {mask is not None}, uaa {uaa}, scale {scale}; {_ulysses.pipeline_setting()}; "
              f"pairwise {_describe_pair(call.pair)}; grad {torch.is_grad_enabled()}")
    agree("sp_attention", shared, error, (call.ulysses_pg, call.ring_pg), q.device.type)


_HALVES = (torch.bfloat16, torch.float16)


def _rounded_once(attend):
    """``attend`` run in float32 on 16-bit inputs, its output rounded once. For training: the
    backward's ``rowsum(dout * out)`` reads the output, and an output merged from 16-bit block
    results carries one rounding per block (twice one device's error in dq on a causal zigzag ring);
    rounded once it is as exact as one device's."""
    def run(q, k, v, mask, heads=None):
        out, lse = attend(q.float(), k.float(), v.float(), mask, heads)
        return out.to(q.dtype), lse
    return run


def _forward(q, k, v, mask, ring_group, ulysses_group, q_lens, kv_lens, ring, ulysses, uaa, scale, validate,
             pair_rows, pair_q_start, q_runs, kv_runs, rule, keep=None):
    call = _Call(q.shape, k.shape, ring_group, ulysses_group, q_lens, kv_lens, ring, ulysses, scale,
                 pair_rows, pair_q_start, q_runs, kv_runs, rule)
    _check(q, k, v, mask, call, uaa, scale, validate)
    attend = call.attend if keep is None or q.dtype not in _HALVES else _rounded_once(call.attend)
    if ulysses > 1:
        return _ulysses.ulysses_attention(q, k, v, mask, group=call.ulysses_pg, heads=call.heads,
                                          q_lens=call.q_layout.lens[call.r], kv_lens=call.kv_layout.lens[call.r],
                                          attend=attend, chunks=call.chunks(q, k, v), keep=keep)
    out, lse = attend(q, k, v, mask)
    if keep is not None:
        keep.append(lse)
    if not out.transpose(1, 2).is_contiguous():
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
    return out


@torch.library.custom_op("meshsp::sp_attention", mutates_args=())
def _sp_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    ring_group: str,
    ulysses_group: str,
    q_lens: list[int],
    kv_lens: list[int],
    ring: int,
    ulysses: int,
    uaa: bool,
    scale: float | None,
    validate: bool,
    pair_rows: torch.Tensor | None = None,
    pair_q_start: int = 0,
    q_runs: list[int] | None = None,
    kv_runs: list[int] | None = None,
    rule: list[float] | None = None,
) -> torch.Tensor:
    return _forward(q, k, v, mask, ring_group, ulysses_group, q_lens, kv_lens, ring, ulysses, uaa, scale, validate,
                    pair_rows, pair_q_start, q_runs, kv_runs, rule)


@torch.library.custom_op("meshsp::sp_attention_train", mutates_args=())
def _sp_attention_train_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    ring_group: str,
    ulysses_group: str,
    q_lens: list[int],
    kv_lens: list[int],
    ring: int,
    ulysses: int,
    uaa: bool,
    scale: float | None,
    validate: bool,
    pair_rows: torch.Tensor | None,
    pair_q_start: int,
    q_runs: list[int] | None,
    kv_runs: list[int] | None,
    rule: list[float] | None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``sp_attention`` that also returns what its backward needs (``_saved_shapes`` lists them)."""
    keep: list[torch.Tensor] = []
    out = _forward(q, k, v, mask, ring_group, ulysses_group, q_lens, kv_lens, ring, ulysses, uaa, scale, validate,
                   pair_rows, pair_q_start, q_runs, kv_runs, rule, keep)
    # contiguous, as the fake implementation declares them (compiled graphs check the strides)
    return out, [t.contiguous() for t in keep]


@torch.library.custom_op("meshsp::sp_attention_backward", mutates_args=())
def _sp_attention_backward_op(
    dout: torch.Tensor,
    saved: list[torch.Tensor],
    mask: torch.Tensor | None,
    q_shape: list[int],
    k_shape: list[int],
    v_shape: list[int],
    ring_group: str,
    ulysses_group: str,
    q_lens: list[int],
    kv_lens: list[int],
    ring: int,
    ulysses: int,
    scale: float | None,
    pair_rows: torch.Tensor | None,
    pair_q_start: int,
    q_runs: list[int] | None,
    kv_runs: list[int] | None,
    rule: list[float] | None,
    chunks: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``sp_attention_train``. ``saved``: Ulysses' per-chunk q, k, v, out, lse (and
    the chunk's key mask); without Ulysses the op's q, k, v, out and lse."""
    call = _Call(q_shape, k_shape, ring_group, ulysses_group, q_lens, kv_lens, ring, ulysses, scale,
                 pair_rows, pair_q_start, q_runs, kv_runs, rule)
    if ulysses > 1:
        return _ulysses.ulysses_attention_backward(
            dout, saved, group=call.ulysses_pg, heads=call.heads, q_lens=call.q_layout.lens[call.r],
            kv_lens=call.kv_layout.lens[call.r], attend_backward=call.attend_backward, chunks=chunks,
            shapes=(tuple(q_shape), tuple(k_shape), tuple(v_shape)))
    q, k, v, out, lse = saved
    dq, dk, dv = call.attend_backward(q, k, v, mask, out, dout, lse)
    dq, dk, dv = dq.to(dout.dtype), dk.to(dout.dtype), dv.to(dout.dtype)
    if dv.untyped_storage().data_ptr() == dk.untyped_storage().data_ptr():  # the ring's one buffer
        dv = dv.clone()
    return dq, dk, dv


_OP_ARGS = ("ring_group", "ulysses_group", "q_lens", "kv_lens", "ring", "ulysses", "uaa", "scale", "validate",
            "pair_rows", "pair_q_start", "q_runs", "kv_runs", "rule")


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask, *rest = inputs
    args = dict(zip(_OP_ARGS, rest))
    out, keep = output
    ctx.args = args
    ctx.shapes = (list(q.shape), list(k.shape), list(v.shape))
    ctx.chunks = len(keep) // 5 if args["ulysses"] > 1 else 1
    ctx.has_mask = mask is not None
    ctx.has_rows = args["pair_rows"] is not None
    extra = [t for t in (mask, args["pair_rows"]) if t is not None]
    if args["ulysses"] > 1:
        ctx.save_for_backward(*keep, *extra)
    else:
        ctx.save_for_backward(q, k, v, out, *keep, *extra)
    ctx.n_saved = len(keep) if args["ulysses"] > 1 else 5


def _backward(ctx, dout, _dkeep):
    a = ctx.args
    tensors = list(ctx.saved_tensors)
    saved, extra = tensors[: ctx.n_saved], tensors[ctx.n_saved :]
    mask = extra.pop(0) if ctx.has_mask else None
    rows = extra.pop(0) if ctx.has_rows else None
    dq, dk, dv = _sp_attention_backward_op(
        dout, saved, mask, *ctx.shapes, a["ring_group"], a["ulysses_group"], a["q_lens"], a["kv_lens"], a["ring"],
        a["ulysses"], a["scale"], rows, a["pair_q_start"], a["q_runs"], a["kv_runs"], a["rule"], ctx.chunks)
    return (dq, dk, dv) + (None,) * (1 + len(_OP_ARGS))  # (the op has no defaults: every argument is passed)


torch.library.register_autograd("meshsp::sp_attention_train", _backward, setup_context=_setup_context)


def _starts(lens) -> list[int]:
    out, acc = [], 0
    for n in lens:
        out.append(acc)
        acc += n
    return out


def _describe_pair(pair: PairMask | None) -> str:
    if pair is None:
        return "none"
    if pair.runs is not None:
        return f"runs {pair.runs.batch_groups} groups, rule {len(pair.runs.rule.bias)}x{len(pair.runs.rule.bias[0])}"
    return f"dense rows {tuple(pair.rows.shape[:2])}+{tuple(pair.rows.shape[3:])} {pair.rows.dtype}"


@_sp_attention_op.register_fake
def _(q, k, v, mask, ring_group, ulysses_group, q_lens, kv_lens, ring, ulysses, uaa, scale, validate,
      pair_rows=None, pair_q_start=0, q_runs=None, kv_runs=None, rule=None):
    # Token-major [B, s, H, Dv] memory seen as [B, H, s, Dv], as the real op returns it.
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1]).transpose(1, 2)


@_sp_attention_train_op.register_fake
def _(q, k, v, mask, ring_group, ulysses_group, q_lens, kv_lens, ring, ulysses, uaa, scale, validate,
      pair_rows=None, pair_q_start=0, q_runs=None, kv_runs=None, rule=None):
    out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1]).transpose(1, 2)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    b = q.shape[0]
    if ulysses == 1:
        return out, [q.new_empty(b, q.shape[1], q.shape[2], dtype=acc)]
    call = _Call(q.shape, k.shape, ring_group, ulysses_group, q_lens, kv_lens, ring, ulysses, scale,
                 pair_rows, pair_q_start, q_runs, kv_runs, rule)
    s_q, s_kv = sum(call.q_layout.lens[call.r]), sum(call.kv_layout.lens[call.r])
    keep = []
    for q_ranges, kv_ranges in _ulysses.head_chunks(call.heads, call.chunks(q, k, v)):
        h = q_ranges[call.u][1] - q_ranges[call.u][0]
        hk = kv_ranges[call.u][1] - kv_ranges[call.u][0]
        keep += [q.new_empty(b, h, s_q, q.shape[3]), q.new_empty(b, hk, s_kv, k.shape[3]),
                 q.new_empty(b, hk, s_kv, v.shape[3]), q.new_empty(b, h, s_q, v.shape[3]),
                 q.new_empty(b, h, s_q, dtype=acc)]
    if mask is not None:
        keep.append(mask.new_empty(b, s_kv))
    return out, keep


@_sp_attention_backward_op.register_fake
def _(dout, saved, mask, q_shape, k_shape, v_shape, *rest):
    def like(shape):
        b, h, s, d = shape
        return dout.new_empty(b, s, h, d).transpose(1, 2)
    return like(q_shape), like(k_shape), like(v_shape)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def sp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_BSk: torch.Tensor | None = None,
    *,
    ring_group: dist.ProcessGroup | None,
    ulysses_group: dist.ProcessGroup | None,
    q_layout: SeqLayout,
    kv_layout: SeqLayout | None = None,
    uaa: bool = False,
    scale: float | None = None,
    validate: bool = True,
    pair: PairMask | None = None,
) -> torch.Tensor:
    """Exact attention of this rank's query shard over every rank's keys.

    q [B, H, s_q, D] and k, v [B, Hk, s_kv, D] are this rank's shards of sequences laid out as
    ``q_layout`` / ``kv_layout`` describe (``kv_layout`` defaults to ``q_layout``); ``mask_BSk`` is
    the local boolean key-padding mask (True = attend); ``pair`` a mask beyond key padding
    (``meshsp.ops.blocks.PairMask``: runs of a compact or causal mask, or the dense rows of the
    queries this rank computes — the ring row's queries under Ulysses, its own otherwise — over
    every key, all in rank-major order; see ``meshsp.ops.masks``). Returns out [B, H, s_q, Dv], this rank's
    shard of the single-device result, laid out token-major (a ``[B, s_q, H, Dv]`` tensor seen
    through ``transpose(1, 2)``, so that the usual ``transpose(1, 2).flatten(2)`` copies nothing).
    A group may be None when its degree is 1.

    With ``validate`` (the default) the ranks first agree that they were given the same layouts,
    heads and dtypes and that no rank's inputs are invalid (one 16-byte all-gather per SP axis);
    otherwise every rank raises the same ``ValueError`` instead of waiting in a collective.
    Model plans pass ``validate=False``: they check the model's inputs once per forward instead.

    Example::

        layout = SeqLayout.from_global(4097, ring=2, ulysses=2)
        out = sp_attention(q, k, v, ring_group=mesh["ring"].get_group(),
                           ulysses_group=mesh["ulysses"].get_group(), q_layout=layout, uaa=True)
    """
    kv_layout = kv_layout or q_layout
    for name, group, degree in (("ring_group", ring_group, q_layout.ring), ("ulysses_group", ulysses_group, q_layout.ulysses)):
        if degree > 1 and group is None:
            raise ValueError(f"{name} is None but the layout has degree {degree} on that axis; pass the axis group.")
    if pair is not None and mask_BSk is not None:
        raise ValueError("pass a key-padding mask or a pairwise mask, not both; fold the key padding into the pair.")
    runs = pair.runs.encode() if pair is not None and pair.runs is not None else (None, None, None)
    op = _sp_attention_train_op if _needs_grad(q, k, v) else _sp_attention_op
    result = op(
        q, k, v, mask_BSk,
        ring_group.group_name if ring_group is not None and q_layout.ring > 1 else "",
        ulysses_group.group_name if ulysses_group is not None and q_layout.ulysses > 1 else "",
        [n for row in q_layout.lens for n in row],
        [n for row in kv_layout.lens for n in row],
        q_layout.ring, q_layout.ulysses, uaa, scale, validate,
        pair.rows if pair is not None and pair.runs is None else None,
        pair.q_start if pair is not None else 0, *runs,
    )
    return result[0] if op is _sp_attention_train_op else result
