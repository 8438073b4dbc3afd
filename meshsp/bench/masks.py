"""``meshsp bench attention``'s masked rows: causal and segment masks next to unmasked SP attention.

Each row runs the same shape on the same 2-rank pool as ``bench attention``: time (slowest rank,
median), the work each rank's kernels did (query-key scores, ``record_comm().scores``) as a fraction
of unmasked attention, the time per unit of that work against the unmasked row, the slowest rank's
work over the mean, and the bytes sent against a closed form computed from the dense mask (a ring
block travels to the next rank while a rank further on its way has a query that attends one of its
keys). Rows that skip no work (a dense pairwise mask) show what the kernel's own masking costs.
"""

from __future__ import annotations

import statistics

import torch

from meshsp.bench import sp_mesh
from meshsp.bench.attention import measure
from meshsp.launch import WorkerPool
from meshsp.ops import sp_attention
from meshsp.ops.blocks import PairMask
from meshsp.ops.masks import SegmentMask, causal_runs, segment_runs
from meshsp.placements import SeqLayout

__all__ = ["MASKS", "run_masks", "theory_bytes"]

# (row name, mask, balance): "documents" is block-diagonal over 4 documents of unequal length.
MASKS = (("none", None, "contiguous"), ("causal", "causal", "contiguous"), ("causal zigzag", "causal", "zigzag"),
         ("documents", "documents", "contiguous"), ("dense bool", "dense", "contiguous"))


def _dense(kind: str, s: int) -> torch.Tensor | None:
    """The mask as one process would pass it, [S, S] (True = attend), for the byte count; None
    where every block travels (no mask, and dense masks, whose blocks are not inspected)."""
    if kind in (None, "dense"):
        return None
    if kind == "causal":
        return torch.ones(s, s, dtype=torch.bool).tril()
    return _documents(s).dense()[0, 0]


def _documents(s: int) -> SegmentMask:
    cuts = [0, s * 3 // 10, s * 5 // 10, s * 8 // 10, s]
    ids = torch.zeros(1, s, dtype=torch.long)
    for i in range(4):
        ids[:, cuts[i] : cuts[i + 1]] = i
    return SegmentMask(ids)


def theory_bytes(kind: str | None, balance: str, shape, itemsize: int, ring: int, ulysses: int) -> list[int]:
    """Bytes each rank sends: Ulysses' four exchanges, and ring blocks a rank further on needs."""
    b, h, s, d = shape
    layout = SeqLayout.from_global(s, ring=ring, ulysses=ulysses, balance=balance)
    sent = [4 * b * h * layout.local(0, u) * d * (ulysses - 1) // ulysses * itemsize for u in range(ulysses)]
    sent = [sent[u] for _ in range(ring) for u in range(ulysses)]
    if ring == 1:
        return sent
    dense = _dense(kind, s)
    order = layout.order()
    starts = [sum(layout.ring_lens[:i]) for i in range(ring)]

    def needs(src, dst):
        if dense is None:
            return True
        rows = order[starts[dst] : starts[dst] + layout.ring_lens[dst]]
        cols = order[starts[src] : starts[src] + layout.ring_lens[src]]
        return bool(dense[rows][:, cols].any())

    for me in range(ring):
        for step in range(ring - 1):
            src = (me - step) % ring
            later = [(src + j) % ring for j in range((me + 1 - src) % ring, ring)]
            if any(needs(src, x) for x in later):
                for u in range(ulysses):  # each ulysses rank of the row sends its heads' block
                    sent[me * ulysses + u] += 2 * b * (h // ulysses) * layout.ring_lens[src] * d * itemsize
    return sent


def _pair(kind, layout: SeqLayout, s: int) -> PairMask | None:
    if kind is None:
        return None
    if kind == "causal":
        return PairMask(runs=causal_runs(layout.pieces(), layout.pieces()))
    mask = _documents(s)
    if kind == "dense":
        order = layout.order()
        dense = mask.dense()[:, :, order][:, :, :, order]
        return PairMask(rows=dense, q_start=0)
    return PairMask(runs=segment_runs(mask, layout.order(), layout.order()))


def _time(shape, dtype, ring, ulysses, kind, balance, repeats):
    mesh = sp_mesh(ring, ulysses)
    b, h, s, d = shape
    layout = SeqLayout.from_global(s, ring=ring, ulysses=ulysses, balance=balance)
    r, u = mesh.get_local_rank("ring"), mesh.get_local_rank("ulysses")
    q, k, v = (torch.randn(b, h, layout.local(r, u), d, dtype=dtype) for _ in range(3))
    pair = _pair(kind, layout, s)
    if pair is not None and pair.rows is not None:  # this ring row's rows (Ulysses: the row is the chunk)
        start = sum(layout.ring_lens[:r])
        pair = PairMask(rows=pair.rows[:, :, start : start + layout.ring_lens[r]], q_start=start)

    def call():
        return sp_attention(q, k, v, ring_group=mesh["ring"].get_group(), ulysses_group=mesh["ulysses"].get_group(),
                            q_layout=layout, pair=pair)

    return measure(call, repeats)


def run_masks(pool: WorkerPool, shape, dtype, repeats: int) -> list[dict]:
    """Every mode x mask row on ``pool`` (2 ranks); the unmasked row of each mode is the reference."""
    rows = []
    for mode, ring, ulysses in (("U2", 1, 2), ("R2", 2, 1)):
        base = None
        for name, kind, balance in MASKS:
            res = pool.run(_time, shape, dtype, ring, ulysses, kind, balance, repeats, timeout=900)
            t = statistics.median(max(ts) for ts in zip(*(x["times"] for x in res)))
            work = [x["scores"] for x in res]
            base = base or {"t": t, "work": sum(work)}
            theory = theory_bytes(kind, balance, shape, torch.finfo(dtype).bits // 8, ring, ulysses)
            frac = sum(work) / base["work"]
            rows.append({"mode": mode, "mask": name, "sp_s": t, "work": frac, "per_work": t / base["t"] / frac,
                         "imbalance": max(work) / (sum(work) / len(work)), "bytes": [x["bytes"] for x in res],
                         "theory": theory})
    return rows


def print_masks(rows: list[dict]) -> None:
    print(f"{'mode':<6}{'mask':<15}{'SP-2 (s)':>10}{'work':>7}{'time/work':>11}{'max/mean':>10}"
          f"{'MB sent (ranks)':>18}{'theory':>14}")
    for row in rows:
        sent = "/".join(f"{b / 2**20:.2f}" for b in row["bytes"])
        theory = "/".join(f"{b / 2**20:.2f}" for b in row["theory"])
        print(f"{row['mode']:<6}{row['mask']:<15}{row['sp_s']:>10.3f}{row['work']:>7.2f}{row['per_work']:>10.2f}x"
              f"{row['imbalance']:>10.2f}{sent:>18}{theory:>14}")
    print("work: scores computed over the unmasked row's; time/work: time per unit of work against the unmasked row; "
          "max/mean: the slowest rank's work over the mean")
