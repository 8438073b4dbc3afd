"""Rank-side checks of flex_attention under sequence parallelism (run on every rank of a WorkerPool).

Every check compares against single-device ``flex_attention`` on the whole sequence, in float64, with
the same mask_mod / score_mod: the output and the log-sum-exp of this rank's shard.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.attention.flex_attention as flex_module
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention

import meshsp
from meshsp import SeqLayout, shard_sequence
from meshsp.ops.flex import eager_operator, flex_sp_attention
from rank_tasks import mesh_for

BLOCK = 4  # small blocks, so that tiny sequences span many of them


def make_inputs(case: dict):
    g = torch.Generator().manual_seed(case.get("seed", 0))
    b, h, hk, d = case["B"], case["H"], case.get("Hk", case["H"]), case["D"]
    sq, skv = case["Sq"], case.get("Skv", case["Sq"])
    q = torch.randn(b, h, sq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hk, skv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hk, skv, case.get("Dv", d), generator=g, dtype=torch.float64)
    return q, k, v


def mask_mod_for(case: dict):
    """(mask_mod, mask B, mask H) of the case's mask kind, over global indices."""
    kind = case.get("mask", "none")
    b, h, sq, skv = case["B"], case["H"], case["Sq"], case.get("Skv", case["Sq"])
    if kind == "none":
        return None, None, None
    if kind == "causal":  # causal-like over unequal lengths: the last query sees every key
        return (lambda b_, h_, q, kv: q + (skv - sq) >= kv), None, None
    if kind == "document":  # block-diagonal by document id, documents of uneven length
        g = torch.Generator().manual_seed(case.get("seed", 0) + 7)
        doc = torch.cumsum(torch.rand(sq, generator=g) < 0.25, 0)
        return (lambda b_, h_, q, kv: doc[q] == doc[kv]), None, None
    if kind == "holes":  # causal, and every query q % 5 == 3 sees no key at all (rows with lse = -inf)
        return (lambda b_, h_, q, kv: (q >= kv) & (q % 5 != 3)), None, None
    if kind == "per_head_batch":  # a window that widens with the global head, keys cut per batch row
        lens = torch.tensor([skv - 3 * i for i in range(b)])
        return (lambda b_, h_, q, kv: ((q - kv).abs() <= 2 * h_ + 1) & (kv < lens[b_])), b, h
    raise ValueError(kind)


def score_mod_for(case: dict):
    kind = case.get("score", "none")
    if kind == "none":
        return None
    slopes = 2.0 ** -torch.arange(1, case["H"] + 1, dtype=torch.float64)
    # ALiBi-like: a bias by index distance, per global head, plus a batch-dependent term
    return lambda s, b, h, q, kv: s - slopes[h] * (q - kv).abs() + 0.25 * b


def sparse_lists(case: dict):
    """A BlockMask made from block lists with mask_mod=None (a block-sparse pattern), and the same
    pattern as a mask_mod for the single-device reference (whose eager path reads mask_mod only)."""
    b, sq = case["B"], case["Sq"]
    n = -(-sq // BLOCK)
    g = torch.Generator().manual_seed(case.get("seed", 0) + 11)
    dense = (torch.rand(b, 1, n, n, generator=g) < 0.4) | torch.eye(n, dtype=torch.bool)
    full = dense & (torch.rand(b, 1, n, n, generator=g) < 0.5)
    partial = dense & ~full
    order = lambda m: (m.sum(-1).to(torch.int32), torch.sort(m.int(), dim=-1, descending=True, stable=True).indices.to(torch.int32))  # noqa: E731
    pn, pi = order(partial)
    fn, fi = order(full)
    half = lambda b_, h_, q, kv: (q + kv) % 2 == 0  # noqa: E731  (the partial blocks' own mask_mod)
    bm = BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=BLOCK, mask_mod=half, seq_lengths=(sq, sq))
    ref = lambda b_, h_, q, kv: full[b_, 0, q // BLOCK, kv // BLOCK] | (partial[b_, 0, q // BLOCK, kv // BLOCK] & half(b_, h_, q, kv))  # noqa: E731
    return bm, ref


def _masks(case: dict):
    """(BlockMask for SP, BlockMask for the reference), both over the whole sequence, or (None, None)."""
    sq, skv = case["Sq"], case.get("Skv", case["Sq"])
    if case.get("mask") == "sparse_lists":
        bm, ref = sparse_lists(case)
        return bm, create_block_mask(ref, case["B"], None, sq, skv, device="cpu", BLOCK_SIZE=BLOCK)
    mask_mod, mb, mh = mask_mod_for(case)
    if mask_mod is None:
        return None, None
    bm = create_block_mask(mask_mod, mb, mh, sq, skv, device="cpu", BLOCK_SIZE=BLOCK)
    return bm, bm


def reference(case: dict, q, k, v):
    _, ref_mask = _masks(case)
    with eager_operator():
        out, aux = flex_attention(q, k, v, score_mod=score_mod_for(case), block_mask=ref_mask,
                                  enable_gqa=q.shape[1] != k.shape[1], return_aux=AuxRequest(lse=True))
    return out, aux.lse


def _coords(mesh, ring: int, ulysses: int):
    return (mesh.get_local_rank("ring") if ring > 1 else 0), (mesh.get_local_rank("ulysses") if ulysses > 1 else 0)


def local_parity(cases: list[dict]) -> list[float]:
    """flex_sp_attention on local shards (mask as a BlockMask, or as a bare mask_mod with ``as_mod``)."""
    errors = []
    for case in cases:
        ring, ulysses = case["ring"], case["ulysses"]
        mesh = mesh_for(ring, ulysses)
        r, u = _coords(mesh, ring, ulysses)
        q, k, v = make_inputs(case)
        expected, expected_lse = reference(case, q, k, v)
        ql = SeqLayout.from_global(q.shape[2], ring=ring, ulysses=ulysses)
        kl = SeqLayout.from_global(k.shape[2], ring=ring, ulysses=ulysses)
        q0, qn, k0, kn = ql.offset(r, u), ql.local(r, u), kl.offset(r, u), kl.local(r, u)
        mask = mask_mod_for(case)[0] if case.get("as_mod") else _masks(case)[0]
        out, lse = flex_sp_attention(
            q.narrow(2, q0, qn), k.narrow(2, k0, kn), v.narrow(2, k0, kn), score_mod_for(case), mask,
            ring_group=mesh["ring"].get_group() if ring > 1 else None,
            ulysses_group=mesh["ulysses"].get_group() if ulysses > 1 else None,
            q_layout=ql, kv_layout=kl, uaa=case.get("mode", "advanced_uaa") == "advanced_uaa")
        torch.testing.assert_close(out, expected.narrow(2, q0, qn), atol=1e-12, rtol=1e-12, msg=lambda m: f"{case}: {m}")
        torch.testing.assert_close(lse, expected_lse.narrow(2, q0, qn), atol=1e-12, rtol=1e-12,
                                   msg=lambda m: f"{case} lse: {m}")
        errors.append((out - expected.narrow(2, q0, qn)).abs().max().item() if qn else 0.0)
    return errors


def dtensor_parity(cases: list[dict]) -> list[float]:
    """flex_attention on sequence-sharded DTensors inside meshsp.sequence_parallel_attention."""
    errors = []
    for case in cases:
        mesh = mesh_for(case["ring"], case["ulysses"])
        q, k, v = make_inputs(case)
        expected, expected_lse = reference(case, q, k, v)
        dq, dk, dv = (shard_sequence(t, mesh, seq_dim=2) for t in (q, k, v))
        assert flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG is False
        with meshsp.sequence_parallel_attention(case.get("mode", "advanced_uaa")):
            out, aux = flex_attention(dq, dk, dv, score_mod=score_mod_for(case), block_mask=_masks(case)[0],
                                      enable_gqa=q.shape[1] != k.shape[1], return_aux=AuxRequest(lse=True))
        assert flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG is False  # the scope put the switch back
        assert out.placements == dq.placements and out.shape == expected.shape, (out.placements, out.shape)
        local = shard_sequence(expected, mesh, seq_dim=2).to_local()
        torch.testing.assert_close(out.to_local(), local, atol=1e-12, rtol=1e-12, msg=lambda m: f"{case}: {m}")
        torch.testing.assert_close(out.full_tensor(), expected, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(aux.lse.full_tensor(), expected_lse, atol=1e-12, rtol=1e-12)
        errors.append((out.to_local() - local).abs().max().item() if local.numel() else 0.0)
    return errors


class _FlexAttn(nn.Module):
    """Attention that calls flex_attention itself, as diffusers' flex processors do."""

    def __init__(self, case: dict) -> None:
        super().__init__()
        self.case = case

    def forward(self, q, k, v, block_mask=None):
        out = flex_attention(q, k, v, score_mod=score_mod_for(self.case), block_mask=block_mask,
                             enable_gqa=q.shape[1] != k.shape[1])
        return out + 1.0


class _FlexBlock(nn.Module):
    def __init__(self, case: dict) -> None:
        super().__init__()
        self.attn = _FlexAttn(case)
        self.case = case

    def forward(self, q, k, v):
        # the model builds the mask for the whole sequence and hands it to its attention
        return self.attn(q, k, v, block_mask=_masks(self.case)[0]) * 2.0


class _FlexModel(nn.Module):
    def __init__(self, case: dict) -> None:
        super().__init__()
        self.block = _FlexBlock(case)
        self.out = nn.Identity()

    def forward(self, q, k, v):
        return self.out(self.block(q, k, v))


def plan_parity(cases: list[dict]) -> list[float]:
    """A plan shards q/k/v into the block, routes the flex call inside ``block.attn``, gathers the output."""
    from meshsp.plans import Plan, parallelize
    from meshsp.styles import GatherSequence, ParallelAttention, ShardSequence

    errors = []
    for case in cases:
        mesh = mesh_for(case["ring"], case["ulysses"])
        q, k, v = make_inputs(case)
        expected = reference(case, q, k, v)[0] * 2.0 + 2.0
        model = _FlexModel(case)
        plan = Plan({"block": ShardSequence(inputs={"q": 2, "k": 2, "v": 2}), "block.attn": ParallelAttention(),
                     "out": GatherSequence(outputs={0: 2})},
                    ulysses_mode=case.get("mode", "advanced_uaa"), empty_shards=True)
        parallelize(model, mesh, plan)
        assert flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG is False
        out = model(q, k, v)
        assert flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG is False  # the exit hook put the switch back
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12, msg=lambda m: f"{case}: {m}")
        errors.append((out - expected).abs().max().item())
    return errors


def wrong_mask_length() -> None:
    """A BlockMask made for 20 tokens on a 16-token sequence: the ranks raise the same ValueError."""
    mesh = mesh_for(1, 2)
    layout = SeqLayout.from_global(16, ring=1, ulysses=2)
    u = mesh.get_local_rank("ulysses")
    q = torch.randn(1, 2, layout.local(0, u), 16, dtype=torch.float64)
    mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 20, 20, device="cpu")
    flex_sp_attention(q, q, q, None, mask, ring_group=None, ulysses_group=mesh["ulysses"].get_group(),
                      q_layout=layout, uaa=True)
