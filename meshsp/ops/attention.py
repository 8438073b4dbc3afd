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

from meshsp.ops.blocks import PairMask, block_attention
from meshsp.ops.checks import check_attention_inputs
from meshsp.ops.consensus import agree
from meshsp.ops.kernel import local_attention
from meshsp.ops.masks import RunMask
from meshsp.ops.ring import ring_attention
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
    pair = None
    if rule:
        pair = PairMask(runs=RunMask.decode(q_runs or [], kv_runs or [], rule))
    elif pair_rows is not None:
        pair = PairMask(rows=pair_rows, q_start=pair_q_start)
    ring_pg, ulysses_pg = _group(ring_group), _group(ulysses_group)
    r = dist.get_rank(ring_pg) if ring_pg is not None else 0
    u = dist.get_rank(ulysses_pg) if ulysses_pg is not None else 0
    q_layout, kv_layout = _grid(q_lens, ring, ulysses), _grid(kv_lens, ring, ulysses)
    check = dict(q_layout=q_layout, kv_layout=kv_layout, ring_rank=r, ulysses_rank=u, uaa=uaa)
    if not validate:
        check_attention_inputs(q, k, v, mask, **check)
    else:
        error = None
        try:
            check_attention_inputs(q, k, v, mask, **check)
        except Exception as exc:  # any local failure must reach every rank before a collective
            error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)
        # Everything but the local lengths must match across ranks (local lengths are checked above).
        shared = (f"layouts q={q_layout.lens} kv={kv_layout.lens}; q {tuple(q.shape[:2])}+{tuple(q.shape[3:])}, "
                  f"k {tuple(k.shape[:2])}+{tuple(k.shape[3:])}, v {tuple(v.shape[:2])}+{tuple(v.shape[3:])}, "
                  f"{q.dtype}, mask {mask is not None}, uaa {uaa}, scale {scale}; {_ulysses.pipeline_setting()}; "
                  f"pairwise {_describe_pair(pair)}")
        agree("sp_attention", shared, error, (ulysses_pg, ring_pg), q.device.type)
    heads = HeadSplit(q.shape[1], k.shape[1], ulysses)
    expand = _cut_group(heads, u) if ulysses > 1 else None

    q_starts, kv_starts = _starts(q_layout.ring_lens), _starts(kv_layout.ring_lens)

    def q_range(row: int) -> tuple[int, int]:
        return q_starts[row], q_starts[row] + q_layout.ring_lens[row]

    def kv_range(row: int) -> tuple[int, int]:
        return kv_starts[row], kv_starts[row] + kv_layout.ring_lens[row]

    def attend(q, k, v, mask, heads=(0, q.shape[1])):
        if expand is not None:  # query heads cut through a GQA group: one K/V head per query head
            k, v = _expand_heads(k, *expand), _expand_heads(v, *expand)
        if pair is None:
            if ring > 1:
                return ring_attention(q, k, v, mask, group=ring_pg, kv_lens=kv_layout.ring_lens, scale=scale)[0]
            return local_attention(q, k, v, mask, scale)[0]

        def block(src, q, k, v, mask):
            return block_attention(q, k, v, pair, q0=q_starts[r], k0=kv_starts[src], heads=heads, scale=scale)
        if ring > 1:
            needs = (lambda src, dst: pair.needs(q_range(dst), kv_range(src))) if pair.runs is not None else None
            return ring_attention(q, k, v, None, group=ring_pg, kv_lens=kv_layout.ring_lens, scale=scale,
                                  attend=block, needs=needs)[0]
        part = block(0, q, k, v, None)
        return part[0] if part is not None else q.new_zeros(*q.shape[:3], v.shape[-1])

    if ulysses > 1:
        # Pipelined head chunks on Ulysses alone, for exchanges big enough to gain from it; the
        # hybrid runs one ring over all own heads.
        # Decided from what every rank of the group knows alike (never from uneven local sizes),
        # so that all of them issue the same collectives: the group's mean q, k, v bytes per rank.
        tokens_q, tokens_kv = sum(q_layout.lens[r]), sum(kv_layout.lens[r])
        per_rank = (tokens_q * q.shape[1] * q.shape[3] + tokens_kv * k.shape[1] * (k.shape[3] + v.shape[3]))
        pipelined = ring == 1 and q.shape[0] * per_rank * q.element_size() // ulysses >= _ulysses.pipeline_min_bytes(ulysses_pg)
        return _ulysses.ulysses_attention(q, k, v, mask, group=ulysses_pg, heads=heads, q_lens=q_layout.lens[r],
                                          kv_lens=kv_layout.lens[r], attend=attend,
                                          chunks=_ulysses.CHUNKS if pipelined else 1)
    out = attend(q, k, v, mask)
    if not out.transpose(1, 2).is_contiguous():
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
    return out


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
    return _sp_attention_op(
        q, k, v, mask_BSk,
        ring_group.group_name if ring_group is not None and q_layout.ring > 1 else "",
        ulysses_group.group_name if ulysses_group is not None and q_layout.ulysses > 1 else "",
        [n for row in q_layout.lens for n in row],
        [n for row in kv_layout.lens for n in row],
        q_layout.ring, q_layout.ulysses, uaa, scale, validate,
        pair.rows if pair is not None and pair.runs is None else None,
        pair.q_start if pair is not None else 0, *runs,
    )
