"""LTX-Video in a batch: the decoder's noise comes from the global generator, and each request of a
batch draws it from its own seed (``meshsp.vae.noise_per_request``), so a batched request's video is
the one it gets alone, on one process and split over 2 ranks."""

import diffusers
import numpy as np
import pytest
import rank_tasks
import torch

from meshsp import ParallelConfig
from meshsp.engine import Engine, SamplingParams
from meshsp.vae import draws_global_noise, noise_per_request

# 64x64 pixels -> 2x2 latents (32x spatial), 9 frames -> 2 latent frames; guidance runs CFG.
PROMPT_1, PROMPT_2 = "a cat", "a dog on a chair"


def _params(seed: int, images: int = 1) -> SamplingParams:
    return SamplingParams(num_inference_steps=2, width=64, height=64, num_frames=9, seed=seed, guidance_scale=3.0,
                          num_images_per_prompt=images)


def _tiny_vae() -> diffusers.AutoencoderKLLTXVideo:
    """LTX-Video 0.9.5's decoder shape (timestep-conditioned, noise injected in two blocks), its
    noise scales drawn non-zero so that the noise shows in the video."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLLTXVideo(**rank_tasks.VIDEO_VAE_CONFIGS["AutoencoderKLLTXVideo"])
    for name, param in vae.named_parameters():
        if "per_channel_scale" in name:
            param.data.normal_()
    return vae


def _build(path) -> None:
    from transformers import T5Config, T5EncoderModel

    from meshsp.pipelines import _t5_style_config, _t5_tokenizer

    tokenizer = _t5_tokenizer(128)
    t5 = dict(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8,
              relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    torch.manual_seed(0)
    transformer = diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=16)
    text_encoder = T5EncoderModel(_t5_style_config(T5Config, t5, tokenizer))
    diffusers.LTXPipeline(transformer=transformer, vae=_tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                          scheduler=diffusers.FlowMatchEulerDiscreteScheduler()).save_pretrained(path)


def _pixels(videos) -> np.ndarray:
    return np.stack([np.stack([np.asarray(frame) for frame in video]) for video in videos]).astype(int)


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """The tiny pipeline's directory, its one-process engine, and each request's videos generated
    alone by it."""
    path = tmp_path_factory.mktemp("ltx") / "pipe"
    _build(path)
    with Engine(str(path)) as engine:
        yield str(path), engine, [_pixels(engine.generate(PROMPT_1, _params(1))),
                                  _pixels(engine.generate(PROMPT_2, _params(2, images=2)))]


def _assert_alone(batched, alone_videos) -> None:
    for videos, want in zip(batched, alone_videos):
        got = _pixels(videos)
        assert got.shape == want.shape == (len(videos), 9, 64, 64, 3)
        # batch-shaped kernels (text encoder, transformer) may round a pixel to the next level
        assert np.abs(got - want).max() <= 1


def test_batched_requests_equal_each_alone(alone):
    _, engine, videos = alone
    requests = [(PROMPT_1, _params(1)), (PROMPT_2, _params(2, images=2))]
    for order in ((0, 1), (1, 0)):  # either request first: neither follows the other's seed
        batched = engine.generate_batch([requests[i] for i in order])
        _assert_alone([batched[order.index(i)] for i in (0, 1)], videos)


def test_batched_requests_split_over_two_ranks_equal_each_alone(alone):
    path, _, videos = alone
    with Engine(path, ParallelConfig(ulysses_degree=2)) as engine:
        assert engine.vae_ranks == 2  # each request's slice is a split decode of its own
        _assert_alone(engine.generate_batch([(PROMPT_1, _params(1)), (PROMPT_2, _params(2, images=2))]), videos)


def test_decode_draws_per_request_only_inside_the_block():
    vae = _tiny_vae()
    assert draws_global_noise(vae)
    config = dict(rank_tasks.VIDEO_VAE_CONFIGS["AutoencoderKLLTXVideo"], decoder_inject_noise=(False,) * 4)
    assert not draws_global_noise(diffusers.AutoencoderKLLTXVideo(**config))
    assert not draws_global_noise(diffusers.AutoencoderKLWan(base_dim=8, z_dim=4))
    z, temb = torch.randn(3, 4, 2, 2, 2, generator=torch.Generator().manual_seed(5)), torch.full((3,), 0.05)
    with torch.no_grad():
        torch.manual_seed(1)
        first = vae.decode(z[:1], temb[:1]).sample
        torch.manual_seed(2)
        second = vae.decode(z[1:], temb[1:]).sample
        torch.manual_seed(1)
        shared = vae.decode(z, temb).sample  # one draw for the whole batch, from the first seed
        assert (shared[1:] - second).abs().max() > 0.1  # the noise shows: the test can fail
        with noise_per_request(vae, [1, 2], [1, 2]):
            out = vae.decode(z, temb).sample
            with pytest.raises(ValueError, match="a batch of 2 latents"):
                vae.decode(z[:2], temb[:2])
        assert "decode" not in vars(vae)  # undone on exit
        with noise_per_request(vae, [1], [3]):  # a lone request: decode untouched
            assert "decode" not in vars(vae)
    torch.testing.assert_close(out, torch.cat([first, second]), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="one seed and a positive batch size per request"):
        with noise_per_request(vae, [1, 2], [1]):
            pass
