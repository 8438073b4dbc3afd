"""``meshsp bench attention``: SP attention on 2 processes vs the same attention in 1 process.

Every rank runs one thread. The single-process time is measured on rank 0 of the same pool while
the other rank idles, so both numbers come from the same run on the same machine. Bytes are counted
by ``record_comm`` and compared with the closed form of each algorithm.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from meshsp.bench import sp_mesh
from meshsp.launch import WorkerPool
from meshsp.ops import local_attention, record_comm, sp_attention
from meshsp.placements import SeqLayout


def _time_local(shape, dtype, repeats, ranks):
    """Median time of the local kernel on ``shape``, run by ``ranks`` at the same moment."""
    active = dist.get_rank() < ranks
    q, k, v = (torch.randn(shape, dtype=dtype) for _ in range(3))
    if active:
        local_attention(q, k, v)  # warm-up
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        if active:
            local_attention(q, k, v)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) if active else None


def _time_sp(shape, dtype, ring, ulysses, repeats):
    mesh = sp_mesh(ring, ulysses)
    b, h, s, d = shape
    layout = SeqLayout.from_global(s, ring=ring, ulysses=ulysses)
    r, u = mesh.get_local_rank("ring"), mesh.get_local_rank("ulysses")
    q, k, v = (torch.randn(b, h, layout.local(r, u), d, dtype=dtype) for _ in range(3))

    def call():
        return sp_attention(q, k, v, ring_group=mesh["ring"].get_group(),
                            ulysses_group=mesh["ulysses"].get_group(), q_layout=layout)

    return measure(call, repeats)


def measure(call, repeats: int) -> dict:
    """One warm-up call's communication, then ``repeats`` timed calls, each after a barrier: times,
    the bytes the algorithm moves (the 16-byte input agreement aside) and the scores computed."""
    with record_comm() as stats:
        call()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"times": times, "bytes": stats.bytes_sent["all_to_all"] + stats.bytes_sent["p2p"], "scores": stats.scores}


def theory_bytes(shape, itemsize, ring, ulysses) -> int:
    """Bytes one rank sends for an even self-attention: Ulysses q,k,v out and o back; Ring K/V."""
    b, h, s, d = shape
    local = b * h * (s // (ring * ulysses)) * d
    a2a = 4 * local * (ulysses - 1) // ulysses
    p2p = (ring - 1) * 2 * b * (h // ulysses) * (s // ring) * d
    return (a2a + p2p) * itemsize


def run(seq: int = 8192, heads: int = 8, head_dim: int = 64, batch: int = 1, repeats: int = 5,
        masks: bool = True) -> list[dict]:
    """Measure and print; returns the rows (with ``masks``, the masked rows of ``meshsp.bench.masks``
    follow under ``rows[-1]["masked"]``)."""
    shape, dtype = (batch, heads, seq, head_dim), torch.float32
    rows = []
    with WorkerPool(2, threads=1) as pool:
        single = pool.run(_time_local, shape, dtype, repeats, 1, timeout=900)[0]
        # Half the heads on both ranks at once, no communication: the best SP-2 can do on this
        # machine, since two busy cores run each kernel slower than one busy core does.
        half = (batch, heads // 2, seq, head_dim)
        ceiling = single / max(pool.run(_time_local, half, dtype, repeats, 2, timeout=900))
        for name, ring, ulysses in (("U2", 1, 2), ("R2", 2, 1)):
            res = pool.run(_time_sp, shape, dtype, ring, ulysses, repeats, timeout=900)
            per_iter = [max(ts) for ts in zip(*(r["times"] for r in res))]
            t = statistics.median(per_iter)
            expected = theory_bytes(shape, 4, ring, ulysses)
            rows.append({"mode": name, "single_s": single, "sp_s": t, "speedup": single / t,
                         "ceiling": ceiling, "bytes": res[0]["bytes"], "theory": expected, "bytes_ratio": res[0]["bytes"] / expected})
        from meshsp.bench.masks import run_masks  # it measures with this module's ``measure``

        masked = run_masks(pool, shape, dtype, repeats) if masks else []
    print(f"attention B={batch} H={heads} S={seq} D={head_dim} fp32, 1 thread per rank, median of {repeats}")
    print(f"{'mode':<6}{'1 proc (s)':>12}{'SP-2 (s)':>10}{'speedup':>9}{'ceiling':>9}"
          f"{'MB sent/rank':>14}{'theory MB':>11}{'ratio':>7}")
    for row in rows:
        print(f"{row['mode']:<6}{row['single_s']:>12.3f}{row['sp_s']:>10.3f}{row['speedup']:>8.2f}x{row['ceiling']:>8.2f}x"
              f"{row['bytes'] / 2**20:>14.2f}{row['theory'] / 2**20:>11.2f}{row['bytes_ratio']:>7.2f}")
    print("ceiling: 1-process time / time of half the work on both ranks at once with no communication")
    if masked:
        from meshsp.bench.masks import print_masks

        print(f"\nmasked SP-2 attention, same shape and pool, median of {repeats}")
        print_masks(masked)
        rows[-1]["masked"] = masked
    return rows
