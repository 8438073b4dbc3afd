"""SP attention under masks beyond key padding — pairwise (whole, row-sharded, per head, boolean,
additive), compact ``SegmentMask`` and ``is_causal`` with the zigzag balance — against single-device
F.scaled_dot_product_attention in float64 on gloo ranks; bytes and work per rank measured."""

import pytest
import torch

import mask_tasks
from meshsp.ops.masks import SegmentMask, block_calls, compress, segment_runs

DEGREES = [(2, 1, 2), (2, 2, 1), (4, 1, 4), (4, 4, 1), (4, 2, 2)]

CASES = [
    dict(kind="causal", B=2, H=4, D=8, Sq=13),
    dict(kind="causal", B=1, H=6, Hk=2, D=8, Sq=9, Skv=14),  # GQA, S_q != S_k (top-left causal)
    dict(kind="causal", B=1, H=3, D=8, Sq=3),  # empty shards
    dict(kind="causal", B=1, H=4, D=8, Sq=21, balance="zigzag"),
    dict(kind="causal", B=2, H=5, D=7, Sq=2, balance="zigzag"),  # zigzag with empty pieces
    dict(kind="segment", B=2, H=4, D=8, Sq=13, G=3),  # block-diagonal documents
    dict(kind="segment", B=2, H=6, Hk=2, D=8, Sq=17, G=4, rule=True, causal=True, bias=True),
    dict(kind="segment", B=2, H=4, D=8, Sq=19, G=3, causal=True, rule=True, balance="zigzag"),
    dict(kind="outer", B=2, H=4, D=8, Sq=15),  # Chroma's additive 0/1 outer product
    dict(kind="bool", B=2, H=4, D=8, Sq=13),  # fully masked rows: zeros, as SDPA gives
    dict(kind="bool", B=1, H=3, D=8, Sq=9, Skv=11, per_head=True),
    dict(kind="bool", B=2, H=4, D=8, Sq=13, sharded_mask=True),
    dict(kind="bool", B=2, H=4, D=8, Sq=13, balance="zigzag", sharded_mask=True),
    dict(kind="bool", B=2, H=4, D=8, Sq=13, balance="zigzag"),
    dict(kind="additive", B=1, H=5, D=9, Sq=11, Skv=6),
    dict(kind="segment", B=1, H=4, D=16, Sq=23, G=2, causal=True, dtype=torch.float32, pipeline=True),
    dict(kind="segment", B=2, H=4, Hk=2, D=8, Sq=11, Skv=17, G=3, rule=True, bias=True),  # cross: keys' own ids
    dict(kind="causal", B=1, H=4, D=8, Dv=4, Sq=19, balance="zigzag"),  # value dim != head dim
    dict(kind="causal", B=2, H=4, D=64, Sq=40, dtype=torch.bfloat16, balance="zigzag"),
    dict(kind="segment", B=2, H=4, D=64, Sq=40, G=3, causal=True, rule=True, dtype=torch.bfloat16),
    dict(kind="outer", B=2, H=4, D=64, Sq=33, dtype=torch.float16),
]


@pytest.mark.parametrize("world,ring,ulysses", DEGREES, ids=[f"R{r}xU{u}" for _, r, u in DEGREES])
def test_masked_parity(pools, world, ring, ulysses):
    cases = [dict(c, ring=ring, ulysses=ulysses, seed=i) for i, c in enumerate(CASES)]
    per_rank = pools(world).run(mask_tasks.masked_parity, cases)
    assert len(per_rank) == world and all(len(r) == len(cases) for r in per_rank)


def _p2p(results):
    return sum(r["bytes"].get("p2p", 0) for r in results)


def test_causal_ring_sends_only_needed_blocks_and_zigzag_balances_work(pools):
    """R4, 64 tokens: a contiguous causal ring sends each block only to the ranks after it
    (6 of 12 block hops) and leaves the last rank 7x the first's work; zigzag sends all 12 hops
    and every rank does the same work within 5%."""
    base = dict(kind="causal", B=1, H=2, D=8, Sq=64, ring=4, ulysses=1)
    block = 1 * 2 * 16 * (8 + 8) * 8  # one rank's K and V, float64
    per_rank = pools(4).run(mask_tasks.masked_parity, [base, dict(base, balance="zigzag"), dict(base, kind="bool")])
    flat, zig, free = (list(x) for x in zip(*per_rank))
    assert _p2p(flat) == 6 * block and _p2p(zig) == 12 * block, (_p2p(flat), _p2p(zig))
    assert _p2p(free) == 12 * block  # a dense mask: every block travels
    flat_work, zig_work = [r["scores"] for r in flat], [r["scores"] for r in zig]
    assert sum(flat_work) == sum(zig_work) == 2 * 64 * 65 // 2, (flat_work, zig_work)
    assert max(flat_work) > 5 * min(flat_work)
    mean = sum(zig_work) / 4
    assert max(zig_work) <= 1.05 * mean, zig_work


def test_documents_inside_ring_rows_send_nothing(pools):
    """Block-diagonal documents that each lie in one ring row: no K/V block leaves its rank."""
    results = pools(4).run(mask_tasks.masked_parity, [dict(kind="segment", B=1, H=2, D=8, Sq=16, G=4, ring=4,
                                                           ulysses=1, aligned=True)])
    assert _p2p([r[0] for r in results]) == 0


@pytest.mark.parametrize("kind", ["causal_and_mask", "shape", "segment_ids"])
def test_bad_masks_raise_the_same_error_on_every_rank(pools, kind):
    msgs = pools(2).run(mask_tasks.bad_mask, kind, 2, 1, timeout=120)
    assert len(set(msgs)) == 1, msgs


def test_segment_mask_outside_the_scope_says_so():
    mask = SegmentMask(torch.zeros(1, 4, dtype=torch.long))
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="sequence_parallel_attention"):
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)


def test_block_calls_reproduce_the_dense_mask():
    """Runs and the rule, cut at random blocks in a random rank-major order, give exactly the
    dense mask: every allowed pair in exactly one call, no masked pair in any."""
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        s, gs = int(torch.randint(1, 20, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        mask = SegmentMask(torch.randint(0, gs, (1, s), generator=g), allow=torch.rand(gs, gs, generator=g) < 0.7,
                           causal=torch.rand(gs, gs, generator=g) < 0.5, bias=torch.randn(gs, gs, generator=g))
        order = torch.randperm(s, generator=g) if trial % 2 else torch.arange(s)
        runs = segment_runs(mask, order, order)
        qa, qb = sorted(torch.randint(0, s + 1, (2,), generator=g).tolist())
        ka, kb = sorted(torch.randint(0, s + 1, (2,), generator=g).tolist())
        got = torch.full((qb - qa, kb - ka), float("-inf"), dtype=torch.float64)
        for c in block_calls(*runs.runs(0), runs.rule, (qa, qb), (ka, kb)):
            part = torch.full((c.q1 - c.q0, c.k1 - c.k0), c.bias, dtype=torch.float64)
            if c.causal:
                part = part.masked_fill(torch.ones_like(part, dtype=torch.bool).triu(1), float("-inf"))
            seen = got[c.q0:c.q1, c.k0:c.k1]
            assert torch.isneginf(seen[torch.isfinite(part)]).all()  # no pair twice
            got[c.q0:c.q1, c.k0:c.k1] = torch.where(torch.isfinite(part), part, seen)
        want = mask.dense()[0, 0].double()[order[qa:qb]][:, order[ka:kb]]
        torch.testing.assert_close(got, want)


def test_dense_masks_compress_exactly():
    """An outer product of padding masks and a block-diagonal mask compress to 2 and 3 classes."""
    m = torch.tensor([[1, 1, 1, 0, 1]], dtype=torch.float64)
    outer = (m[:, :, None] * m[:, None, :])[:, None]
    runs = compress(outer, list(range(5)), list(range(5)))
    assert len(runs.rule.bias) == 2 and len(runs.rule.bias[0]) == 2
    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    block = SegmentMask(ids).dense()
    runs = compress(block, list(range(6)), list(range(6)))
    assert len(runs.rule.bias) == 3
    causal = torch.ones(1, 1, 200, 200, dtype=torch.bool).tril()
    assert compress(causal, list(range(200)), list(range(200))) is None  # 200 distinct rows


@pytest.mark.parametrize("balance", ["contiguous", "zigzag"])
@pytest.mark.parametrize("masked", [False, True], ids=["is_causal", "global_mask"])
def test_plans_take_causal_and_global_masks_in_either_balance(pools, balance, masked):
    """Through torch's parallelize_module on R2xU2 and R4; zigzag evens out the causal ring's work."""
    pairs = pools(4).run(mask_tasks.plan_parity, 2, 2, balance, masked)
    ring4 = pools(4).run(mask_tasks.plan_parity, 4, 1, balance, masked)
    if not masked:
        work = [r["scores"] for r in ring4]
        assert (max(work) / (sum(work) / 4) < 1.1) == (balance == "zigzag"), work
    assert pairs and ring4
