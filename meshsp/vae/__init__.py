"""The VAE decode and encode split across every rank of the mesh, equal to the untiled
single-device ones.

The latent is cut into bands of rows (``balanced_sizes``: heights that differ by at most one), one
per rank of the whole mesh (cfg, ring, ulysses and tp alike: the decode runs once per request),
and every rank decodes its band. Styles on the decoder's modules keep that exact:

* ``SplitBands`` on the decoder: its input latent is cut into this rank's band; its output bands
  are all-gathered, so ``vae.decode(latents)`` takes and returns full tensors on every rank, as
  diffusers' pipelines call it;
* ``HaloConv`` on every convolution taller than one row: the rows its kernel reaches across a band
  edge come from the neighbouring ranks (one P2P exchange each way, in flight while the
  convolution runs over its band as it is, padded as it pads the image); the few output rows next
  to an inner band edge are then recomputed from those rows and the band's edge rows, unpadded in
  height, so the output is exactly this band's rows and the band is never copied to add a halo;
  ``HaloPadConv`` does the same for a wrapper that pads with ``F.pad`` before an unpadded
  convolution (HunyuanVideo's causal convolution: replicate padding, so the image's edge rows are
  copied instead of zeros);
* ``BandGroupNorm`` on every ``GroupNorm`` (CogVideoX's spatial norm included: its conditioning on
  the latent band is band-local): the per-group counts, sums and sums of squares (float64, from
  each band's mean and variance) are all-reduced, so every band is normalised with the whole
  image's statistics: in fp32 and fp64, nn.GroupNorm's own kernel normalises the band by its own
  and the output is corrected in place by one per-channel scale and shift;
* the mid-block's spatial attention runs as Ring attention over the bands' tokens (meshsp's
  ``ParallelAttention``; a band's tokens are a contiguous run of the row-major sequence);
  HunyuanVideo's attends over all frames with a frame-causal mask (``FrameCausalAttention``: a
  ring whose steps attend each query frame to the visiting band's frames up to it);
* upsampling (nearest x2, or depth-to-space) scales every band alike, so bands stay aligned;
* ``BandNoise`` on LTX-Video's noise-injecting blocks: each rank draws the whole frame's noise and
  keeps its band's rows.

That noise comes from the global generator, once for a whole batch; ``noise_per_request`` (for the
engine's batches) decodes a batch one request at a time, each after seeding the global generator
with the request's seed, so a request's video does not depend on its batch mates. Each slice is a
split decode of its own.

``parallelize_vae(vae, mesh)`` applies ``vae_plan(vae)``; ``parallelize_module(vae, mesh,
vae_plan(vae))`` does the same. Supported: ``AutoencoderKL`` (Flux, SD3), ``AutoencoderKLFlux2``,
and the video VAEs ``AutoencoderKLWan``, ``AutoencoderKLQwenImage``, ``AutoencoderKLHunyuanVideo``,
``AutoencoderKLLTXVideo`` and ``AutoencoderKLCogVideoX``. Those that decode a few frames at a time
with a cache of the previous frames per convolution (Wan, Qwen-Image, CogVideoX) keep the cache per
rank, of its own band, and a cached frame's halo rows come from the neighbours with the new
frame's; HunyuanVideo's temporal tiles are decoder calls of their own, each split. With diffusers'
tiling enabled (``AutoencoderKL``), its tiles are decoded round-robin across the ranks and blended
by diffusers' own code (``DistributedTiles``): equal to the single-device tiled decode.

The encode splits the same way, for the pipelines that encode images or video (image-to-image,
image-to-video): ``SplitBands`` on the encoder cuts the image into bands of whole units of its
total downsampling in height (8 rows for every VAE here), so that each band stays whole rows at
every resolution, and gathers the latent bands. ``HaloDownConv`` takes the stride-2 convolutions
behind a padding of one zero row at the bottom (diffusers' ``Downsample2D`` and
``CogVideoXDownsample3D``, Wan's and Qwen-Image's ``Resample``): under an inner band that row is the
next band's first row. A padding wrapper's strided convolution (HunyuanVideo's downsampling:
replicate padding, stride 2) runs through ``HaloPadConv`` with the one row above its band it reads.
Strides in time (Wan's ``time_conv``, CogVideoX's frame pooling) stay within a band. Every encoder
but LTX-Video's (it patchifies rows into channels) splits; ``parallelize_vae(vae, mesh,
encode=False)`` leaves it whole.
"""

from meshsp.vae.attention import FrameCausalAttention
from meshsp.vae.bands import Bands, SplitBands
from meshsp.vae.halo import HaloConv, HaloDownConv, HaloPadConv
from meshsp.vae.noise import GLOBAL_NOISE_DECODERS, BandNoise, draws_global_noise, noise_per_request
from meshsp.vae.norms import BandGroupNorm
from meshsp.vae.plan import VaePlan, parallelize_vae, vae_plan
from meshsp.vae.tiles import DistributedTiles

__all__ = ["GLOBAL_NOISE_DECODERS", "BandGroupNorm", "BandNoise", "Bands", "DistributedTiles", "FrameCausalAttention",
           "HaloConv", "HaloDownConv", "HaloPadConv", "SplitBands", "VaePlan", "draws_global_noise",
           "noise_per_request", "parallelize_vae", "vae_plan"]
