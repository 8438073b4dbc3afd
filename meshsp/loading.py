"""Loading a pipeline onto a rank, and timing its stages.

``load_pipeline`` places the weights as ``meshsp.engine`` asks (straight onto the rank's GPU on
CUDA, to CPU otherwise; ``load_kwargs`` says how); with tensor parallelism its transformers are read
sharded (``load_sharded_transformer``: each rank materialises only its part of every sharded weight,
read straight from the safetensors files). ``offload`` puts diffusers' group offloading on every
model but the transformers, ``weights_info`` reports where each model's weights are, and ``Stages``
times a pipeline call's text encoding and VAE decode with hooks.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from meshsp.config import ParallelConfig

__all__ = ["Stages", "load_kwargs", "load_pipeline", "load_sharded_transformer", "load_sharded_transformers", "offload",
           "rank_device", "weights_info"]

logger = logging.getLogger(__name__)


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


def load_pipeline(path: str, dtype: torch.dtype, kwargs: tuple[dict, dict], skip: dict,
                  config: ParallelConfig | None = None):
    """The pipeline class's ``from_pretrained`` placed by ``kwargs`` (``load_kwargs``): the transformers
    first with theirs (where given), handed to the pipeline, which loads the rest with its own. With
    ``config.tensor_parallel_size`` > 1 the transformers are read sharded for the config's tp axis
    (``load_sharded_transformers``), so no rank holds a whole one."""
    model_kwargs, pipe_kwargs = kwargs
    models = {}
    if config is not None and config.tensor_parallel_size > 1:
        models = load_sharded_transformers(path, config, dtype=dtype, device=model_kwargs.get("device_map"))
    elif model_kwargs:
        models = _load_transformers(path, dtype, model_kwargs)
    pipe = _pipeline_class(path).from_pretrained(path, dtype=dtype, **pipe_kwargs, **skip, **models)
    assert all(getattr(pipe, name) is model for name, model in models.items()), "a transformer was loaded again"
    return pipe


def _pipeline_class(path: str):
    """The pipeline's own class: ``DiffusionPipeline.from_pretrained`` would load a transformer the
    class lists as optional (Wan's) again instead of taking the one passed."""
    import diffusers

    cls = getattr(diffusers, str(diffusers.DiffusionPipeline.load_config(path).get("_class_name")), None)
    return cls if isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline) else diffusers.DiffusionPipeline


def _transformer_names(path: str) -> dict[str, str]:
    """The pipeline's diffusers transformers (``transformer``, Wan 2.2's ``transformer_2``): name -> class."""
    import diffusers

    index = diffusers.DiffusionPipeline.load_config(path)
    return {name: entry[1] for name, entry in index.items() if name.startswith("transformer")
            and isinstance(entry, (list, tuple)) and entry[0] == "diffusers"}


def _load_transformers(path: str, dtype: torch.dtype, kwargs: dict) -> dict:
    import diffusers

    return {name: getattr(diffusers, cls).from_pretrained(path, subfolder=name, dtype=dtype, **kwargs)
            for name, cls in _transformer_names(path).items()}


def load_sharded_transformers(path: str, config: ParallelConfig, *, dtype: torch.dtype | None = None,
                              device: torch.device | None = None) -> dict[str, nn.Module]:
    """Every transformer of the pipeline at ``path`` read sharded (``load_sharded_transformer``) for
    the tp axis of ``config``'s mesh (``meshsp.init_sp_mesh``, which starts the process group if
    there is none); name -> model, to hand to the pipeline class's ``from_pretrained`` (the class's
    own: ``DiffusionPipeline.from_pretrained`` loads a transformer the class lists as optional, as
    Wan's, again). A Hub id is downloaded first, as ``from_pretrained`` does.

    Example::

        config = ParallelConfig(tensor_parallel_size=4)
        pipe = QwenImagePipeline.from_pretrained(path, dtype=torch.bfloat16,
                                                 **load_sharded_transformers(path, config, dtype=torch.bfloat16))
        meshsp.parallelize_pipeline(pipe, config)
    """
    from diffusers import DiffusionPipeline

    from meshsp.mesh import init_sp_mesh

    if config.tensor_parallel_size == 1:
        raise ValueError("load_sharded_transformers is for tensor_parallel_size > 1; with 1, load the pipeline with "
                         "DiffusionPipeline.from_pretrained.")
    local = path if os.path.isdir(path) else DiffusionPipeline.download(path)
    tp_mesh = init_sp_mesh(config)["tp"]
    return {name: load_sharded_transformer(local, name, tp_mesh, dtype=dtype, device=device)
            for name in _transformer_names(local)}


def load_sharded_transformer(path: str, subfolder: str, tp_mesh: DeviceMesh, *, dtype: torch.dtype | None = None,
                             device: torch.device | None = None, plan=None) -> nn.Module:
    """A diffusers transformer of which this rank materialises only its tensor-parallel part.

    The model is built on ``meta``; every parameter its plan's ``tp`` section shards (``plan``, by
    default ``meshsp.get_plan``'s) is read as this rank's slices of the safetensors files
    (``TPSlice``: packed projections block by block) and becomes a DTensor on ``tp_mesh``; the rest
    is read whole. Dtypes follow ``from_pretrained``: floating tensors cast to ``dtype``, the
    class's ``_keep_in_fp32_modules`` kept in float32, the model built under ``dtype`` (its buffers
    made in ``__init__``). The weights equal ``from_pretrained`` and then the plan's slicing, bit
    for bit. ``tp_mesh`` must be the ``"tp"`` axis of the mesh the pipeline is then parallelized on,
    whose plan then checks these parameters instead of slicing them.

    Raises ``ValueError`` for a checkpoint without safetensors files, a quantized one, or one whose
    tensors do not match the config.

    Example::

        mesh = meshsp.init_sp_mesh(ParallelConfig(tensor_parallel_size=4))
        transformer = load_sharded_transformer(path, "transformer", mesh["tp"], dtype=torch.bfloat16)
        pipe = QwenImagePipeline.from_pretrained(path, transformer=transformer, dtype=torch.bfloat16)
        meshsp.parallelize_pipeline(pipe, mesh)
    """
    from meshsp.plans import get_plan

    folder = os.path.join(path, subfolder)
    files = _safetensors_files(folder)
    model = _empty_model(folder, dtype)
    plan = plan if plan is not None else get_plan(model)
    plan._check_tp(model, tp_mesh.size())
    _read_weights(model, files, _plan_slices(plan, model), dtype, tp_mesh, torch.device(device or "cpu"))
    model.register_to_config(_name_or_path=folder)
    return model.eval()


def _safetensors_files(folder: str) -> list[str]:
    """The model's safetensors files: those of its index (a sharded checkpoint), or its one file."""
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME

    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(folder, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    single = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if os.path.isfile(single):
        return [single]
    found = sorted(os.listdir(folder)) if os.path.isdir(folder) else "no such folder"
    raise ValueError(f"tensor-parallel loading reads each rank's slices from safetensors files, but {folder} has no "
                     f"{SAFETENSORS_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} (found: {found}). Save the model with "
                     "save_pretrained (safetensors by default), or run with tensor_parallel_size=1.")


def _empty_model(folder: str, dtype: torch.dtype | None) -> nn.Module:
    """The model of ``folder``'s config with its parameters on ``meta`` (buffers made on CPU), built
    under ``dtype`` as ``from_pretrained`` builds it."""
    import diffusers
    from accelerate import init_empty_weights
    from diffusers.models.modeling_utils import no_init_weights

    with open(os.path.join(folder, "config.json")) as f:
        name = json.load(f).get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(f"{folder}/config.json names class {name!r}, which is not a diffusers model; tensor-parallel "
                         "loading takes a diffusers transformer saved with save_pretrained.")
    config = cls.load_config(folder)
    if config.get("quantization_config"):
        raise ValueError(f"{folder} holds a quantized checkpoint, which tensor-parallel loading cannot slice; use "
                         "unquantized weights, or tensor_parallel_size=1.")
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), init_empty_weights():
            return cls.from_config(config)
    finally:
        torch.set_default_dtype(previous)


def _plan_slices(plan, model: nn.Module) -> dict:
    """``{parameter name: TPSlice}`` of every parameter the plan's tp section shards."""
    from meshsp.tp import param_slices

    out: dict = {}
    for path, style in plan.tp.items():
        for name in plan.matches(model, path):
            for pname, part in param_slices(style, model.get_submodule(name)).items():
                key = f"{name}.{pname}" if name else pname
                if out.setdefault(key, part) != part:
                    raise ValueError(f"plan tp entries shard {key} two ways ({out[key]} and {part}); give each "
                                     "module one tp entry.")
    return out


def _read_weights(model: nn.Module, files: list[str], slices: dict, dtype: torch.dtype | None, tp_mesh: DeviceMesh,
                  device: torch.device) -> None:
    """Fill the meta model from ``files``: its part of each sharded parameter, the rest whole."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    from meshsp.tp import set_shard

    expected = model.state_dict()
    keep = list(model._keep_in_fp32_modules or [])
    seen, unexpected = set(), []
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in expected:
                    unexpected.append(key)
                    continue
                stored = f.get_slice(key)
                if tuple(stored.get_shape()) != tuple(expected[key].shape):
                    raise ValueError(f"{file}: {key} has shape {tuple(stored.get_shape())}, but "
                                     f"{type(model).__name__} expects {tuple(expected[key].shape)}; the checkpoint "
                                     "does not match its config.")
                part = slices.get(key)
                value = stored[...] if part is None else part.take(stored, tp_mesh)
                target = _load_dtype(key, value, dtype, keep)
                if part is None:  # as diffusers' load_model_dict_into_meta sets it
                    value = value if target is None else value.to(target)
                    set_module_tensor_to_device(model, key, device, value=value,
                                                **({} if target is None else {"dtype": target}))
                else:
                    module, _, name = key.rpartition(".")
                    local = value.to(target or expected[key].dtype).to(device)
                    set_shard(model.get_submodule(module), name, local, part, tp_mesh, loaded=True)
                seen.add(key)
    _check_keys(model, expected, seen, unexpected)
    for name, buffer in list(model.named_buffers()):  # made in __init__, not stored (RoPE tables)
        if buffer.device != device:
            set_module_tensor_to_device(model, name, device)


def _load_dtype(key: str, value: torch.Tensor, dtype: torch.dtype | None, keep: list[str]) -> torch.dtype | None:
    """What ``from_pretrained`` casts a stored tensor to: None (the model's own dtype) unless a
    floating tensor is loaded at ``dtype``, float32 in ``_keep_in_fp32_modules``."""
    if dtype is None or not value.is_floating_point():
        return None
    return torch.float32 if any(k in key.split(".") for k in keep) else dtype


def _check_keys(model: nn.Module, expected: dict, seen: set, unexpected: list) -> None:
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"the checkpoint of {type(model).__name__} lacks {len(missing)} of its tensors "
                         f"({missing[:4]}{' ...' if len(missing) > 4 else ''}); it does not match its config.")
    for pattern in type(model)._keys_to_ignore_on_load_unexpected or []:
        unexpected = [k for k in unexpected if re.search(pattern, k) is None]
    if unexpected:
        logger.warning("the checkpoint of %s has tensors it does not use: %s", type(model).__name__, unexpected[:8])


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
