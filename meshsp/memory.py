"""Per-rank GPU memory of a layout, before launch: weights, activations, text encoder, VAE decode.

Everything is counted on the ``meta`` device from the real-size configs — no weights, no GPU:

* **weights**: the real-size transformer built on ``meta`` and parallelized with its plan for the
  layout in a world of fake ranks (torch's fake process-group backend), then its parameters and
  buffers on this rank counted at the dtype (``_keep_in_fp32_modules`` at 4 bytes);
* **activations** of one denoising step: the peak of live tensor bytes while the real-size
  transformer runs on ``meta`` over this rank's share of the tokens (``LiveBytes`` follows every
  tensor an op creates until it is freed), plus what sequence-parallel attention holds beyond the
  local q, k, v: Ulysses' received head chunks of the whole sequence (3 x S x d / U elements,
  halved when the exchange is pipelined), Ring's K/V block in flight and its fp32 accumulator;
* **text encoder**: its weights (real-size config on ``meta``; with tensor parallelism sharded by its
  transformers tp plan where it has one, as the engine does); its activations for a few hundred
  tokens are small next to them and are left out;
* **VAE decode**: the VAE's weights plus the peak of live bytes of ``vae.decode`` at the
  resolution on ``meta``: the whole latent, or this rank's band of it when the decode is split
  across the ranks (``meshsp.vae``), plus the gathered output.

The peak of live bytes is what an ideal allocator needs; CUDA's caching allocator and kernel
workspaces add to it (``OVERHEAD``). ``meshsp bench models --real-width`` measures real peaks on CPU
to check the activation part.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import math
import weakref
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["FAMILIES", "LiveBytes", "MemoryModel", "estimate", "parallel_weight_bytes"]

GIB = 1024**3
OVERHEAD = 1.10  # allocator fragmentation and kernel workspaces on top of live bytes (assumption)


@dataclass(frozen=True)
class MemoryModel:
    """Real-size parts of a pipeline: diffusers classes (default configs are the released ones
    unless overridden) and transformers text encoders (class, config class, config kwargs)."""

    transformer: str
    vae: str
    vae_config: dict = field(default_factory=dict)
    text_encoders: tuple = ()
    video: bool = False
    vae_scale: int = 8
    patch: int = 2
    text_tokens: int = 256
    joint_text: bool = True  # the text joins the sharded sequence (else it stays whole: cross-attention)


_QWEN25_VL_7B = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", dict(
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, out_hidden_size=3584)))
_T5_XXL = ("T5EncoderModel", "T5Config", dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
                                              vocab_size=32128, feed_forward_proj="gated-gelu"))
_UMT5_XXL = ("UMT5EncoderModel", "UMT5Config", dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
                                                    vocab_size=256384, feed_forward_proj="gated-gelu"))
_CLIP_L = ("CLIPTextModel", "CLIPTextConfig", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                   num_attention_heads=12, vocab_size=49408))

FAMILIES = {
    "qwen-image": MemoryModel("QwenImageTransformer2DModel", "AutoencoderKLQwenImage", text_encoders=(_QWEN25_VL_7B,)),
    "flux": MemoryModel("FluxTransformer2DModel", "AutoencoderKL", dict(
        latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text_encoders=(_T5_XXL, _CLIP_L), text_tokens=512),
    "wan": MemoryModel("WanTransformer3DModel", "AutoencoderKLWan", text_encoders=(_UMT5_XXL,), video=True,
                       text_tokens=512, joint_text=False),
}


class LiveBytes(TorchDispatchMode):
    """The peak of bytes held by tensors created inside the block (views share their base's count).

    ``materialised``: only storages that hold memory count (not ``meta`` ones), and an in-place op's
    output not at all (it is an input, counted when it was made, or made before the block) — what a
    load reads from a checkpoint (a slice counts the whole tensor it maps while it is alive).

    Example::

        with torch.device("meta"), LiveBytes() as live:
            model(**inputs)
        live.peak
    """

    def __init__(self, *, materialised: bool = False) -> None:
        super().__init__()
        self.materialised = materialised
        self.live = self.peak = 0
        self._refs: dict[int, int] = {}  # storage -> tensors alive that use it (a view shares its base's)
        self._seen: set[int] = set()  # ids of the tensors counted and still alive

    def _release(self, tensor_id: int, storage: int, nbytes: int) -> None:
        self._seen.discard(tensor_id)
        self._refs[storage] -= 1
        if not self._refs[storage]:
            del self._refs[storage]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            t = getattr(t, "_local_tensor", t)  # a DTensor (tensor parallel): this rank's shard
            if not isinstance(t, torch.Tensor) or id(t) in self._seen:
                continue
            if self.materialised and (t.device.type == "meta" or any(a is t for a in tree_leaves((args, kwargs)))):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage._cdata, storage.nbytes()
            if key not in self._refs:
                self._refs[key] = 0
                self.live += nbytes
            self._refs[key] += 1
            self._seen.add(id(t))
            weakref.finalize(t, self._release, id(t), key, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def _bytes_of(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Parameters and buffers at ``dtype``, modules diffusers keeps in float32 at 4 bytes."""
    keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    size = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        local = t.to_local() if hasattr(t, "to_local") else t
        fp32 = any(k in name.split(".") for k in keep) or not t.is_floating_point()
        total += local.numel() * (local.element_size() if not t.is_floating_point() else 4 if fp32 else size)
    return total


def _diffusers(name: str, config: dict | None = None, dtype: torch.dtype | None = None) -> torch.nn.Module:
    with torch.device("meta"):
        model = getattr(importlib.import_module("diffusers"), name)(**(config or {}))
    if dtype is not None:  # parameter by parameter: diffusers' .to() warns about fp32-kept modules
        for t in itertools.chain(model.parameters(), model.buffers()):
            if t.is_floating_point():
                t.data = t.data.to(dtype)
    return model


class _FlashAttention(TorchFunctionMode):
    """SDPA as a fused kernel allocates it on a GPU: the output (and a float32 lse), no score matrix.

    On ``meta`` the unfused math path would otherwise materialize every [S, S] score matrix."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q = args[0] if args else kwargs["query"]
        v = args[2] if len(args) > 2 else kwargs["value"]
        torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)  # lse, freed with the call
        return torch.empty(*q.shape[:-1], v.shape[-1], device=q.device, dtype=q.dtype)


def _text_encoder_bytes(spec: MemoryModel, dtype: torch.dtype, tp: int = 1) -> int:
    """The text encoders' weights on one rank; with ``tp`` > 1 those with a transformers tp plan
    are sharded as the engine shards them (``meshsp.text_encoding.parallelize_text_encoder``)."""
    import transformers

    from meshsp.config import ParallelConfig
    from meshsp.mesh import init_sp_mesh
    from meshsp.text_encoding import parallelize_text_encoder

    total = 0
    for cls, config_cls, kwargs in spec.text_encoders:
        config = getattr(transformers, config_cls)(**kwargs)
        with torch.device("meta"):
            encoder = getattr(transformers, cls)(config)
        if tp > 1:
            with _fake_world(tp):
                parallelize_text_encoder(encoder, init_sp_mesh(ParallelConfig(tensor_parallel_size=tp),
                                                               device_type="cpu")["tp"])
        total += _bytes_of(encoder, dtype)
    return total


@contextlib.contextmanager
def _fake_world(size: int):
    """A process group of ``size`` fake ranks in this process (no data moves): for ``meta`` dry runs."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)
    try:
        yield
    finally:
        if owned:
            dist.destroy_process_group()


def parallel_weight_bytes(model: torch.nn.Module, dtype: torch.dtype, ring: int = 1, ulysses: int = 1,
                          tp: int = 1) -> int:
    """This rank's parameter and buffer bytes of ``model`` once its plan is applied for the layout
    (in a world of fake ranks when no process group is running; ``model`` may be on ``meta``).

    Example::

        parallel_weight_bytes(meta_transformer, torch.bfloat16, ulysses=2, tp=2)
    """
    from meshsp.config import ParallelConfig
    from meshsp.mesh import init_sp_mesh
    from meshsp.plans import get_plan

    if ring * ulysses * tp > 1:
        with _fake_world(ring * ulysses * tp):
            mesh = init_sp_mesh(ParallelConfig(ring_degree=ring, ulysses_degree=ulysses, tensor_parallel_size=tp),
                                device_type="cpu")
            get_plan(model, ulysses_mode="advanced_uaa")._apply(model, mesh)
    return _bytes_of(model, dtype)


def _weights(spec: MemoryModel, dtype: torch.dtype, ring: int, ulysses: int, tp: int = 1) -> int:
    """This rank's transformer weights after its plan is applied for the layout (fake ranks)."""
    return parallel_weight_bytes(_diffusers(spec.transformer), dtype, ring, ulysses, tp)


def _family_of(spec: MemoryModel) -> str:
    return next(f for f, fam in importlib.import_module("meshsp.tiny").FAMILIES.items() if fam.cls == spec.transformer)


def _step_activations(spec: MemoryModel, dtype: torch.dtype, h: int, w: int, frames: int, ring: int,
                      ulysses: int, tp: int = 1) -> int:
    """Peak live bytes of one transformer call on this rank's tokens (and, with tensor parallelism,
    its shard of the weights: the forward runs on ``meta`` in a world of ``tp`` fake ranks), plus SP
    attention's buffers."""
    from meshsp.config import ParallelConfig
    from meshsp.mesh import init_sp_mesh
    from meshsp.plans import get_plan
    from meshsp.tiny import make_inputs

    p = ring * ulysses
    model = _diffusers(spec.transformer, dtype=dtype)
    txt = spec.text_tokens
    local_txt = math.ceil(txt / p) if spec.joint_text else txt
    # This rank's share of the image tokens as a grid of the same height (the sequence is split
    # along it; only the count matters to the activations).
    local_w = math.ceil(w / p)
    inputs = make_inputs(_family_of(spec), model, h=h, w=local_w, frames=frames, txt=local_txt)
    inputs = {k: v.to("meta", dtype if v.is_floating_point() else None) if isinstance(v, torch.Tensor) else v
              for k, v in inputs.items()}
    with _fake_world(tp) if tp > 1 else contextlib.nullcontext():
        if tp > 1:
            mesh = init_sp_mesh(ParallelConfig(tensor_parallel_size=tp), device_type="cpu")
            get_plan(model)._apply(model, mesh)
        with torch.no_grad(), LiveBytes() as live, _FlashAttention():
            model(**inputs)
    s = h * w * frames + (txt if spec.joint_text else 0)
    d = model.config.num_attention_heads * model.config.attention_head_dim // tp  # this rank's heads
    size = torch.tensor([], dtype=dtype).element_size()
    extra = 0
    if ulysses > 1:  # received q, k, v head chunks of the whole sequence (half of them when pipelined)
        extra += 3 * (s // ring) * d // ulysses * size // 2
    if ring > 1:  # the next K/V block in flight and the fp32 output accumulator with its lse
        extra += 2 * math.ceil(s / p) * d // ulysses * size + math.ceil(s / p) * d // ulysses * 4
    return live.peak + extra


def _vae_decode(spec: MemoryModel, dtype: torch.dtype, h: int, w: int, frames: int, ranks: int = 1) -> int:
    """The VAE's weights plus the peak of ``vae.decode`` on one rank: the whole latent, or with
    ``ranks`` > 1 this rank's band of rows (``meshsp.vae``) plus the gathered output twice (the
    padded bands received and the image they are joined into)."""
    vae = _diffusers(spec.vae, spec.vae_config, dtype)
    lat_h, lat_w = h * spec.patch, w * spec.patch
    band = -(-lat_h // ranks)
    channels = vae.config.latent_channels if hasattr(vae.config, "latent_channels") else vae.config.z_dim
    video = spec.video or spec.vae != "AutoencoderKL"
    shape = (1, channels, frames, band, lat_w) if video else (1, channels, band, lat_w)
    with torch.no_grad(), LiveBytes() as live, _FlashAttention():
        out = vae.decode(torch.empty(shape, device="meta", dtype=dtype)).sample
    gathered = 2 * out.numel() * out.element_size() * ranks if ranks > 1 else 0
    return _bytes_of(vae, dtype) + live.peak + gathered


def estimate(family: str, width: int, height: int, *, frames: int = 1, dtype: torch.dtype = torch.bfloat16,
             layouts=((1, 1),), vae_ranks: int = 1) -> dict[tuple[int, ...], dict[str, float]]:
    """GiB per rank for each ``(ring, ulysses)`` or ``(ring, ulysses, tp)`` layout (the keys of the
    result, as given): ``weights``, ``activations``, ``text_encoder``, ``vae``, and ``total`` — the
    peak: the text encoder resident, plus the transformer's weights and the larger of one step's
    activations and the VAE decode (split across ``vae_ranks``, as the engine splits it across
    the whole mesh), times ``OVERHEAD``.

    Example::

        estimate("qwen-image", 2048, 2048, layouts=[(1, 8), (1, 4, 2)])[(1, 4, 2)]["total"]
    """
    if family not in FAMILIES:
        raise ValueError(f"no memory model for {family!r}; known: {sorted(FAMILIES)}.")
    spec = FAMILIES[family]
    scale = spec.vae_scale * spec.patch
    if width % scale or height % scale:
        raise ValueError(f"{family}: width and height must be multiples of {scale}; got {width}x{height}.")
    h, w = height // scale, width // scale
    lat_frames = (frames - 1) // 4 + 1 if spec.video else 1
    vae = _vae_decode(spec, dtype, h, w, lat_frames, vae_ranks)
    out, text_by_tp = {}, {}
    for layout in layouts:
        ring, ulysses, tp = (*layout, 1)[:3]
        if tp not in text_by_tp:  # the encoders depend on tp alone: build them once per degree
            text_by_tp[tp] = _text_encoder_bytes(spec, dtype, tp)
        text = text_by_tp[tp]
        weights = _weights(spec, dtype, ring, ulysses, tp)
        acts = _step_activations(spec, dtype, h, w, lat_frames, ring, ulysses, tp)
        total = (text + weights + max(acts, vae)) * OVERHEAD
        out[tuple(layout)] = {"weights": weights / GIB, "activations": acts / GIB, "text_encoder": text / GIB,
                              "vae": vae / GIB, "total": total / GIB}
    return out
