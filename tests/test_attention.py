"""Sequence-parallel attention on gloo ranks vs single-device F.scaled_dot_product_attention."""

import itertools

import pytest
import torch

import rank_tasks
from meshsp.bench.attention import theory_bytes
from meshsp.ops.ulysses import CHUNKS

# (ring, ulysses) per world size: U2, R2; U4 (= U4xR1), R4 (= U1xR4), U2xR2.
DEGREES = {2: [(1, 2), (2, 1)], 4: [(1, 4), (4, 1), (2, 2)]}
ALL = [(w, r, u) for w, pairs in DEGREES.items() for r, u in pairs]


def _strict_cases(ring, ulysses):
    base = dict(ring=ring, ulysses=ulysses, mode="strict")
    return [
        dict(base, B=2, H=8, D=64, Sq=32),
        dict(base, B=1, H=8, D=16, Sq=32, mask=True, seed=1),
        dict(base, B=3, H=8, Hk=4, D=8, Sq=16, Skv=8, seed=2),  # GQA, cross-attention lengths
        dict(base, B=1, H=4, D=8, Sq=16, mode="default", seed=3),  # the guide's alias
        dict(base, B=2, H=8, D=64, Sq=48, dtype=torch.float32, mask=True, seed=4),
    ]


def _uaa_cases(ring, ulysses):
    # These also run Ulysses' pipelined head-chunk exchange (forced on at any size).
    base = dict(ring=ring, ulysses=ulysses, mode="advanced_uaa", pipeline=True)
    return [
        dict(base, B=1, H=30, D=16, Sq=37, seed=10),  # Z-Image's 30 heads, odd length
        dict(base, B=2, H=6, Hk=2, D=7, Sq=5, Skv=3, seed=11),  # GQA, odd head dim, empty shards
        dict(base, B=2, H=5, D=9, Sq=41, Skv=77, mask=True, density=0.3, seed=12),  # 77-token text
        dict(base, B=1, H=3, D=64, Sq=3, mask=True, seed=13),  # fewer heads and tokens than ranks
        dict(base, B=1, H=8, Hk=1, D=32, Sq=29, Dv=16, seed=14),  # multi-query, Dv != D
        dict(base, B=1, H=9, Hk=3, D=8, Sq=1, Skv=6, seed=16),  # the head split cuts GQA groups
        dict(base, B=2, H=30, D=16, Sq=67, Skv=19, dtype=torch.float32, mask=True, seed=15),
    ]


@pytest.mark.parametrize("world,ring,ulysses", ALL, ids=[f"R{r}xU{u}" for _, r, u in ALL])
@pytest.mark.parametrize("mode", ["strict", "advanced_uaa"])
def test_parity_with_single_device(pools, world, ring, ulysses, mode):
    cases = _strict_cases(ring, ulysses) if mode == "strict" else _uaa_cases(ring, ulysses)
    if mode == "strict" and ulysses == 1:
        # Ring needs no divisibility in any mode: uneven ring chunks, one of them empty.
        cases.append(dict(ring=ring, ulysses=1, B=1, H=3, D=8, Sq=ring + 1, Skv=ring * 2 + 1, mask=True))
    per_rank = pools(world).run(rank_tasks.dtensor_parity, cases)
    assert len(per_rank) == world and all(len(errs) == len(cases) for errs in per_rank)


def _theory_bytes(ring, ulysses, b, h, s, d, itemsize):
    """The benchmark's closed form per primitive, plus the ranks' agreement on inputs (2 int64 per
    rank, gathered over ulysses, then over ring)."""
    local = b * h * (s // (ring * ulysses)) * d * itemsize  # one of q, k, v, out on one rank
    a2a = 4 * local * (ulysses - 1) // ulysses
    total = theory_bytes((b, h, s, d), itemsize, ring, ulysses)
    out = {k: v for k, v in (("all_to_all", a2a), ("p2p", total - a2a)) if v}
    out["consensus"] = 16 * (ulysses - 1) + 16 * ulysses * (ring - 1)
    return out


@pytest.mark.parametrize("pipeline", [False, True], ids=["whole", "pipelined"])
@pytest.mark.parametrize("world,ring,ulysses", ALL, ids=[f"R{r}xU{u}" for _, r, u in ALL])
def test_bytes_sent_equal_theory(pools, world, ring, ulysses, pipeline):
    b, h, s, d = 2, 8, 64, 16
    results = pools(world).run(rank_tasks.comm_bytes, dict(ring=ring, ulysses=ulysses, B=b, H=h, D=d, Sq=s,
                                                           pipeline=pipeline))
    expected = _theory_bytes(ring, ulysses, b, h, s, d, itemsize=8)
    for res in results:
        assert res["bytes"] == expected, (res, expected)
        # Pipelined Ulysses alone exchanges CHUNKS head chunks (each rank owns >= 2 of the 8 heads).
        chunks = CHUNKS if ring == 1 and pipeline else 1
        assert res["calls"].get("all_to_all", 0) == (2 * chunks if ulysses > 1 else 0)
        assert res["calls"].get("p2p", 0) == ring - 1
    assert sorted(r["coords"] for r in results) == sorted(itertools.product(range(ring), range(ulysses)))


@pytest.mark.parametrize("batch", [1, 2])
def test_ulysses_copies_each_element_once(pools, batch):
    """q, k, v are copied once on the way out (the head split) and not at all on the way in. The
    output, which the CPU kernel writes head-major, is copied once into the token-major wire format
    and once on the way back, into the [B, s, H, D] layout that the model's transpose-and-flatten
    reads for free. (The code before the token-major format copied 4x on each side.)"""
    for res in pools(2).run(rank_tasks.ulysses_copies, batch, 4, 24, 8):
        assert res["scatter"] == 3 * res["local"], res
        assert res["gather"] == 2 * res["local"], res
        assert res["flatten_is_free"], res


def test_dtensor_does_no_redistribution(pools):
    """DTensor's own Shard->Shard gathers everything: DTensor itself must issue no collective, and
    meshsp only its own all-to-all and P2P (whose bytes the test above checks)."""
    for res in pools(4).run(rank_tasks.funcol_counts):
        assert res["dtensor"] == {}, res
        assert res["meshsp"] == {"all_to_all": 2, "p2p": 1, "consensus": 2}, res


ATTENTION_ERRORS = {
    "strict_heads": "ulysses_degree values that work here",
    "strict_seq": "advanced_uaa",
    "gqa_groups": "multiple of key-value heads",
    "gqa_flag": "enable_gqa=True",
    "causal_and_mask": "not both",
    "dropout": "dropout_p=0",
    "replicated": "sharded along its sequence dim",
    "mask_dtype": "boolean key-padding [B, 1, 1, S_k]",
    "mask_full": "pairwise",
    "mixed": "must all be DTensors",
    "seq_dim": "sharded along its sequence dim",
}


@pytest.mark.parametrize("kind", sorted(ATTENTION_ERRORS))
def test_attention_errors_on_every_rank(pools, kind):
    msgs = pools(4).run(rank_tasks.raises, "bad_attention", kind, 1, 4, timeout=60)
    assert len(set(msgs)) == 1, msgs  # the same message on every rank
    assert ATTENTION_ERRORS[kind] in msgs[0], msgs[0]


@pytest.mark.parametrize("kind,text", [
    ("wrong_layout", "the layouts give it"),
    ("mask_shape", "boolean key-padding mask"),
    ("dtype_mix", "share a dtype"),
])
def test_local_op_errors_on_every_rank(pools, kind, text):
    msgs = pools(4).run(rank_tasks.raises, "bad_local_op", kind, 2, 2, timeout=60)
    assert all(text in m for m in msgs), msgs


def test_strict_error_lists_working_degrees(pools):
    msg = pools(4).run(rank_tasks.raises, "bad_attention", "strict_heads", 1, 4, timeout=60)[0]
    assert "30 query / 30 key-value heads" in msg and "[1, 2]" in msg and "advanced_uaa" in msg


def test_world_size_mismatch_on_every_rank(pools):
    msgs = pools(2).run(rank_tasks.raises, "bad_world_size", 2, 2, timeout=60)
    assert all("world size is 2" in m and "= 4" in m for m in msgs), msgs


@pytest.mark.parametrize("world,ring,ulysses", ALL, ids=[f"R{r}xU{u}" for _, r, u in ALL])
def test_whole_queries_over_sharded_keys(pools, world, ring, ulysses):
    """ParallelAttention(queries="replicated"): an unsharded stream (audio) attending to sharded
    tokens; uneven and empty key shards, masks (a rank may hold only padding), GQA; bytes = theory:
    per SP axis one all-reduce of the lse and one of the weighted output and weights."""
    cases = [dict(B=2, H=4, D=16, Sq=5, Skv=23, mask=True, density=0.4, seed=20),
             dict(B=1, H=6, Hk=2, D=8, Sq=3, Skv=2, seed=21),  # fewer keys than ranks: empty shards
             dict(B=1, H=3, D=8, Sq=7, Skv=30, dtype=torch.float32, mask=True, seed=22)]
    for res in pools(world).run(rank_tasks.replicated_parity, ring, ulysses, cases):
        axes = (ring > 1) + (ulysses > 1)
        for r, case in zip(res, cases):
            b, h, sq = case["B"], case["H"], case["Sq"]
            lse_bytes = b * h * sq * r["itemsize"]
            assert r["calls"] == 2 * axes and r["bytes"] == axes * (lse_bytes + r["out"] * r["itemsize"] + lse_bytes), r


def test_no_host_syncs_per_layer(pools):
    """An additive key-padding mask handed to every block is checked on the host once: later
    attention calls make no ``bool()`` / ``.item()`` of a tensor (without the per-tensor cache,
    three per call); a masked model's whole forward makes the same two (its input check) at 1 and 3
    blocks."""
    pool = pools(2)
    assert pool.run(rank_tasks.mask_syncs, 4) == [0, 0]
    assert pool.run(rank_tasks.mask_syncs, 4, mask_cache=False) == [12, 12]  # the check can fail
    for family in ("qwen-image", "hunyuan-video"):
        one, three = (pool.run(rank_tasks.host_syncs, family, n)[0] for n in (1, 3))
        assert one == three and one["_local_scalar_dense"] == 2 and one["nonzero"] == 0, (family, one, three)


def test_ranks_with_different_pipelining_settings_refuse_alike(pools):
    """MESHSP_ULYSSES_PIPELINE_MIN_BYTES set on one rank only would make the ranks issue different
    collectives (a hang): the input check sees it and every rank raises the same ValueError."""
    messages = pools(2).run(rank_tasks.mismatched_pipeline_setting)
    assert all("MESHSP_ULYSSES_PIPELINE_MIN_BYTES=0" in m and "different inputs" in m for m in messages), messages
