"""Rank-side checks of SP attention's backward (tests/test_grad.py): gradients of q, k and v against
single-device F.scaled_dot_product_attention's, per rank, with bytes counted."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import meshsp
from meshsp import SeqLayout, shard_sequence
from meshsp.ops import record_comm
from mask_tasks import make_mask
from rank_tasks import make_inputs, mesh_for, per_case


def _case_mask(case: dict, q, k, pad):
    """(attn_mask for the parallel call, is_causal, the dense mask for the reference)."""
    kind = case.get("kind", "none")
    if kind == "none":
        return None, False, None
    if kind == "pad":
        return pad[:, None, None, :], False, pad[:, None, None, :]
    return make_mask(case, q, k)


def grad_parity(cases: list[dict]) -> list[dict]:
    return per_case(_grad_parity, cases)


def _reference(q, k, v, dense, causal, dout):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, attn_mask=dense, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    out.backward(dout)
    return [t.grad for t in leaves]


def _grad_parity(case: dict) -> dict:
    ring, ulysses = case["ring"], case["ulysses"]
    mesh = mesh_for(ring, ulysses)
    q, k, v, pad = make_inputs(dict(case, mask=case.get("kind") == "pad"))
    mask, causal, dense = _case_mask(case, q, k, pad)
    g = torch.Generator().manual_seed(case.get("seed", 0) + 7)
    dout = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[3], generator=g, dtype=q.dtype)
    # one device in the inputs' dtype takes an additive mask in that dtype too
    same = dense if dense is None or dense.dtype == torch.bool else dense.to(q.dtype)
    want = _reference(q, k, v, same, causal, dout)
    balance = case.get("balance", "contiguous")
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    shards = [shard_sequence(t, mesh, 2, balance) for t in leaves]
    if case.get("sharded_mask"):
        order = SeqLayout.from_global(k.shape[2], ring=ring, ulysses=ulysses, balance=balance).order()
        mask = shard_sequence(mask.expand(q.shape[0], -1, -1, -1).index_select(3, order), mesh, 2, balance)
    with meshsp.sequence_parallel_attention(case.get("mode", "advanced_uaa"), balance):
        got = F.scaled_dot_product_attention(*shards, attn_mask=mask, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    local_dout = shard_sequence(dout, mesh, 2, balance).to_local()
    with record_comm() as stats:
        got.to_local().backward(local_dout)
    errors = {}
    for name, leaf, ref in zip("qkv", leaves, want):
        mine = shard_sequence(leaf.grad, mesh, 2, balance).to_local()
        expected = shard_sequence(ref, mesh, 2, balance).to_local()
        if q.dtype in (torch.bfloat16, torch.float16):
            exact = _reference(q.double(), k.double(), v.double(), dense if dense is None or dense.dtype == torch.bool
                               else dense.double(), causal, dout.double())["qkv".index(name)]
            exact = shard_sequence(exact, mesh, 2, balance).to_local()
            parallel, single = ((t.double() - exact).abs().max().item() if t.numel() else 0.0 for t in (mine, expected))
            assert parallel <= 1.5 * single + 1e-3, (case, name, parallel, single)
            errors[name] = parallel
            continue
        tol = 1e-12 if q.dtype == torch.float64 else 2e-5
        torch.testing.assert_close(mine, expected, atol=tol, rtol=tol, msg=lambda m: f"{case} d{name}: {m}")
        errors[name] = (mine - expected).abs().max().item() if mine.numel() else 0.0
    return {"errors": errors, "bytes": dict(stats.bytes_sent), "calls": dict(stats.calls)}
