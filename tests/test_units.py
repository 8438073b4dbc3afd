"""Single-process checks: config, placements vs DTensor's own layout, the local kernel."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from meshsp import DiffusionParallelConfig, ParallelConfig, SeqLayout
from meshsp.ops.kernel import local_attention, math_attention
from meshsp.ops.ring import merge_partials
from meshsp.placements import HeadSplit, balanced_sizes, chunk_sizes


@pytest.mark.parametrize("kwargs,text", [
    (dict(ulysses_degree=0), "ulysses_degree must be a positive integer"),
    (dict(ring_degree=-2), "ring_degree must be a positive integer"),
    (dict(ulysses_degree=2.0), "ulysses_degree must be a positive integer"),
    (dict(ring_degree=True), "ring_degree must be a positive integer"),
    (dict(cfg_degree=3), "cfg_degree must be 1 or 2"),
    (dict(ulysses_mode="uaa"), "'strict', 'default', 'advanced_uaa'"),
    (dict(timeout_s=0), "timeout_s must be a positive"),
])
def test_config_errors(kwargs, text):
    with pytest.raises(ValueError, match=text.replace("(", r"\(")):
        ParallelConfig(**kwargs)


def test_config_derived_sizes_and_alias():
    cfg = DiffusionParallelConfig(ulysses_degree=2, ring_degree=3, cfg_degree=2, ulysses_mode="default")
    assert (cfg.sequence_parallel_size, cfg.world_size, cfg.uaa) == (6, 12, False)
    assert ParallelConfig(ulysses_mode="advanced_uaa").uaa
    with pytest.raises(Exception):
        cfg.ring_degree = 1  # frozen


def test_chunk_and_balanced_sizes():
    assert chunk_sizes(5, 4) == (2, 2, 1, 0) == tuple(
        len(c) for c in torch.arange(5).chunk(4)) + (0,)
    assert chunk_sizes(0, 3) == (0, 0, 0)
    assert balanced_sizes(30, 4) == (8, 8, 7, 7)


@pytest.mark.parametrize("n", [0, 1, 5, 13, 37, 4097])
@pytest.mark.parametrize("ring,ulysses", [(1, 4), (4, 1), (2, 2), (2, 4), (4, 4), (3, 5)])
def test_seq_layout_matches_dtensor(n, ring, ulysses):
    """SeqLayout reproduces DTensor's (Shard, Shard) local sizes and offsets, empty shards included."""
    layout = SeqLayout.from_global(n, ring=ring, ulysses=ulysses)
    assert layout.total == n
    for r in range(ring):
        for u in range(ulysses):
            shape, offset = _compute_local_shape_and_global_offset((n,), (ring, ulysses), [r, u], [Shard(0), Shard(0)])
            assert layout.local(r, u) == shape[0]
            if shape[0]:
                assert layout.offset(r, u) == offset[0]


@pytest.mark.parametrize("q_heads,kv_heads,u", [(30, 30, 4), (8, 2, 4), (6, 2, 4), (8, 1, 3), (3, 3, 4)])
def test_head_split_covers_every_group(q_heads, kv_heads, u):
    split = HeadSplit(q_heads, kv_heads, u)
    group = q_heads // kv_heads
    covered = []
    for rank in range(u):
        lo, hi = split.q_ranges[rank]
        covered.extend(range(lo, hi))
        kv_lo, kv_hi = split.kv_ranges[rank]
        assert all(kv_lo <= h // group < kv_hi for h in range(lo, hi))
    assert covered == list(range(q_heads))


def _inputs(b, h, hk, sq, sk, d, dv, dtype, masked):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, sq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hk, sk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hk, sk, dv, generator=g, dtype=dtype)
    mask = (torch.rand(b, sk, generator=g) < 0.5) if masked else None
    if mask is not None and sk:
        mask[:, 0] = True
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("h,hk,d,dv", [(4, 4, 64, 64), (6, 2, 7, 7), (4, 1, 16, 8)])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_matches_sdpa_and_lse(dtype, h, hk, d, dv, masked):
    q, k, v, mask = _inputs(2, h, hk, 9, 11, d, dv, dtype, masked)
    out, lse = local_attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None],
                                         enable_gqa=h != hk)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    scores = q @ k.repeat_interleave(h // hk, 1).transpose(-1, -2) * d ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1).to(lse.dtype), atol=tol * 10, rtol=tol)


def test_kernel_zero_length_and_fully_masked():
    q, k, v, _ = _inputs(2, 4, 4, 5, 7, 8, 8, torch.float64, False)
    out, lse = local_attention(q[:, :, :0], k, v)
    assert out.shape == (2, 4, 0, 8) and lse.shape == (2, 4, 0)
    out, lse = local_attention(q, k[:, :, :0], v[:, :, :0])
    assert (out == 0).all() and torch.isneginf(lse).all()
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 3] = True
    out, lse = local_attention(q, k, v, mask)
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()


def test_merge_of_key_blocks_equals_whole():
    q, k, v, mask = _inputs(1, 2, 2, 6, 12, 8, 8, torch.float64, True)
    mask[:, 6:] = False  # second block fully masked: must contribute nothing
    whole, lse_whole = math_attention(q, k, v, mask)
    a = local_attention(q, k[:, :, :6], v[:, :, :6], mask[:, :6])
    b = local_attention(q, k[:, :, 6:], v[:, :, 6:], mask[:, 6:])
    out, lse = merge_partials(*a, *b)
    torch.testing.assert_close(out, whole, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, lse_whole, atol=1e-12, rtol=1e-12)
    acc = a[0].clone()
    merged, _ = merge_partials(acc, a[1], b[0].clone(), b[1], into_a=True)
    assert merged.data_ptr() == acc.data_ptr()
    torch.testing.assert_close(merged, whole, atol=1e-12, rtol=1e-12)


def test_head_split_kv_index_for_groups_cut_by_the_split():
    split = HeadSplit(9, 3, 2)  # query heads 0-4 | 5-8, groups of 3
    assert split.kv_ranges == ((0, 2), (1, 3))
    assert split.kv_index(0) == [0, 0, 0, 1, 1] and split.kv_index(1) == [0, 1, 1, 1]
    assert HeadSplit(8, 2, 2).kv_index(0) is None


def test_local_api_rejects_missing_groups_and_empty_query_heads():
    from meshsp import sp_attention
    from meshsp.ops.checks import check_attention_inputs

    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="ulysses_group is None but the layout has degree 2"):
        sp_attention(q, q, q, ring_group=None, ulysses_group=None, q_layout=SeqLayout.from_global(8, ring=1, ulysses=2))
    layout = SeqLayout.from_global(4, ring=1, ulysses=1)
    with pytest.raises(ValueError, match="multiple of key-value heads"):
        check_attention_inputs(torch.randn(1, 0, 4, 8), q, q, None, q_layout=layout, kv_layout=layout,
                               ring_rank=0, ulysses_rank=0, uaa=True)


def test_planner_picks_uaa_when_text_does_not_split():
    from meshsp.planner import recommend

    rows = recommend("sd3", "h100", 1024, 1024, 4)  # 333 text tokens
    assert all(r["ulysses_mode"] == "advanced_uaa" for r in rows if r["ring"] * r["ulysses"] > 1)
    assert all(r["cfg"] == 1 for r in rows)  # SD3 batches its CFG into one call
