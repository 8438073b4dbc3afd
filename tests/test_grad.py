"""The backward of SP attention: gradients of q, k and v on every rank against single-device
F.scaled_dot_product_attention's in float64 (bf16 no worse than one process), for Ulysses, Ring,
the hybrid and UAA, key padding, GQA, empty shards, causal (contiguous and zigzag), compact and
dense masks; bytes of the backward against the closed form."""

import pytest
import torch

import grad_tasks

DEGREES = [(2, 1, 2), (2, 2, 1), (4, 2, 2)]

CASES = [
    dict(kind="none", B=2, H=4, D=8, Sq=13),
    dict(kind="pad", B=2, H=4, D=8, Sq=13),
    dict(kind="pad", B=2, H=4, D=8, Sq=13, pipeline=True),
    dict(kind="none", B=1, H=6, Hk=2, D=8, Sq=9, Skv=14),  # GQA, cross lengths
    dict(kind="none", B=1, H=5, Hk=1, D=8, Sq=11),  # uneven heads: a cut GQA group
    dict(kind="none", B=1, H=3, D=8, Sq=3),  # empty shards
    dict(kind="causal", B=2, H=4, D=8, Sq=13),
    dict(kind="causal", B=1, H=4, D=8, Sq=21, balance="zigzag"),
    dict(kind="segment", B=2, H=6, Hk=2, D=8, Sq=17, G=4, rule=True, causal=True, bias=True),
    dict(kind="outer", B=2, H=4, D=8, Sq=15),
    dict(kind="bool", B=2, H=4, D=8, Sq=13),  # fully masked rows
    dict(kind="bool", B=2, H=4, D=8, Sq=13, sharded_mask=True),
    dict(kind="causal", B=1, H=4, D=8, Dv=4, Sq=19, balance="zigzag"),
    dict(kind="none", B=2, H=4, D=32, Sq=24, dtype=torch.bfloat16),
    dict(kind="causal", B=2, H=4, D=32, Sq=61, balance="zigzag", dtype=torch.bfloat16),
    dict(kind="segment", B=2, H=4, Hk=2, D=32, Sq=41, G=4, rule=True, causal=True, bias=True, dtype=torch.bfloat16),
    dict(kind="outer", B=2, H=4, D=32, Sq=33, dtype=torch.float16),
]


@pytest.mark.parametrize("world,ring,ulysses", DEGREES, ids=[f"R{r}xU{u}" for _, r, u in DEGREES])
def test_gradients_equal_single_device(pools, world, ring, ulysses):
    cases = [dict(c, ring=ring, ulysses=ulysses, seed=i) for i, c in enumerate(CASES)]
    per_rank = pools(world).run(grad_tasks.grad_parity, cases)
    assert all(len(r) == len(cases) for r in per_rank)


def test_ring_backward_bytes_equal_theory(pools):
    """R2, unmasked: K/V travel one hop again and dk/dv (float32 sums) two, per block."""
    b, h, s, d = 2, 4, 13, 8
    results = pools(2).run(grad_tasks.grad_parity, [dict(kind="none", B=b, H=h, D=d, Sq=s, ring=2, ulysses=1)])
    lens = (7, 6)
    for me, (r,) in enumerate(results):
        kv_hop = b * h * lens[me] * 2 * d * 8  # float64 K and V of this rank's block, sent once
        grads_hops = b * h * (lens[me] + lens[1 - me]) * 2 * d * 8  # own block's sums on, the other's home
        assert r["bytes"]["p2p"] == kv_hop + grads_hops, (me, r["bytes"])


def test_ulysses_backward_bytes_equal_forward(pools):
    """U2: the backward exchanges dout and returns dq, dk, dv — the forward's bytes, reversed."""
    b, h, s, d = 2, 4, 12, 8
    (r0,), (r1,) = pools(2).run(grad_tasks.grad_parity, [dict(kind="none", B=b, H=h, D=d, Sq=s, ring=1, ulysses=2)])
    half = b * (h // 2) * (s // 2) * d * 8  # one rank's tokens, the other rank's heads, float64
    assert r0["bytes"]["all_to_all"] == r1["bytes"]["all_to_all"] == 4 * half  # dout out; dq, dk, dv back
