"""Per pipeline family: text encoding, image latents and the transformer call, as the pipeline does them.

An adapter turns a batch of captions and images into what the pipeline's denoising loop feeds its
transformer, and calls the transformer with the same keyword arguments that loop uses:

* text: the pipeline's own ``encode_prompt`` (no gradient: the text encoders stay frozen);
* latents: the pipeline's VAE (frozen), a sample of its latent distribution drawn from the sample's
  own generator, normalised as the pipeline's decode expects (Qwen-Image and Wan: per-channel mean
  and std; Flux: shift and scaling factor), then laid out as the transformer takes them
  (Qwen-Image and Flux pack 2x2 patches into ``[B, tokens, 4C]``; Wan is a video VAE, one frame:
  ``[B, C, 1, h, w]``);
* the call: ``img_shapes`` for Qwen-Image, ``img_ids`` / ``txt_ids`` / pooled embeddings and the
  default guidance for Flux; Qwen-Image and Flux take ``t / 1000``, Wan ``t`` itself.

``tests/test_train.py`` checks each against its pipeline: the prediction an adapter makes equals
the one the pipeline's own call computes at its first step.

Example::

    adapter = adapter_for(pipe, resolution=64)
    text = adapter.encode_text(["a red circle on a white background"])
    x0 = adapter.encode_images(images, generators)
    prediction = adapter.predict(pipe.transformer, x_t, timesteps, text)
"""

from __future__ import annotations

import abc
import hashlib

import torch

__all__ = ["FluxAdapter", "PipelineAdapter", "QwenImageAdapter", "WanAdapter", "adapter_for", "check_pipeline_class"]


_MAX_CACHED_IMAGES = 65536  # latent distributions kept (a few KB each at the sizes trained on CPU)

class PipelineAdapter(abc.ABC):
    """The shared part: one VAE sample per image, each from its own generator; a family says how
    to encode text, lay out latents and call its transformer."""

    family = ""

    def __init__(self, pipe, resolution: int) -> None:
        self.pipe = pipe
        self.resolution = resolution
        self._posteriors: dict[str, object] = {}
        scale = getattr(pipe, "vae_scale_factor_spatial", None) or pipe.vae_scale_factor
        self.latent_size = 2 * (resolution // (scale * 2))  # as the pipeline's prepare_latents rounds it

    def call_kwargs(self) -> dict:
        """What ``pipe(...)`` needs besides the prompt to run the loop this adapter mirrors."""
        return {"height": self.resolution, "width": self.resolution}

    @abc.abstractmethod
    def encode_text(self, captions: list[str]) -> dict:
        """The transformer's text keyword arguments for ``captions`` (no gradient)."""

    def _posterior(self, image: torch.Tensor):
        """The frozen VAE's latent distribution of one image, encoded once per distinct image: a
        dataset's pictures come back every epoch, and encoding is most of a tiny model's step."""
        key = hashlib.sha1(image.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        hit = self._posteriors.get(key)
        if hit is None:
            if len(self._posteriors) >= _MAX_CACHED_IMAGES:
                self._posteriors.clear()
            with torch.no_grad():
                hit = self._posteriors[key] = self.pipe.vae.encode(image[None]).latent_dist
        return hit

    def _raw_latents(self, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        vae = self.pipe.vae
        images = images.to(device=vae.device, dtype=vae.dtype)
        with torch.no_grad():  # one sample per image from its own generator, as the pipelines encode
            return torch.cat([self._posterior(images[i]).sample(generator=g) for i, g in enumerate(generators)])

    @abc.abstractmethod
    def encode_images(self, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Images ``[B, 3, S, S]`` in ``[-1, 1]`` -> normalised latents as the transformer takes them."""

    @abc.abstractmethod
    def predict(self, transformer, x_t: torch.Tensor, timesteps: torch.Tensor, text: dict) -> torch.Tensor:
        """The transformer's prediction for ``x_t`` at ``timesteps`` (the scheduler's ``[0, 1000]``)."""


def _mean_std(vae, dims: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim) + (1,) * (dims - 2)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, std


class QwenImageAdapter(PipelineAdapter):
    """``QwenImagePipeline``: Qwen2.5-VL prompt embeddings with their mask, a Wan-style VAE (one
    frame), 2x2 packing, ``img_shapes``."""

    family = "qwen-image"

    def call_kwargs(self) -> dict:
        return {**super().call_kwargs(), "true_cfg_scale": 1.0}

    def encode_text(self, captions: list[str]) -> dict:
        with torch.no_grad():
            embeds, mask = self.pipe.encode_prompt(captions, device=self.pipe.device, max_sequence_length=512)
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    def encode_images(self, images, generators):
        z = self._raw_latents(images[:, :, None], generators)  # [B, C, 1, h, w]
        mean, std = _mean_std(self.pipe.vae, 5, z)
        z = ((z - mean) * (1.0 / std))[:, :, 0]
        b, c, h, w = z.shape
        return self.pipe._pack_latents(z, b, c, h, w)

    def predict(self, transformer, x_t, timesteps, text):
        n = self.latent_size // 2
        img_shapes = [[(1, n, n)]] * x_t.shape[0]
        guidance = None  # Qwen-Image is not guidance-distilled (the pipeline passes None)
        return transformer(hidden_states=x_t, timestep=timesteps.to(x_t.dtype) / 1000, guidance=guidance,
                           img_shapes=img_shapes, return_dict=False, **text)[0]


class FluxAdapter(PipelineAdapter):
    """``FluxPipeline``: CLIP pooled + T5 embeddings with ``txt_ids``, a 2-D VAE (shift and scale),
    2x2 packing with ``img_ids``, the pipeline's default guidance of 3.5 when guidance-distilled."""

    family = "flux"
    guidance_scale = 3.5  # FluxPipeline.__call__'s default

    def call_kwargs(self) -> dict:
        return {**super().call_kwargs(), "guidance_scale": self.guidance_scale}

    def encode_text(self, captions):
        with torch.no_grad():
            embeds, pooled, text_ids = self.pipe.encode_prompt(captions, prompt_2=None, device=self.pipe.device,
                                                               max_sequence_length=512)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}

    def encode_images(self, images, generators):
        z = self._raw_latents(images, generators)
        config = self.pipe.vae.config
        z = (z - config.shift_factor) * config.scaling_factor
        b, c, h, w = z.shape
        return self.pipe._pack_latents(z, b, c, h, w)

    def predict(self, transformer, x_t, timesteps, text):
        n = self.latent_size // 2
        img_ids = self.pipe._prepare_latent_image_ids(x_t.shape[0], n, n, x_t.device, x_t.dtype)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full([1], self.guidance_scale, device=x_t.device, dtype=torch.float32).expand(x_t.shape[0])
        return transformer(hidden_states=x_t, timestep=timesteps.to(x_t.dtype) / 1000, guidance=guidance,
                           img_ids=img_ids, return_dict=False, **text)[0]


class WanAdapter(PipelineAdapter):
    """``WanPipeline``: UMT5 embeddings, the video VAE on one frame (per-channel mean and std),
    latents as ``[B, C, 1, h, w]``, the timestep in the scheduler's units."""

    family = "wan"

    def call_kwargs(self) -> dict:
        return {**super().call_kwargs(), "num_frames": 1, "guidance_scale": 1.0}

    def encode_text(self, captions):
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=512,
                                                device=self.pipe.device)
        return {"encoder_hidden_states": embeds}

    def encode_images(self, images, generators):
        z = self._raw_latents(images[:, :, None], generators)
        mean, std = _mean_std(self.pipe.vae, 5, z)
        return (z - mean) * (1.0 / std)

    def predict(self, transformer, x_t, timesteps, text):
        return transformer(hidden_states=x_t, timestep=timesteps.to(torch.float32), return_dict=False, **text)[0]


_ADAPTERS = {"QwenImagePipeline": QwenImageAdapter, "FluxPipeline": FluxAdapter, "WanPipeline": WanAdapter}


def adapter_for(pipe, resolution: int) -> PipelineAdapter:
    """The adapter of ``pipe``'s class; ``ValueError`` naming the supported ones otherwise.

    Example::

        adapter_for(pipe, 64).family   # "qwen-image"
    """
    for cls in type(pipe).__mro__:
        if cls.__name__ in _ADAPTERS:
            return _ADAPTERS[cls.__name__](pipe, resolution)
    raise ValueError(f"training does not know {type(pipe).__name__} yet; supported pipelines: {sorted(_ADAPTERS)}.")


def check_pipeline_class(model: str) -> None:
    """For a pipeline directory, refuse a class without an adapter by its ``model_index.json``
    (before any rank loads it); tiny names and hub ids pass (a hub id is checked once loaded)."""
    import json
    from pathlib import Path

    index = Path(model) / "model_index.json"
    if not index.is_file():
        return
    name = json.loads(index.read_text()).get("_class_name")
    if name not in _ADAPTERS:
        raise ValueError(f"training does not know {name} ({model}) yet; supported pipelines: {sorted(_ADAPTERS)}.")
