"""Attention masks beyond key padding, in a form that sequence-parallel attention can cut.

Shape legend: B batch, H heads, S_q / S_k global query / key lengths, G segments.

What reaches SP attention besides a key-padding mask: a dense pairwise mask ``[B|1, 1|H, S_q, S_k]``
(boolean, True = attend, or additive float), ``is_causal=True``, or a compact ``SegmentMask``:
per-token segment ids and a rule between segment pairs (which pairs attend, an additive bias per
pair, causal within a pair). A 100k-token model never builds its ``S x S`` mask in compact form.

Inside the ops tokens are in **rank-major order**: ring rank outer, ulysses rank inner, each rank's
local tokens in its own order (the order in which Ulysses' all-to-all and Ring's rotation put them
side by side). There, compact masks are *runs*: maximal ranges of consecutive tokens with one
segment and consecutive positions (a token's position is its global index, which causal rules
compare). For any block of queries and keys, the runs and the rule give a short list of kernel
calls (``block_calls``): a full block (no mask; a constant bias shifts only its log-sum-exp), a
square causal block (the kernel's own ``is_causal``), or nothing. Work the mask removes is not
computed, and a ring block that no later rank needs is not sent (``RunMask.needs``).

A dense mask with few distinct rows and columns (an outer product of padding masks, a
block-diagonal mask) converts to runs exactly (``compress``): its rows fall in classes that are
query segments, its columns in classes that are key segments, and the mask is a table over them.
Other dense masks go to the kernel as slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

__all__ = ["Call", "Rule", "Run", "RunMask", "SegmentMask", "block_calls", "compress", "runs_from_ids"]

_NEG_INF = float("-inf")
MAX_RUNS = 256  # runs per batch element above which a compressed mask goes to the kernel densely
MAX_CLASSES = 64  # distinct rows (or columns) per batch element a dense mask may have to compress


@dataclass(frozen=True, eq=False)
class SegmentMask:
    """A compact attention mask: per-token segment ids and a rule between segment pairs.

    ``segments`` [B|1, S_q] and ``kv_segments`` [B|1, S_k] (default: ``segments``) hold integer ids
    in ``0..G-1``. ``allow`` [G, G] bool says which query segments attend which key segments
    (default: each segment itself — a block-diagonal mask); ``causal`` (True, or [G, G] bool) limits
    an allowed pair to keys at global positions ``<=`` the query's; ``bias`` [G, G] is added to the
    scores of allowed pairs. Key padding is a segment no query is allowed to attend.

    Example::

        # text (0) sees text causally, image (1) sees everything, padding (2) is seen by no one
        mask = SegmentMask(ids_BS, allow=torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 0]]).bool(),
                           causal=torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 0]]).bool())
        with meshsp.sequence_parallel_attention("advanced_uaa"):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    """

    segments: torch.Tensor
    kv_segments: torch.Tensor | None = None
    allow: torch.Tensor | None = None
    causal: bool | torch.Tensor = False
    bias: torch.Tensor | None = None
    # It stands for a [B|1, 1, S_q, S_k] mask: code that branches on a mask's rank before calling SDPA
    # (diffusers' native backend reshapes 2-D masks) passes it on unchanged.
    ndim: ClassVar[int] = 4

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Being tensor-like lets F.scaled_dot_product_attention take it as ``attn_mask`` far enough
        # for the SP scope's TorchFunctionMode to see the call; anything else ends here.
        raise ValueError(f"a meshsp SegmentMask reaches {getattr(func, '__name__', func)} only through "
                         "sequence-parallel attention on DTensors inside meshsp.sequence_parallel_attention(); "
                         "elsewhere pass mask.dense().")

    def rule(self) -> Rule:
        g = int(max(self.segments.max().item(), self._kv().max().item())) + 1 if self.segments.numel() else 1
        for name, table in (("allow", self.allow), ("bias", self.bias),
                            ("causal", self.causal if isinstance(self.causal, torch.Tensor) else None)):
            if table is not None and (table.dim() != 2 or table.shape[0] < g or table.shape[1] < g):
                raise ValueError(f"SegmentMask.{name} must be [G, G] with G >= {g} (the largest segment id + 1), "
                                 f"got {tuple(table.shape)}.")
        if self.allow is not None:
            g = self.allow.shape[0]
        allow = self.allow.bool() if self.allow is not None else torch.eye(g, dtype=torch.bool)
        bias = self.bias.double() if self.bias is not None else torch.zeros(g, g, dtype=torch.float64)
        causal = self.causal.bool() if isinstance(self.causal, torch.Tensor) else torch.full((g, g), bool(self.causal))
        bias = torch.where(allow.cpu(), bias.cpu(), _NEG_INF)
        return Rule(tuple(map(tuple, bias.tolist())), tuple(map(tuple, causal.cpu().tolist())))

    def _kv(self) -> torch.Tensor:
        return self.segments if self.kv_segments is None else self.kv_segments

    def check(self, b: int, s_q: int, s_k: int) -> None:
        """Raise ``ValueError`` unless the ids fit queries [b, s_q] and keys [b, s_k]."""
        for name, ids, s in (("segments", self.segments, s_q), ("kv_segments", self._kv(), s_k)):
            if ids.dim() != 2 or ids.shape[0] not in (1, b) or ids.shape[1] != s or ids.is_floating_point():
                raise ValueError(f"SegmentMask.{name} must be integer ids [B or 1, S] = [{b}, {s}], "
                                 f"got {ids.dtype} {tuple(ids.shape)}.")
            if ids.numel() and int(ids.min()) < 0:
                raise ValueError(f"SegmentMask.{name} holds negative ids; ids are 0..G-1.")

    def dense(self) -> torch.Tensor:
        """The mask as F.scaled_dot_product_attention takes it: [B|1, 1, S_q, S_k], boolean without a
        bias, additive float (``-inf`` where masked) with one."""
        rule = self.rule()
        bias = torch.tensor(rule.bias, dtype=torch.float64)
        q, k = self.segments.long().cpu(), self._kv().long().cpu()
        b = max(q.shape[0], k.shape[0])
        q, k = q.expand(b, -1), k.expand(b, -1)
        table = bias[q[:, :, None], k[:, None, :]]
        causal = torch.tensor(rule.causal)[q[:, :, None], k[:, None, :]]
        later = torch.arange(k.shape[1])[None, :] > torch.arange(q.shape[1])[:, None]
        table = table.masked_fill(causal & later, _NEG_INF)[:, None]
        if self.bias is None:
            return torch.isfinite(table).to(self.segments.device)
        return table.to(self.segments.device, self.bias.dtype if self.bias.is_floating_point() else torch.float32)


@dataclass(frozen=True)
class Rule:
    """Between query segment a and key segment b: ``bias[a][b]`` added to the scores (-inf: never
    attends) and ``causal[a][b]`` (keys at positions above the query's are masked)."""

    bias: tuple[tuple[float, ...], ...]
    causal: tuple[tuple[bool, ...], ...]


@dataclass(frozen=True)
class Run:
    """Tokens ``start .. start + length - 1`` (rank-major) of one segment, at consecutive global
    positions from ``position``."""

    start: int
    length: int
    segment: int
    position: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class Call:
    """One kernel call of a block: query rows ``q0:q1`` over keys ``k0:k1`` (relative to the block),
    square-causal or full, with a constant bias added to its scores."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool = False
    bias: float = 0.0


@dataclass(frozen=True)
class RunMask:
    """Runs of queries and keys, one tuple per batch element (or one for all), and their rule."""

    q_runs: tuple[tuple[Run, ...], ...]
    k_runs: tuple[tuple[Run, ...], ...]
    rule: Rule

    @property
    def batch_groups(self) -> int:
        return max(len(self.q_runs), len(self.k_runs))

    def runs(self, b: int) -> tuple[tuple[Run, ...], tuple[Run, ...]]:
        return self.q_runs[b % len(self.q_runs)], self.k_runs[b % len(self.k_runs)]

    def calls(self, b: int, q_range: tuple[int, int], k_range: tuple[int, int]) -> list[Call]:
        q_runs, k_runs = self.runs(b)
        return block_calls(q_runs, k_runs, self.rule, q_range, k_range)

    def needs(self, q_range: tuple[int, int], k_range: tuple[int, int]) -> bool:
        """Whether any query in ``q_range`` attends any key in ``k_range`` (rank-major)."""
        return any(self.calls(b, q_range, k_range) for b in range(self.batch_groups))

    def encode(self) -> tuple[list[int], list[int], list[float]]:
        """Flat lists for the custom op's schema: runs as (group, start, length, segment, position)."""
        def flat(groups):
            return [x for g, runs in enumerate(groups) for r in runs for x in (g, r.start, r.length, r.segment, r.position)]
        gq, gk = len(self.rule.bias), len(self.rule.bias[0])
        rule = [float(gq), float(gk)] + [x for row in self.rule.bias for x in row] \
            + [float(x) for row in self.rule.causal for x in row]
        return flat(self.q_runs), flat(self.k_runs), rule

    @classmethod
    def decode(cls, q_flat: list[int], k_flat: list[int], rule: list[float]) -> RunMask:
        def groups(flat):
            out: list[list[Run]] = []
            for i in range(0, len(flat), 5):
                g = flat[i]
                while len(out) <= g:
                    out.append([])
                out[g].append(Run(*flat[i + 1 : i + 5]))
            return tuple(tuple(g) for g in out) or ((),)
        gq, gk = int(rule[0]), int(rule[1])
        bias = tuple(tuple(rule[2 + a * gk : 2 + (a + 1) * gk]) for a in range(gq))
        off = 2 + gq * gk
        causal = tuple(tuple(bool(x) for x in rule[off + a * gk : off + (a + 1) * gk]) for a in range(gq))
        return cls(groups(q_flat), groups(k_flat), Rule(bias, causal))


def _clip(runs: tuple[Run, ...], lo: int, hi: int) -> list[Run]:
    out = []
    for r in runs:
        a, b = max(r.start, lo), min(r.end, hi)
        if a < b:
            out.append(Run(a - lo, b - a, r.segment, r.position + a - r.start))
    return out


def _pair_calls(q: Run, k: Run, causal: bool, bias: float) -> list[Call]:
    """The calls of one query run over one key run; causal: key positions <= query positions.

    Rows at positions below the key run's first attend nothing; rows from the key run's last
    position attend all of it; the rows in between (positions ``a .. e-1``) attend the keys before
    ``a`` in full and keys ``a .. e-1`` as a square causal block (query i over keys <= i)."""
    if not causal:
        return [Call(q.start, q.end, k.start, k.end, False, bias)]
    p, n, c, m = q.position, q.length, k.position, k.length
    calls = []
    a, e = max(p, c), min(p + n, c + m - 1)  # positions of the rows that see part of the key run
    row = lambda pos: q.start + pos - p  # noqa: E731
    key = lambda pos: k.start + pos - c  # noqa: E731
    if a < e:
        if a > c:
            calls.append(Call(row(a), row(e), k.start, key(a), False, bias))
        calls.append(Call(row(a), row(e), key(a), key(e), True, bias))
    first_full = max(p, c + m - 1)
    if first_full < p + n:
        calls.append(Call(row(first_full), q.end, k.start, k.end, False, bias))
    return calls


def _coalesce(calls: list[Call]) -> list[Call]:
    """Merge full calls with equal bias that are adjacent along keys (same rows), then along rows
    (same keys): fewer, larger kernel calls."""
    def merge(calls, key, adjacent, join):
        out: list[Call] = []
        for c in sorted(calls, key=key):
            if out and not c.causal and not out[-1].causal and c.bias == out[-1].bias and adjacent(out[-1], c):
                out[-1] = join(out[-1], c)
            else:
                out.append(c)
        return out
    calls = merge(calls, lambda c: (c.q0, c.q1, c.k0), lambda a, c: (a.q0, a.q1) == (c.q0, c.q1) and a.k1 == c.k0,
                  lambda a, c: Call(a.q0, a.q1, a.k0, c.k1, False, a.bias))
    return merge(calls, lambda c: (c.k0, c.k1, c.q0), lambda a, c: (a.k0, a.k1) == (c.k0, c.k1) and a.q1 == c.q0,
                 lambda a, c: Call(a.q0, c.q1, a.k0, a.k1, False, a.bias))


def block_calls(q_runs, k_runs, rule: Rule, q_range: tuple[int, int], k_range: tuple[int, int]) -> list[Call]:
    """The kernel calls that compute queries ``q_range`` over keys ``k_range`` (rank-major) exactly;
    an empty list when no query of the block attends any of its keys."""
    calls = []
    for q in _clip(q_runs, *q_range):
        for k in _clip(k_runs, *k_range):
            bias = rule.bias[q.segment][k.segment]
            if bias != _NEG_INF:
                calls += _pair_calls(q, k, rule.causal[q.segment][k.segment], bias)
    return _coalesce(calls)


def runs_from_ids(segments, positions) -> tuple[Run, ...]:
    """Runs of tokens in order (1-D ids and global positions, lists or tensors): a new run where
    the segment changes or the position does not follow the previous one."""
    seg, pos = torch.as_tensor(segments, dtype=torch.long), torch.as_tensor(positions, dtype=torch.long)
    if seg.numel() == 0:
        return ()
    breaks = (seg[1:] != seg[:-1]) | (pos[1:] != pos[:-1] + 1)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), breaks.nonzero()[:, 0] + 1])
    ends = torch.cat([starts[1:], torch.tensor([seg.numel()])])
    return tuple(Run(a, b - a, g, p) for a, b, g, p in
                 zip(starts.tolist(), ends.tolist(), seg[starts].tolist(), pos[starts].tolist()))


def _classes(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rows of a 2-D tensor: (representative row index per class, class per row)."""
    unique, inverse = torch.unique(t, dim=0, return_inverse=True)
    first = torch.full((unique.shape[0],), t.shape[0], dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(t.shape[0]), "amin")
    return first, inverse


def compress(mask: torch.Tensor, order_q: list[int], order_k: list[int]) -> RunMask | None:
    """A dense mask [B|1, 1, S_q, S_k] (global order) as runs in the rank-major orders given (the
    global index of each rank-major token), exactly; None when it has too many distinct rows or
    columns, or too many runs, to be worth it. Reads the mask on the host (one sync)."""
    if mask.dim() != 4 or mask.shape[1] != 1:
        return None
    m = mask[:, 0].detach().cpu()
    bias_of = (lambda t: torch.where(t, 0.0, _NEG_INF).double()) if m.dtype == torch.bool else (lambda t: t.double())
    q_ids, k_ids, tables = [], [], []
    gq = gk = 0
    for b in range(m.shape[0]):
        rows_first, rows = _classes(m[b])
        cols_first, cols = _classes(m[b].t())
        if len(rows_first) > MAX_CLASSES or len(cols_first) > MAX_CLASSES:
            return None
        tables.append((gq, gk, bias_of(m[b][rows_first][:, cols_first])))
        q_ids.append(rows + gq)
        k_ids.append(cols + gk)
        gq, gk = gq + len(rows_first), gk + len(cols_first)
    bias = torch.full((gq, gk), _NEG_INF, dtype=torch.float64)
    for oq, ok, t in tables:
        bias[oq : oq + t.shape[0], ok : ok + t.shape[1]] = t
    oq, ok_ = torch.as_tensor(order_q, dtype=torch.long), torch.as_tensor(order_k, dtype=torch.long)
    q_runs = tuple(runs_from_ids(ids[oq], oq) for ids in q_ids)
    k_runs = tuple(runs_from_ids(ids[ok_], ok_) for ids in k_ids)
    if max(len(r) for r in q_runs + k_runs) > MAX_RUNS:
        return None
    no_causal = tuple((False,) * gk for _ in range(gq))
    return RunMask(q_runs, k_runs, Rule(tuple(map(tuple, bias.tolist())), no_causal))


def segment_runs(mask: SegmentMask, order_q, order_k) -> RunMask:
    """A ``SegmentMask`` as runs in the rank-major orders given (the global index of each
    rank-major token); reads the ids on the host (one sync)."""
    rule = mask.rule()
    oq, ok = torch.as_tensor(order_q, dtype=torch.long), torch.as_tensor(order_k, dtype=torch.long)
    q, k = mask.segments.long().cpu(), mask._kv().long().cpu()
    return RunMask(tuple(runs_from_ids(row[oq], oq) for row in q), tuple(runs_from_ids(row[ok], ok) for row in k), rule)


def causal_runs(q_pieces, k_pieces) -> RunMask:
    """``is_causal=True`` (query i sees keys j <= i, global indices) as runs, from the layout's
    pieces ``(global start, length)`` in rank-major order: no host sync."""
    def runs(pieces):
        out, at = [], 0
        for start, n in pieces:
            if n and out and out[-1].position + out[-1].length == start:
                out[-1] = Run(out[-1].start, out[-1].length + n, 0, out[-1].position)
            elif n:
                out.append(Run(at, n, 0, start))
            at += n
        return tuple(out)
    return RunMask((runs(q_pieces),), (runs(k_pieces),), Rule(((0.0,),), ((True,),)))
