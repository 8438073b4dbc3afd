"""``meshsp demo``: every SP mode on 4 CPU ranks, checked against the single-device result."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from meshsp.config import ParallelConfig
from meshsp.launch import WorkerPool
from meshsp.mesh import init_sp_mesh
from meshsp.ops.dtensor import sequence_parallel_attention
from meshsp.placements import shard_sequence

MODES = (  # (label, ring, ulysses, ulysses_mode)
    ("Ulysses U4 (UAA)", 1, 4, "advanced_uaa"),
    ("Ring R4", 4, 1, "strict"),
    ("Hybrid U2xR2 (UAA)", 2, 2, "advanced_uaa"),
)


def _check(ring, ulysses, mode, seq, heads):
    # The ranks run on gloo, so the mesh and tensors are CPU ones, on a GPU host too.
    mesh = init_sp_mesh(ParallelConfig(ring_degree=ring, ulysses_degree=ulysses, ulysses_mode=mode), device_type="cpu")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, 64, generator=g) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)
    dq, dk, dv = (shard_sequence(t, mesh, seq_dim=2) for t in (q, k, v))
    with sequence_parallel_attention(mode):
        t0 = time.perf_counter()
        out = F.scaled_dot_product_attention(dq, dk, dv)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = F.scaled_dot_product_attention(dq, dk, dv)
        sp_s = time.perf_counter() - t0
    mine = shard_sequence(expected, mesh, seq_dim=2).to_local()  # this rank's slice of the reference
    err = (out.to_local() - mine).abs().max().item() if mine.numel() else 0.0
    return {"err": err, "first_s": first_s, "sp_s": sp_s, "placements": str(out.placements)}


def run(seq: int = 2053, heads: int = 30) -> int:
    print(f"meshsp demo: attention B=1 H={heads} S={seq} D=64 fp32 on 4 CPU ranks (gloo), "
          "F.scaled_dot_product_attention on sequence-sharded DTensors")
    ok = True
    for label, ring, ulysses, mode in MODES:
        with WorkerPool(4, backend="gloo") as pool:
            per_rank = pool.run(_check, ring, ulysses, mode, seq, heads, timeout=600)
        res = dict(per_rank[0], err=max(r["err"] for r in per_rank))
        good = res["err"] <= 1e-5
        ok &= good
        print(f"  {label:<20} mesh (ring={ring}, ulysses={ulysses})  out {res['placements']}  "
              f"max|diff| vs 1 device {res['err']:.1e} {'OK' if good else 'FAIL'}  "
              f"first call {res['first_s'] * 1e3:.0f} ms, next {res['sp_s'] * 1e3:.0f} ms")
    print("all modes match the single-device result" if ok else "MISMATCH")
    return 0 if ok else 1
