"""Functions that run on every rank of a WorkerPool (importable, so spawned ranks can unpickle them)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import meshsp
from meshsp import ParallelConfig, SeqLayout, init_sp_mesh, shard_sequence
from meshsp.ops import record_comm

_MESHES: dict = {}


def mesh_for(ring: int, ulysses: int):
    key = (ring, ulysses)
    if key not in _MESHES:
        _MESHES[key] = init_sp_mesh(ParallelConfig(ring_degree=ring, ulysses_degree=ulysses))
    return _MESHES[key]


def make_inputs(case: dict):
    g = torch.Generator().manual_seed(case.get("seed", 0))
    dtype = case.get("dtype", torch.float64)
    b, h, hk, d = case["B"], case["H"], case.get("Hk", case["H"]), case["D"]
    sq, skv = case["Sq"], case.get("Skv", case["Sq"])
    q = torch.randn(b, h, sq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hk, skv, d, generator=g, dtype=dtype)
    v = torch.randn(b, hk, skv, case.get("Dv", d), generator=g, dtype=dtype)
    mask = None
    if case.get("mask"):
        mask = torch.rand(b, skv, generator=g) < case.get("density", 0.6)
        mask[:, 0] = True  # at least one key per batch row, as in any real padding mask
    return q, k, v, mask


def reference(q, k, v, mask):
    m = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=q.shape[1] != k.shape[1])


def dtensor_parity(cases: list[dict]) -> list[float]:
    """Run every case through F.scaled_dot_product_attention on DTensors; return max abs errors."""
    errors = []
    for case in cases:
        mesh = mesh_for(case["ring"], case["ulysses"])
        q, k, v, mask = make_inputs(case)
        expected = reference(q, k, v, mask)
        dq, dk, dv = (shard_sequence(t, mesh, seq_dim=2) for t in (q, k, v))
        dmask = None if mask is None else shard_sequence(mask[:, None, None, :], mesh, seq_dim=3)
        with meshsp.sequence_parallel_attention(case.get("mode", "strict")):
            out = F.scaled_dot_product_attention(dq, dk, dv, attn_mask=dmask, enable_gqa=True)
        assert out.placements == dq.placements and out.shape == expected.shape, (out.placements, out.shape)
        local_expected = shard_sequence(expected, mesh, seq_dim=2).to_local()
        tol = 1e-12 if q.dtype == torch.float64 else 2e-6
        torch.testing.assert_close(out.to_local(), local_expected, atol=tol, rtol=tol, msg=lambda m: f"{case}: {m}")
        errors.append((out.to_local() - local_expected).abs().max().item() if local_expected.numel() else 0.0)
    return errors


def comm_bytes(case: dict) -> dict:
    """Bytes and calls this rank sends for one SP attention call, measured by record_comm."""
    mesh = mesh_for(case["ring"], case["ulysses"])
    q, k, v, mask = make_inputs(case)
    dq, dk, dv = (shard_sequence(t, mesh, seq_dim=2) for t in (q, k, v))
    with record_comm() as stats, meshsp.sequence_parallel_attention(case.get("mode", "strict")):
        F.scaled_dot_product_attention(dq, dk, dv)
    return {"bytes": dict(stats.bytes_sent), "calls": dict(stats.calls),
            "coords": (mesh.get_local_rank("ring"), mesh.get_local_rank("ulysses"))}


def raises(fn_name: str, *args) -> str:
    """Call ``fn_name`` from this module; return the ValueError text, or fail."""
    try:
        globals()[fn_name](*args)
    except ValueError as exc:
        return str(exc)
    raise AssertionError(f"{fn_name}{args} did not raise ValueError")


def world_size() -> int:
    return dist.get_world_size()
