"""Loading a pipeline onto a rank, and timing its stages.

``load_pipeline`` places the weights as ``meshsp.engine`` asks (straight onto the rank's GPU on
CUDA, to CPU otherwise; ``load_kwargs`` says how), ``offload`` puts diffusers' group offloading on
every model but the transformers, ``weights_info`` reports where each model's weights are, and
``Stages`` times a pipeline call's text encoding and VAE decode with hooks.
"""

from __future__ import annotations

import os
import time

import torch

__all__ = ["Stages", "load_kwargs", "load_pipeline", "offload", "rank_device", "weights_info"]


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: str) -> torch.device:
    """This rank's device: on CUDA its local GPU (the current one outside a launcher), made current
    before loading, since diffusers' models read ``device_map="cuda"`` as the current GPU. Under a
    launcher, more ranks on the node (``LOCAL_WORLD_SIZE``) than GPUs raise ``ValueError``
    (``meshsp.mesh.check_gpus``): one GPU per rank."""
    if device == "cpu":
        return torch.device("cpu")
    if "LOCAL_RANK" in os.environ:
        from meshsp.mesh import check_gpus, local_world_size

        check_gpus(local_world_size(), "nccl")
        index = _local_rank()
    else:
        index = torch.cuda.current_device()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def load_kwargs(device: torch.device, *, cpu_offload: bool, local_rank: int) -> tuple[dict, dict]:
    """``from_pretrained`` keyword arguments that place the weights: (the transformers', the pipeline's).

    On CPU both are empty: everything loads to CPU, as diffusers does by default. On CUDA the
    transformers load straight onto ``device`` (a diffusers model takes any device as ``device_map``).
    The pipeline's ``device_map`` must be a string, ``"cuda"``, which diffusers' models read as the
    current GPU and transformers' as ``cuda:LOCAL_RANK``; it is passed only where both mean ``device``
    and the other models are to live there too (not with ``cpu_offload``, which keeps them on CPU).
    Elsewhere they load to CPU and ``_Runner`` moves the pipeline.

    Example::

        load_kwargs(torch.device("cuda", 1), cpu_offload=False, local_rank=1)
        # ({"device_map": device(type="cuda", index=1)}, {"device_map": "cuda"})
    """
    if device.type == "cpu":
        return {}, {}
    whole = not cpu_offload and device.index == local_rank
    return {"device_map": device}, ({"device_map": "cuda"} if whole else {})


def load_pipeline(path: str, dtype: torch.dtype, kwargs: tuple[dict, dict], skip: dict):
    """``DiffusionPipeline.from_pretrained`` placed by ``kwargs`` (``load_kwargs``): the transformers
    first with theirs (where given), handed to the pipeline, which loads the rest with its own."""
    from diffusers import DiffusionPipeline

    model_kwargs, pipe_kwargs = kwargs
    components = dict(skip)
    if model_kwargs:
        components.update(_load_transformers(path, dtype, model_kwargs))
    return DiffusionPipeline.from_pretrained(path, dtype=dtype, **pipe_kwargs, **components)


def _load_transformers(path: str, dtype: torch.dtype, kwargs: dict) -> dict:
    """The pipeline's diffusers transformers (``transformer``, Wan 2.2's ``transformer_2``) by name."""
    import diffusers

    index = diffusers.DiffusionPipeline.load_config(path)
    names = {name: entry[1] for name, entry in index.items() if name.startswith("transformer")
             and isinstance(entry, (list, tuple)) and entry[0] == "diffusers"}
    return {name: getattr(diffusers, cls).from_pretrained(path, subfolder=name, dtype=dtype, **kwargs)
            for name, cls in names.items()}


def offload(pipe, device: torch.device) -> None:
    """Diffusers' group offloading for every model but the transformers (text encoders, VAE): kept in
    CPU memory, each layer moved to ``device`` for its forward and dropped after it. Leaf level, since
    a pipeline calls ``vae.decode``, not ``forward``, and only the layers' own hooks see that; on CUDA
    the next layer's copy runs on a side stream during the current layer (pinned CPU copies)."""
    keep = [name for name in pipe.components if name.startswith("transformer")]
    pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type="leaf_level",
                              use_stream=device.type == "cuda", exclude_modules=keep)


def weights_info(pipe) -> dict:
    """Per model: bytes of its parameters and buffers, the device(s) they are kept on between calls,
    and whether diffusers' offloading hooks move them (``offloaded``)."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    out = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            # This rank's share of tensor-parallel weights (a DTensor's local shard).
            tensors = [t.to_local() if hasattr(t, "to_local") else t for t in [*module.parameters(), *module.buffers()]]
            out[name] = {"bytes": sum(t.numel() * t.element_size() for t in tensors),
                         "device": ",".join(sorted({str(t.device) for t in tensors})),
                         "offloaded": _is_group_offload_enabled(module)}
    return out


class Stages:
    """Seconds a pipeline call spends encoding text and decoding with the VAE, from hooks on the
    text encoders' and the VAE decoder's forward (each call's duration summed; on CUDA the device is
    synchronised at each edge); ``denoising`` is the rest of the call: the transformer's steps, the
    scheduler and latent preparation."""

    def __init__(self, pipe, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.totals = {"text_encoding": 0.0, "decode": 0.0}
        self._started: dict[int, float] = {}
        for name, module in pipe.components.items():
            stage = "text_encoding" if name.startswith("text_encoder") else "decode" if name == "vae" else None
            if stage == "decode":
                module = getattr(module, "decoder", None)
            if stage is None or not isinstance(module, torch.nn.Module):
                continue
            module.register_forward_pre_hook(self._start)
            module.register_forward_hook(lambda mod, args, out, stage=stage: self._stop(mod, stage))

    def _start(self, module, args) -> None:
        self.sync()
        self._started[id(module)] = time.perf_counter()

    def _stop(self, module, stage: str) -> None:
        self.sync()
        self.totals[stage] += time.perf_counter() - self._started.pop(id(module))

    def reset(self) -> None:
        self.totals = dict.fromkeys(self.totals, 0.0)

    def seconds(self, total: float) -> dict[str, float]:
        return {**self.totals, "denoising": max(0.0, total - sum(self.totals.values()))}
