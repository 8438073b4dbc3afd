"""The VAE decode split into row bands across the mesh equals the untiled single-device decode."""

import pytest
import rank_tasks
import torch

PIPELINES = {"tiny-flux": "AutoencoderKL", "tiny-wan": "AutoencoderKLWan", "tiny-qwen-image": "AutoencoderKLQwenImage",
             "AutoencoderKLFlux2": "AutoencoderKLFlux2"}  # Flux2's VAE, built at toy width
IMAGE = {"even": (1, 4, 8, 8), "uneven": (2, 4, 7, 9)}            # [B, C, H, W]: 7 rows over 2 or 4 ranks
VIDEO = {"even": (1, 4, 3, 8, 8), "uneven": (1, 4, 2, 7, 9)}      # [B, C, T, H, W]


@pytest.mark.parametrize("world,degrees", [(2, dict(ulysses_degree=2)),
                                           (4, dict(ulysses_degree=2, tensor_parallel_size=2))], ids=["2", "4"])
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_split_decode_equals_whole_decode(pools, pipeline, world, degrees):
    shapes = IMAGE if pipeline in ("tiny-flux", "AutoencoderKLFlux2") else VIDEO
    for bands, shape in shapes.items():
        # the trained tiny Qwen-Image VAE (meshsp/assets) runs larger activations through its 3-D
        # convolutions than the seeded ones: its float32 rounding reaches 1.2e-5 of the output scale
        tol = 2e-5 if pipeline == "tiny-qwen-image" else 1e-5
        r = pools(world).run(rank_tasks.vae_decode_parity, pipeline, shape, tol=tol, **degrees)[0]
        assert r["calls"]["vae_halo"] > 0 and r["calls"]["p2p"] > 0, (bands, r)  # split, and attention ran Ring


@pytest.mark.parametrize("world,degrees", [(2, dict(ulysses_degree=2)),
                                           (4, dict(ulysses_degree=2, tensor_parallel_size=2))], ids=["2", "4"])
@pytest.mark.parametrize("vae_class", list(rank_tasks.VIDEO_VAE_CONFIGS))
def test_video_vae_split_decode_equals_whole_decode(pools, vae_class, world, degrees):
    """HunyuanVideo's, LTX-Video's and CogVideoX's VAEs; CogVideoX decodes 2 latent frames a call
    (4 and 5 frames: two calls, its conv caches carried per rank from one to the next)."""
    frames = (4, 5) if vae_class == "AutoencoderKLCogVideoX" else (3, 2)
    for shape in [(1, 4, frames[0], 8, 8), (1, 4, frames[1], 7, 9)]:  # even and uneven bands
        r = pools(world).run(rank_tasks.video_vae_decode_parity, vae_class, shape, **degrees)[0]
        assert r["calls"]["vae_halo"] > 0, (shape, r)
        if vae_class == "AutoencoderKLHunyuanVideo":
            assert r["calls"]["p2p"] == world - 1 and r["calls"]["vae_norm_all_reduce"] > 0, (shape, r)
        if vae_class == "AutoencoderKLCogVideoX":
            assert r["calls"]["vae_gather"] == 2 and r["calls"]["vae_norm_all_reduce"] > 0, (shape, r)


def test_hunyuan_halo_norm_and_ring_bytes_equal_theory(pools):
    """AutoencoderKLHunyuanVideo on 2 ranks: each padding wrapper sends one row of every frame of its
    input to the one neighbour; each GroupNorm all-reduces B x G x 3 float64 sums; the mid-block's
    frame-causal ring sends each rank's keys and values once."""
    import diffusers

    shape, rows = (1, 4, 2, 7, 9), (4, 3)  # balanced bands of 7 latent rows
    r = pools(2).run(rank_tasks.video_vae_decode_parity, "AutoencoderKLHunyuanVideo", shape, ulysses_degree=2)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLHunyuanVideo(**rank_tasks.VIDEO_VAE_CONFIGS["AutoencoderKLHunyuanVideo"])
    halo, norms = [0], [0]

    def conv_hook(mod, args):
        b, c, t, _, w = args[0].shape
        halo[0] += b * c * t * w * mod.time_causal_padding[2] * 4

    def norm_hook(mod, args):
        norms[0] += args[0].shape[0] * mod.num_groups * 3 * 8

    for m in vae.decoder.modules():
        if type(m).__name__ == "HunyuanVideoCausalConv3d":
            m.register_forward_pre_hook(conv_hook)
        elif isinstance(m, torch.nn.GroupNorm):
            m.register_forward_pre_hook(norm_hook)
    with torch.no_grad():
        vae.decode(torch.zeros(shape))
    b, _, t, _, w = shape
    channels = vae.config.block_out_channels[-1]  # one head of all channels, at the latent's size
    for rank in range(2):
        assert r[rank]["bytes"]["vae_halo"] == halo[0]
        assert r[rank]["bytes"]["vae_norm_all_reduce"] == norms[0]
        assert r[rank]["bytes"]["p2p"] == 2 * b * t * rows[rank] * w * channels * 4


def test_halo_and_norm_bytes_equal_theory(pools):
    """AutoencoderKL on 2 ranks: each 3x3 convolution sends one row of its input to the one
    neighbour; each GroupNorm all-reduces B x G x 3 float64 sums."""
    import diffusers

    from meshsp.pipelines import tiny_pipeline_path

    shape = (2, 4, 7, 9)
    r = pools(2).run(rank_tasks.vae_decode_parity, "tiny-flux", shape, ulysses_degree=2)
    vae = diffusers.AutoencoderKL.from_pretrained(tiny_pipeline_path("tiny-flux") / "vae")
    rows = (4, 3)  # balanced bands of 7 latent rows
    halo, norms, hooks = [0, 0], [0], []

    def conv_hook(mod, args):
        b, c, h, w = args[0].shape
        factor = h // 7  # upsampled so far
        for rank in range(2):
            halo[rank] += b * c * w * mod.padding[0] * 4 if rows[rank] * factor else 0

    def norm_hook(mod, args):
        norms[0] += args[0].shape[0] * mod.num_groups * 3 * 8

    for m in vae.decoder.modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1:
            hooks.append(m.register_forward_pre_hook(conv_hook))
        elif isinstance(m, torch.nn.GroupNorm):
            hooks.append(m.register_forward_pre_hook(norm_hook))
    with torch.no_grad():
        vae.decode(torch.zeros(shape))
    for rank in range(2):
        assert r[rank]["bytes"]["vae_halo"] == halo[rank]
        assert r[rank]["bytes"]["vae_norm_all_reduce"] == norms[0]


@pytest.mark.parametrize("world", [2, 4])
def test_band_group_norm_equals_group_norm_in_each_dtype(pools, world):
    """7 rows over 2 or 4 ranks (1-row bands on 4); float64 and float32 through nn.GroupNorm's own
    kernel corrected in place, bfloat16 through fp32 var_mean."""
    for diffs in pools(world).run(rank_tasks.band_group_norm_parity):
        assert diffs["torch.float32"] < 1e-5 and diffs["torch.float64"] < 1e-12, diffs


def test_plan_through_torch_and_refusals(pools):
    assert pools(2).run(rank_tasks.vae_entry_points) == ["ok"] * 2
    msgs = pools(4).run(rank_tasks.raises, "vae_too_few_rows")
    assert len(set(msgs)) == 1 and "the latent has 3 rows, fewer than the 4 ranks" in msgs[0], msgs


@pytest.mark.parametrize("world", [2, 4])
def test_split_encode_equals_whole_encode(pools, world):
    """AutoencoderKL's encoder: bands of 8-row units (its three stride-2 downsamplings); 56 rows =
    7 units over 2 or 4 ranks."""
    for shape in [(1, 3, 64, 64), (2, 3, 56, 72)]:
        r = pools(world).run(rank_tasks.vae_encode_parity, shape, ulysses_degree=world)[0]
        assert r["calls"]["vae_halo"] > 0, r


# Frames of the even (32 rows: 4 units of 8) and uneven (40 rows: 5 units, batch 2) cases. Wan and
# Qwen-Image encode frame 1, then 4 at a time, with per-frame caches; CogVideoX 8 frames a call with
# its convolution caches (17: two calls); HunyuanVideo 16 frames a tile (17: two tiles, blended).
VIDEO_ENCODES = {"tiny-wan": (5, 1), "tiny-qwen-image": (1, 5), "AutoencoderKLHunyuanVideo": (5, 17),
                 "AutoencoderKLCogVideoX": (17, 9)}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("vae", list(VIDEO_ENCODES))
def test_video_vae_split_encode_equals_whole_encode(pools, vae, world):
    """The video VAEs' encoders in bands of 8-row units: causal 3-D convolutions with halos (their
    caches' too), downsampling behind a bottom padding row (Wan, Qwen-Image, CogVideoX) or a
    replicate-padded strided convolution (HunyuanVideo), strides in time band-local."""
    for frames, shape in zip(VIDEO_ENCODES[vae], [(1, 3, 0, 32, 16), (2, 3, 0, 40, 24)]):
        shape = (*shape[:2], frames, *shape[3:])
        r = pools(world).run(rank_tasks.video_vae_encode_parity, vae, shape, ulysses_degree=world)[0]
        assert r["calls"]["vae_halo"] > 0 and r["calls"]["vae_gather"] >= 1, (shape, r)
        if vae != "AutoencoderKLCogVideoX":  # its encoder has no attention
            assert r["calls"]["p2p"] > 0, (shape, r)


def test_wan_encode_halo_bytes_equal_theory(pools):
    """AutoencoderKLWan's encoder on 2 ranks: each causal 3x3x3 convolution sends one row of every
    frame of its input and of its cache to the one neighbour; each Resample's stride-2 convolution
    takes its bottom padding row from the next band, so rank 1 sends one row of its padded input
    and rank 0 none."""
    import diffusers

    from meshsp.pipelines import tiny_pipeline_path

    shape = (2, 3, 5, 40, 24)  # bands of 24 and 16 rows
    r = pools(2).run(rank_tasks.video_vae_encode_parity, "tiny-wan", shape, ulysses_degree=2)
    vae = diffusers.AutoencoderKLWan.from_pretrained(tiny_pipeline_path("tiny-wan") / "vae")
    sent = [0, 0]

    def conv_hook(mod, args):
        x, cache = args[0], args[1] if len(args) > 1 else None
        b, c, t, _, w = x.shape
        frames = t + (0 if cache is None else cache.shape[2])
        sent[0] += b * c * frames * w * 4
        sent[1] += b * c * frames * w * 4

    def down_hook(mod, args):
        n, c, _, w = args[0].shape
        sent[1] += n * c * w * 4

    for m in vae.encoder.modules():
        if isinstance(m, torch.nn.Conv3d) and m.kernel_size[-2] == 3:
            m.register_forward_pre_hook(conv_hook)
        elif isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2):
            m.register_forward_pre_hook(down_hook)
    with torch.no_grad():
        vae.encode(torch.zeros(shape))
    assert [r[rank]["bytes"]["vae_halo"] for rank in range(2)] == sent


def test_video_vae_encoders_split_or_are_refused(pools):
    import diffusers

    from meshsp.pipelines import tiny_pipeline_path
    from meshsp.vae import vae_plan

    wan = diffusers.AutoencoderKLWan.from_pretrained(tiny_pipeline_path("tiny-wan") / "vae")
    plan = vae_plan(wan)
    assert plan["encoder"] == "SplitBands" and plan.encoder_unit == 8
    assert plan["encoder.down_blocks.1.resample.1"] == "HaloDownConv" and "encoder" not in vae_plan(wan, encode=False)
    for vae_class in ("AutoencoderKLHunyuanVideo", "AutoencoderKLCogVideoX"):
        vae = getattr(diffusers, vae_class)(**rank_tasks.VIDEO_VAE_CONFIGS[vae_class])
        assert vae_plan(vae, encode=True).encoder_unit == 8, vae_class
    assert vae_plan(vae)["encoder.down_blocks.0.downsamplers.0.conv"] == "HaloDownConv"
    ltx = diffusers.AutoencoderKLLTXVideo(**rank_tasks.VIDEO_VAE_CONFIGS["AutoencoderKLLTXVideo"])
    assert "encoder" not in vae_plan(ltx) and "decoder" in vae_plan(ltx)
    with pytest.raises(ValueError, match="the encoder patchifies its input"):
        vae_plan(ltx, encode=True)
    msgs = pools(2).run(rank_tasks.raises, "vae_encode_bad_rows", (1, 3, 1, 36, 16))
    assert len(set(msgs)) == 1 and "36 rows, not a multiple of 8" in msgs[0], msgs
    msgs = pools(4).run(rank_tasks.raises, "vae_encode_bad_rows", (1, 3, 1, 24, 16))
    assert len(set(msgs)) == 1 and "24 rows, fewer than the 4 ranks" in msgs[0] and "encode=False" in msgs[0], msgs


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_tiled_decode_equals_single_process_tiled_decode(pools, world):
    """diffusers' tiles (4x4 latents, 1/4 overlap) decoded round-robin, blended by diffusers' code."""
    for shape in [(1, 4, 7, 9), (2, 4, 12, 10)]:
        r = pools(world).run(rank_tasks.vae_tiled_parity, shape, ulysses_degree=world)
        assert sum(x["calls"]["vae_tiles"] for x in r) == {(1, 4, 7, 9): 9, (2, 4, 12, 10): 16}[shape]
