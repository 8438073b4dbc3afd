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
        r = pools(world).run(rank_tasks.vae_decode_parity, pipeline, shape, **degrees)[0]
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


def test_plan_through_torch_and_refusals(pools):
    assert pools(2).run(rank_tasks.vae_entry_points) == ["ok"] * 2
    msgs = pools(4).run(rank_tasks.raises, "vae_too_few_rows")
    assert len(set(msgs)) == 1 and "the latent has 3 rows, fewer than the 4 ranks" in msgs[0], msgs


@pytest.mark.parametrize("world", [2, 4])
def test_split_encode_equals_whole_encode(pools, world):
    """AutoencoderKL's encoder: bands of 8-row units (its three stride-2 downsamplings); 56 rows =
    7 units over 2 or 4 ranks. The video VAEs' temporally strided encoders stay whole."""
    for shape in [(1, 3, 64, 64), (2, 3, 56, 72)]:
        r = pools(world).run(rank_tasks.vae_encode_parity, shape, ulysses_degree=world)[0]
        assert r["calls"]["vae_halo"] > 0, r


def test_video_vae_encoders_are_left_whole_or_refused():
    import diffusers

    from meshsp.pipelines import tiny_pipeline_path
    from meshsp.vae import vae_plan

    wan = diffusers.AutoencoderKLWan.from_pretrained(tiny_pipeline_path("tiny-wan") / "vae")
    assert "encoder" not in vae_plan(wan) and "decoder" in vae_plan(wan)
    with pytest.raises(ValueError, match="encoder.down_blocks.1.resample.1 is a strided Conv2d"):
        vae_plan(wan, encode=True)
    refusals = {"AutoencoderKLHunyuanVideo": "encoder.down_blocks.0.downsamplers.0.conv.conv is a strided Conv3d",
                "AutoencoderKLLTXVideo": "the encoder patchifies its input",
                "AutoencoderKLCogVideoX": "encoder.down_blocks.0.downsamplers.0.conv is a strided Conv2d"}
    for vae_class, refusal in refusals.items():
        vae = getattr(diffusers, vae_class)(**rank_tasks.VIDEO_VAE_CONFIGS[vae_class])
        assert "encoder" not in vae_plan(vae) and "decoder" in vae_plan(vae), vae_class
        with pytest.raises(ValueError, match=refusal):
            vae_plan(vae, encode=True)


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_tiled_decode_equals_single_process_tiled_decode(pools, world):
    """diffusers' tiles (4x4 latents, 1/4 overlap) decoded round-robin, blended by diffusers' code."""
    for shape in [(1, 4, 7, 9), (2, 4, 12, 10)]:
        r = pools(world).run(rank_tasks.vae_tiled_parity, shape, ulysses_degree=world)
        assert sum(x["calls"]["vae_tiles"] for x in r) == {(1, 4, 7, 9): 9, (2, 4, 12, 10): 16}[shape]
