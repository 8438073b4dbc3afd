"""The local kernel's routing table, and the padding and math paths it relies on, on the CPU.

CUDA kernels cannot run here; what they are given can: every padded route is run through the CPU
kernel with the same padding, and must equal the unpadded result within float32 rounding.
"""

import pytest
import torch

import meshsp.ops.kernel as kernel
from meshsp.ops.kernel import KernelRoute, local_attention, math_attention, route, run_route

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64

ROUTES = [  # (device, dtype, D, Dv, masked, capability) -> (kernel, padded D, padded Dv)
    ("cpu", BF16, 64, 64, False, None, ("cpu-flash", 64, 64)),
    ("cpu", FP32, 40, 40, True, None, ("cpu-flash", 40, 40)),
    ("cpu", FP32, 64, 32, False, None, ("cpu-flash", 64, 64)),          # one head dim: the larger
    ("cpu", FP64, 16, 24, False, None, ("cpu-flash", 24, 24)),
    ("cuda", BF16, 128, 128, False, (9, 0), ("cuda-flash", 128, 128)),
    ("cuda", FP16, 72, 72, False, (8, 0), ("cuda-flash", 72, 72)),
    ("cuda", BF16, 100, 100, False, (9, 0), ("cuda-flash", 104, 104)),  # padded to a multiple of 8
    ("cuda", BF16, 6, 6, False, (8, 6), ("cuda-flash", 8, 8)),
    ("cuda", BF16, 192, 128, False, (9, 0), ("cuda-flash", 192, 192)),  # Dv != D: both to the larger
    ("cuda", BF16, 256, 256, False, (9, 0), ("cuda-flash", 256, 256)),
    ("cuda", BF16, 320, 320, False, (9, 0), ("cuda-efficient", 320, 320)),  # above flash's 256
    ("cuda", BF16, 252, 252, False, (9, 0), ("cuda-flash", 256, 256)),
    ("cuda", BF16, 254, 254, False, (9, 0), ("cuda-flash", 256, 256)),
    ("cuda", BF16, 258, 258, False, (9, 0), ("cuda-efficient", 264, 264)),
    ("cuda", BF16, 128, 128, True, (9, 0), ("cuda-efficient", 128, 128)),   # masks: memory-efficient
    ("cuda", BF16, 100, 100, True, (9, 0), ("cuda-efficient", 104, 104)),   # halves align to 8 ...
    ("cuda", FP32, 100, 100, False, (9, 0), ("cuda-efficient", 100, 100)),  # ... fp32 to 4
    ("cuda", FP32, 6, 6, False, (9, 0), ("cuda-efficient", 8, 8)),
    ("cuda", FP32, 64, 30, True, (8, 0), ("cuda-efficient", 64, 32)),      # v aligned on its own
    ("cuda", FP16, 64, 64, False, (7, 5), ("cuda-efficient", 64, 64)),     # no flash before 8.0
    ("cuda", FP16, 60, 60, False, (7, 0), ("cuda-efficient", 64, 64)),     # tensor cores: 8 halves
    ("cuda", FP32, 6, 6, False, (7, 5), ("cuda-efficient", 6, 6)),         # no fp32 tensor cores
    ("cuda", FP16, 6, 6, False, (6, 1), ("cuda-efficient", 6, 6)),
    ("cuda", BF16, 64, 64, False, (7, 5), ("math", 64, 64)),               # bf16 needs 8.0
    ("cuda", FP64, 64, 64, False, (9, 0), ("math", 64, 64)),
    ("mps", FP32, 64, 64, False, None, ("math", 64, 64)),
]


@pytest.mark.parametrize("device, dtype, d, dv, masked, cap, expected", ROUTES)
def test_routing_table(device, dtype, d, dv, masked, cap, expected):
    assert route(device, dtype, d, dv, masked, cap) == KernelRoute(*expected)


def _inputs(d=40, dv=None, h=4, hk=2, sq=37, sk=53, dtype=FP32, mask=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, h, sq, d, generator=g, dtype=FP64)
    k = torch.randn(2, hk, sk, d, generator=g, dtype=FP64)
    v = torch.randn(2, hk, sk, dv or d, generator=g, dtype=FP64)
    m = (torch.rand(2, sk, generator=g) < 0.7) if mask else None
    if m is not None:
        m[:, 0] = True
    return (q, k, v, m), tuple(t.to(dtype) for t in (q, k, v))


@pytest.mark.parametrize("d, dv, padded", [(40, 40, 48), (6, 6, 8), (100, 100, 104), (64, 30, 64), (20, 52, 56)])
@pytest.mark.parametrize("mask", [False, True])
def test_padded_head_dims_equal_unpadded(d, dv, padded, mask):
    """Zero columns change no score and no output: the padded run equals the unpadded one within
    float32 rounding, with the original D ** -0.5 scale (not the padded one)."""
    (q64, k64, v64, m), (q, k, v) = _inputs(d, dv, mask=mask)
    widest = max(d, dv)
    plain = run_route(KernelRoute("cpu-flash", widest, widest), q, k, v, m)
    pad = run_route(KernelRoute("cpu-flash", padded, padded), q, k, v, m)
    assert pad[0].shape == (2, 4, 37, dv)
    torch.testing.assert_close(pad[0], plain[0], rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(pad[1], plain[1], rtol=2e-6, atol=2e-6)
    ref, ref_lse = math_attention(q64, k64, v64, m)
    torch.testing.assert_close(pad[0].double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pad[1].double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d, dv", [(64, 32), (32, 64)])
def test_value_head_dims_that_differ_keep_a_float32_lse(d, dv):
    """Dv != D runs a fused kernel (padded), so bf16 inputs still get a float32 log-sum-exp as
    accurate as the fused path's (~1e-5), not a bf16 one (~1e-2)."""
    (q64, k64, v64, m), (q, k, v) = _inputs(d, dv, dtype=BF16)
    out, lse = local_attention(q, k, v, m)
    assert lse.dtype == FP32 and out.shape[-1] == dv
    ref, ref_lse = math_attention(*(t.to(BF16).double() for t in (q, k, v)), m)
    assert (lse.double() - ref_lse).abs().max() < 1e-4


def test_math_route_is_float32_and_chunked(monkeypatch):
    """The math path scores in float32 whatever the input dtype, a few query rows at a time."""
    (q64, k64, v64, m), (q, k, v) = _inputs(24, 16, dtype=BF16)
    whole = run_route(KernelRoute("math", 24, 16), q, k, v, m)
    monkeypatch.setattr(kernel, "MATH_CHUNK_BYTES", 2 * 4 * 53 * 8 * 5)  # 5 query rows per chunk
    chunked = run_route(KernelRoute("math", 24, 16), q, k, v, m)
    assert whole[1].dtype == FP32 and whole[0].dtype == BF16
    torch.testing.assert_close(chunked[0], whole[0], rtol=0, atol=2 ** -8)  # one bf16 rounding
    torch.testing.assert_close(chunked[1], whole[1], rtol=2e-6, atol=2e-6)
    ref, ref_lse = math_attention(*(t.to(BF16).double() for t in (q, k, v)), m)
    assert (whole[1].double() - ref_lse).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_fully_masked_rows_and_empty_shards(dtype):
    (_, _, _, m), (q, k, v) = _inputs(40, dtype=dtype)
    m[1] = False  # batch row 1 sees no key at all
    out, lse = local_attention(q, k, v, m)
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all() and torch.isfinite(lse[0]).all()
    out, lse = local_attention(q, k[:, :, :0], v[:, :, :0], m[:, :0])
    assert out.shape == (2, 4, 37, 40) and (out == 0).all() and torch.isneginf(lse).all()


def test_token_major_views_are_not_copied_for_the_gpu_kernels():
    """The CUDA kernels need a dense last dim only: a [B, S, H, D] view passes through unchanged."""
    x = torch.randn(2, 9, 4, 16).transpose(1, 2)
    assert kernel._last_dim_unit_stride(x) is x
    assert kernel._fold_groups(x, 4) is x  # no grouped queries: no reshape, no copy
    y = torch.randn(2, 4, 16, 9).transpose(-1, -2)
    assert kernel._last_dim_unit_stride(y).stride(-1) == 1


@pytest.mark.parametrize("q_heads, kv_heads, ulysses", [(9, 3, 2), (9, 3, 4), (12, 4, 5), (6, 2, 4), (8, 2, 3)])
def test_cut_gqa_groups_expand_by_shapes(q_heads, kv_heads, ulysses):
    """K/V heads for query heads that cut through a group come from shapes, not an index list
    (which would be a host-to-device copy per attention call), and equal indexing by that list."""
    from meshsp.ops.attention import _cut_group, _expand_heads
    from meshsp.placements import HeadSplit

    heads = HeadSplit(q_heads, kv_heads, ulysses)
    for u in range(ulysses):
        k = torch.randn(2, heads.kv_count(u), 5, 3)
        index, cut = heads.kv_index(u), _cut_group(heads, u)
        assert (index is None) == (cut is None)
        if index is not None:
            assert torch.equal(_expand_heads(k, *cut), k[:, index])


def test_a_mask_is_converted_once_per_tensor_not_per_layer():
    """A model hands every block the same mask tensor: its conversion (host reads of an additive
    mask's values, or a collective for shard-dependent checks) runs once, again only for a new
    tensor or after an in-place edit."""
    from meshsp.styles import PlanState

    state, calls = PlanState(), []
    q, k = torch.zeros(2, 4, 3, 8), torch.zeros(2, 4, 5, 8)

    def convert():
        calls.append(1)
        return torch.ones(2, 5, dtype=torch.bool)

    mask = torch.zeros(2, 1, 1, 5)
    for _ in range(30):  # 30 layers
        state.key_mask(mask, q, k, convert)
    assert len(calls) == 1
    mask.fill_(-1e9)  # edited in place
    state.key_mask(mask, q, k, convert)
    state.key_mask(mask.clone(), q, k, convert)  # another tensor
    state.key_mask(mask, q, torch.zeros(2, 4, 6, 8), convert)  # other keys
    assert len(calls) == 4 and state.key_mask(None, q, k, convert) is None


def test_ulysses_pipeline_threshold_per_backend_and_setting(monkeypatch):
    from meshsp.ops import ulysses

    monkeypatch.delenv(ulysses.PIPELINE_MIN_BYTES_ENV, raising=False)
    for backend, expected in (("gloo", 1 << 20), ("nccl", 16 << 20), ("mpi", 1 << 20)):
        monkeypatch.setattr(ulysses.dist, "get_backend", lambda group, b=backend: b)
        assert ulysses.pipeline_min_bytes(None) == expected
    monkeypatch.setenv(ulysses.PIPELINE_MIN_BYTES_ENV, "4096")
    assert ulysses.pipeline_min_bytes(None) == 4096
    monkeypatch.setenv(ulysses.PIPELINE_MIN_BYTES_ENV, "1MiB")
    with pytest.raises(ValueError, match="MESHSP_ULYSSES_PIPELINE_MIN_BYTES='1MiB' must be a whole number"):
        ulysses.pipeline_min_bytes(None)
