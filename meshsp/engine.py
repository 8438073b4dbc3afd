"""High-level generation: load a diffusers pipeline, make its transformer sequence-parallel, generate.

``Engine(model=..., parallel_config=...)`` works two ways:

* from a plain ``python`` process it spawns one worker per rank (``WorkerPool``), each loading the
  pipeline, and returns the images in the calling process;
* under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process is one rank (SPMD); the
  images are returned on rank 0 and ``None`` elsewhere.

Text encoding runs as diffusers runs it, on every rank (text encoders with a transformers tp plan
sharded on the ``tp`` axis); the transformer is parallelized with its plan (``meshsp.get_plan``),
and with more than one rank the VAE decode is split across all of them (``meshsp.vae``). On CUDA the weights load straight onto each
rank's GPU (no CPU copy first); with ``cpu_offload`` the text encoders and VAE stay in CPU memory
and diffusers' group offloading moves their layers to the GPU while they run. With ``cfg_degree=2`` the world splits into two
halves on the ``cfg`` mesh axis that compute the conditional and unconditional branches at the same
time (``meshsp.cfg``), each half sequence-parallel.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from meshsp.cache import BATCH_WIDE_CACHES, check_batching
from meshsp.config import ParallelConfig
from meshsp.launch import RankFailure, WorkerPool
from meshsp.loading import Stages, load_kwargs, load_pipeline, offload, rank_device, weights_info
from meshsp.vae.noise import noise_per_request

__all__ = ["BATCH_WIDE_CACHES", "DTYPES", "Engine", "SamplingParams", "batch_key", "resolve_dtype", "resolve_model"]

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``None`` -> bfloat16 where CUDA is available, else float32; names or torch dtypes pass through.

    Example::

        resolve_dtype("bfloat16")   # torch.bfloat16
    """
    if dtype is None:
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or None for bfloat16 on CUDA, float32 on CPU); got {dtype!r}.")


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """What to generate; ``guidance_scale=None`` keeps the pipeline's default.

    Example::

        SamplingParams(num_inference_steps=30, width=1024, height=1024, seed=42)
    """

    num_inference_steps: int = 50
    width: int = 1024
    height: int = 1024
    seed: int = 0
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    num_images_per_prompt: int = 1
    num_frames: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_inference_steps", "width", "height", "num_images_per_prompt"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.num_frames is not None and (not isinstance(self.num_frames, int) or self.num_frames < 1):
            raise ValueError(f"num_frames must be a positive integer or None, got {self.num_frames!r}.")


def resolve_model(model: str) -> str:
    """A tiny embedded pipeline name (``tiny-qwen-image``, ...) -> its built directory; else as given."""
    from meshsp.pipelines import TINY_PIPELINES, tiny_pipeline_path

    return str(tiny_pipeline_path(model)) if model in TINY_PIPELINES else model


def batch_key(params: SamplingParams) -> tuple:
    """What requests must share to run as one batch: size, steps, frames and guidance. Seeds, prompts
    and negative prompts may differ (whether there is a negative prompt may not: it selects true CFG).

    Example::

        batch_key(SamplingParams(seed=1)) == batch_key(SamplingParams(seed=2))   # True
    """
    return (params.width, params.height, params.num_inference_steps, params.num_frames, params.guidance_scale,
            params.negative_prompt is not None)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


class _Runner:
    """One rank's pipeline, with its transformer parallelized."""

    def __init__(self, model: str, config: ParallelConfig, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", encode_text_once: bool = False, cpu_offload: bool = False,
                 vae_parallel: bool = True, vae_tiling: bool = False, cache: str | None = None,
                 cache_options: dict | None = None) -> None:
        from diffusers import DiffusionPipeline

        if _rank() != 0:  # progress bars and loading output on rank 0 only
            import diffusers.utils.logging as diffusers_logging
            import transformers.utils.logging as transformers_logging

            diffusers_logging.disable_progress_bar()
            transformers_logging.disable_progress_bar()
        path = resolve_model(model)
        # Only rank 0 encodes text: the others load no text encoder (meshsp.text_encoding).
        self.encode_once = encode_text_once and config.world_size > 1
        skip = {}
        if self.encode_once and _rank() != 0:
            from meshsp.text_encoding import text_encoder_names

            skip = {name: None for name in text_encoder_names(DiffusionPipeline.load_config(path))}
        self.device = rank_device(device)
        # diffusers keeps a model's _keep_in_fp32_modules in float32 whatever the dtype. With tensor
        # parallelism each rank reads only its part of the transformers (meshsp.loading).
        self.pipe = load_pipeline(path, dtype, load_kwargs(self.device, cpu_offload=cpu_offload,
                                                             local_rank=_local_rank()), skip, config)
        if cpu_offload:
            offload(self.pipe, self.device)
        elif self.device.type == "cuda":
            self.pipe.to(self.device)  # moves only what did not load there (nothing, with LOCAL_RANK set)
        # The one recipe every entry point shares (meshsp.recipe): plans, VAE split, CFG, text
        # encoder TP (not for offloaded encoders, nor rank 0's lone one), step cache.
        from meshsp.recipe import parallelize_pipeline

        parallelize_pipeline(self.pipe, config, vae_parallel=vae_parallel, vae_tiling=vae_tiling,
                             text_encoder_tp=not (cpu_offload or self.encode_once), cache=cache,
                             cache_options=cache_options)
        self.cache = self.pipe.meshsp.cache
        # Every rank of the call votes before each transformer forward whether to stop (meshsp.stop).
        from meshsp.stop import StopCheck

        world = dist.is_initialized() and dist.get_world_size() > 1
        self.stop_check = StopCheck(dist.new_group(backend="gloo") if world else None)
        self.stop_check.install(m for name, m in self.pipe.components.items()
                                if name in ("transformer", "transformer_2") and isinstance(m, torch.nn.Module))
        self.pipe.set_progress_bar_config(disable=_rank() != 0)
        self.params = inspect.signature(self.pipe.__call__).parameters
        self.stages = Stages(self.pipe, self.device)
        self.progress = 0.0  # of the running call, 0..1, updated after every denoising step
        self.progress_sink = self._set_progress

    def _set_progress(self, fraction: float) -> None:
        self.progress = fraction

    def info(self) -> dict:
        """Pipeline class, whether it makes video, the multiple its width and height need, the ranks
        its VAE decode is split across and the temporal step of its frame counts."""
        pipe = self.pipe
        scale = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", 8)
        # Latents are packed (Flux, Qwen-Image) or patchified (Wan) 2x2 after the VAE's downscaling.
        return {"pipeline": type(pipe).__name__, "video": "num_frames" in self.params, "size_multiple": scale * 2,
                "vae_ranks": pipe.meshsp.vae_ranks,
                "frame_multiple": getattr(pipe, "vae_scale_factor_temporal", 1) or 1}

    def _uses_cfg(self, kw: dict) -> bool:
        """Whether this call runs a conditional and an unconditional branch per step."""
        from meshsp.cfg import uses_guidance

        return uses_guidance(self.pipe, {**{n: p.default for n, p in self.params.items()}, **kw})

    def _kwargs(self, requests: list[tuple[list[str], SamplingParams]]) -> dict:
        """The pipeline call of a batch: every request's prompts, each repeated per image, one
        generator per request drawn image by image (so an image's noise does not depend on what it is
        batched with); size, steps, frames and guidance shared (``batch_key``)."""
        p = requests[0][1]
        keys = {batch_key(params) for _, params in requests}
        if len(keys) > 1:
            raise ValueError(f"requests batched together must share size, steps, frames and guidance "
                             f"(batch_key); got {sorted(keys, key=str)}. Run them in separate batches.")
        prompts, negatives, generators = [], [], []
        for texts, params in requests:
            generator = torch.Generator().manual_seed(params.seed)
            for text in texts:
                prompts += [text] * params.num_images_per_prompt
                negatives += [params.negative_prompt] * params.num_images_per_prompt
                generators += [generator] * params.num_images_per_prompt
        kw = dict(prompt=prompts, num_inference_steps=p.num_inference_steps, width=p.width, height=p.height,
                  generator=generators, output_type="pil")
        if p.negative_prompt is not None:
            if "negative_prompt" not in self.params:
                raise ValueError(f"{type(self.pipe).__name__} takes no negative_prompt; leave it unset.")
            kw["negative_prompt"] = negatives
        if p.negative_prompt is None and "true_cfg_scale" in self.params:
            kw["true_cfg_scale"] = 1.0  # no true CFG without a negative prompt (the default would warn each call)
        if p.guidance_scale is not None:
            # With a negative prompt, pipelines with "true" CFG take true_cfg_scale; otherwise the
            # value is the pipeline's guidance_scale (CFG, or embedded guidance for distilled models).
            true_cfg = "true_cfg_scale" in self.params and p.negative_prompt is not None
            kw["true_cfg_scale" if true_cfg else "guidance_scale"] = p.guidance_scale
        if p.num_frames is not None:
            if "num_frames" not in self.params:
                raise ValueError(f"{type(self.pipe).__name__} generates images; num_frames is for video pipelines.")
            kw["num_frames"] = p.num_frames
        return kw

    def rank_info(self) -> dict:
        """This rank's loaded components and their parameter counts."""
        return {name: sum(p.numel() for p in getattr(self.pipe, name).parameters())
                for name, value in self.pipe.components.items() if isinstance(value, torch.nn.Module)}

    def weights_info(self) -> dict:
        return weights_info(self.pipe)

    def _encode_once(self, kwargs: dict) -> dict:
        """Replace the prompts by rank 0's embeddings (a broadcast); the same call kwargs on every rank."""
        from meshsp.text_encoding import broadcast_embeddings, encode

        embeddings, error = None, None
        if _rank() == 0:
            try:
                embeddings = encode(self.pipe, kwargs["prompt"], kwargs.get("negative_prompt"), 1,
                                    self._uses_cfg(kwargs))
            except Exception as exc:  # the others wait in the broadcast: they must learn of it there
                error, embeddings = exc, _EncodeFailed(f"{type(exc).__name__}: {exc}")
        embeddings = broadcast_embeddings(embeddings)
        if error is not None:
            raise error
        if isinstance(embeddings, _EncodeFailed):
            raise RuntimeError(f"rank 0 failed to encode the prompts, so this rank stops too: {embeddings.message}")
        device = self.pipe.device
        call = {k: v for k, v in kwargs.items() if k not in ("prompt", "negative_prompt")}
        return {**call, **{k: v.to(device) for k, v in embeddings.items()}}

    def generate(self, requests: list[tuple[list[str], SamplingParams]],
                 should_stop: Callable[[], str | None] | None = None):
        """One pipeline call for a batch of requests (``batch_key`` equal). On rank 0: (per request
        its images or videos, the call's seconds, its stage seconds, the step cache's counts or None);
        elsewhere None. ``should_stop`` (rank 0's): asked before each transformer forward; a reason
        stops the call there on every rank with ``CallStopped`` (``meshsp.stop``)."""
        self.stop_check.arm(should_stop)
        try:
            return self._generate(requests)
        finally:
            self.stop_check.disarm()

    def _generate(self, requests: list[tuple[list[str], SamplingParams]]):
        kwargs = self._kwargs(requests)
        if self.encode_once:
            kwargs = self._encode_once(kwargs)
        steps = kwargs["num_inference_steps"]
        if "callback_on_step_end" in self.params:
            def step_end(pipe, i, t, tensors):
                self.progress_sink((i + 1) / steps)
                return {}
            kwargs["callback_on_step_end"] = step_end
        self.progress_sink(0.0)
        self.stages.reset()
        # Noise a model draws from the global generator (LTX-Video's decoder) is drawn alike on every
        # rank and as one process with the same seed draws it; in a batch, each request's decode
        # draws it from its own seed (meshsp.vae.noise_per_request).
        torch.manual_seed(requests[0][1].seed)
        seeds = [params.seed for _, params in requests]
        sizes = [len(texts) * params.num_images_per_prompt for texts, params in requests]
        t0 = time.perf_counter()
        with noise_per_request(getattr(self.pipe, "vae", None), seeds, sizes):
            out = self.pipe(**kwargs)
        seconds = time.perf_counter() - t0
        if _rank() != 0:
            return None
        images = list(out.frames if hasattr(out, "frames") else out.images)
        split = []
        for texts, params in requests:
            n = len(texts) * params.num_images_per_prompt
            split.append(images[:n])
            images = images[n:]
        return split, seconds, self.stages.seconds(seconds), dict(self.cache.counts) if self.cache is not None else None


@dataclass(frozen=True)
class _EncodeFailed:
    """What rank 0 broadcasts instead of the embeddings when encoding failed on it."""

    message: str


def deadline_check(timeout_s: float | None, stop_asked: Callable[[], bool]) -> Callable[[], str | None]:
    """``should_stop`` for a call that may run ``timeout_s`` seconds from now (None: no deadline)
    and stops when ``stop_asked()``."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def should_stop() -> str | None:
        if stop_asked():
            return "cancelled"
        if deadline is not None and time.monotonic() > deadline:
            return "timeout"
        return None

    return should_stop


_RUNNER: _Runner | None = None  # the runner of a spawned worker process

# Under torchrun lead / follow: how long after finishing a call a rank waits for the others to
# finish it too before it takes the world to be stuck (healthy ranks finish within a second).
CHECK_IN_S = 30.0


def _worker_load(model: str, config: ParallelConfig, dtype: torch.dtype, device: str, encode_text_once: bool,
                 cpu_offload: bool, vae_parallel: bool, vae_tiling: bool, cache: str | None,
                 cache_options: dict | None) -> dict:
    global _RUNNER
    _RUNNER = _Runner(model, config, dtype, device, encode_text_once, cpu_offload, vae_parallel, vae_tiling, cache,
                      cache_options)
    return _RUNNER.info()


def _worker_rank_info() -> dict:
    return _RUNNER.rank_info()


def _worker_weights_info() -> dict:
    return _RUNNER.weights_info()


def _worker_generate(requests: list[tuple[list[str], SamplingParams]], timeout_s: float | None):
    from meshsp.launch import report_progress, stop_requested

    _RUNNER.progress_sink = report_progress
    return _RUNNER.generate(requests, deadline_check(timeout_s, stop_requested) if _rank() == 0 else None)


class Engine:
    """Generate with a diffusers pipeline whose transformer runs sequence-parallel.

    ``dtype``: the pipeline's weights and compute, ``"bfloat16"``, ``"float16"`` or ``"float32"``
    (default: bfloat16 where CUDA is available, float32 on CPU). Modules a diffusers model keeps in
    float32 (``_keep_in_fp32_modules``) stay float32. ``device``: ``"cuda"`` (each rank its local GPU,
    ``LOCAL_RANK``, or the current one in a single process; the weights load straight onto it; the
    default where CUDA is available) or ``"cpu"``. ``encode_text_once``: only rank 0
    loads and runs the text encoders; the embeddings are broadcast to the other ranks once per
    request (``meshsp.text_encoding``). ``cpu_offload``: every model but the transformer (text
    encoders, VAE) is kept in CPU memory on each rank and moved to the rank's GPU layer by layer when
    it runs (diffusers' group offloading), so the transformer has the GPU; ``weights_info()`` says
    where each model's weights are. On CPU the same hooks run with the CPU as both devices, which
    saves nothing (a warning says so). ``vae_parallel`` (default on with more than one rank): the
    VAE decode is split into row bands across every rank (``meshsp.vae``), exact against the whole
    decode; a VAE it cannot split raises ``ValueError`` (pass ``vae_parallel=False``). ``vae_tiling``:
    diffusers' tiled decode, for outputs too large to decode untiled; with ``vae_parallel`` its tiles
    are decoded round-robin across the ranks (``AutoencoderKL``), equal to one process's tiled decode.
    ``cache``: one of diffusers' step caches (``meshsp.cache.CACHE_KINDS``: ``"first-block"``,
    ``"taylorseer"``, ...) with ``cache_options`` (its diffusers config's fields, e.g.
    ``{"threshold": 0.1}``), under every parallel mode with the skip decisions agreed across the
    ranks of a forward (``meshsp.cache``); ``last_cache`` counts the blocks it computed and skipped.

    Example::

        engine = Engine(model="tiny-qwen-image", parallel_config=ParallelConfig(ulysses_degree=2), dtype="bfloat16")
        images = engine.generate("a cat on a windowsill", SamplingParams(num_inference_steps=4,
                                                                        width=256, height=256))
        engine.close()
    """

    def __init__(self, model: str, parallel_config: ParallelConfig | None = None, *,
                 dtype: str | torch.dtype | None = None, device: str | None = None,
                 encode_text_once: bool = False, cpu_offload: bool = False, vae_parallel: bool = True,
                 vae_tiling: bool = False, cache: str | None = None, cache_options: dict | None = None) -> None:
        self.config = parallel_config or ParallelConfig()
        if self.config.data_parallel_size > 1:  # before any rank starts
            raise ValueError(f"data_parallel_size={self.config.data_parallel_size} is for training (meshsp train); "
                             "the engine generates with data_parallel_size=1.")
        if cache is not None:  # the kind, options and degrees, before any rank starts
            from meshsp.cache import check_cache

            check_cache(cache, cache_options, self.config)
        self.cache = cache
        self.last_cache: dict | None = None  # the last call's step-cache counts: calls, computed, skipped
        self.model = model
        self.dtype = resolve_dtype(dtype)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device not in ("cpu", "cuda") or (self.device == "cuda" and not torch.cuda.is_available()):
            raise ValueError(f"device must be 'cpu' or 'cuda' (with CUDA available); got {device!r}.")
        if cpu_offload and self.device == "cpu":
            logger.warning("cpu_offload on device='cpu' saves no memory: the text encoders and VAE get diffusers' "
                           "offloading hooks with the CPU as both onload and offload device. It keeps them off "
                           "the GPU with device='cuda'.")
        self.cpu_offload = cpu_offload
        spmd = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self._pool: WorkerPool | None = None
        self._runner: _Runner | None = None
        self.last_seconds = 0.0
        self.last_stages: dict[str, float] = {}  # the last call's seconds per stage (rank 0)
        self._control = None  # under torchrun: rank 0's channel to the others (lead / follow)
        self._check_in_group = None  # under torchrun: every rank's barrier after each call
        self._leading = False
        self._stop_asked = threading.Event()  # in this process: the running call should stop
        self._world_failure: str | None = None  # under torchrun: the world fell out of step
        if spmd or self.config.world_size == 1:
            if spmd:  # the process group of the engine's device, so the mesh built later follows it
                from meshsp.mesh import start_process_group

                start_process_group(self.device, self.config.timeout_s)
            self._runner = _Runner(model, self.config, self.dtype, self.device, encode_text_once, cpu_offload,
                                   vae_parallel, vae_tiling, cache, cache_options)
            info = self._runner.info()
            if spmd and dist.is_initialized() and dist.get_world_size() > 1:
                self._control = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365))
                self._check_in_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=CHECK_IN_S))
        else:
            model = resolve_model(model)  # build an embedded pipeline here, before any process group
            self._load_args = (model, self.config, self.dtype, self.device, encode_text_once, cpu_offload,
                               vae_parallel, vae_tiling, cache, cache_options)
            info = self._start_pool()
        self.pipeline_class: str = info["pipeline"]
        self.is_video: bool = info["video"]
        self.size_multiple: int = info["size_multiple"]
        self.vae_ranks: int = info["vae_ranks"]  # ranks the VAE decode is split across (1: whole)
        self.frame_multiple: int = info["frame_multiple"]  # video: num_frames is 1 + a multiple of this

    def generate(self, prompt: str | list[str], params: SamplingParams | None = None, *,
                 timeout_s: float | None | str = "config"):
        """Images (PIL) for the prompt(s); for video pipelines, a list of frame lists. None off rank 0.
        ``timeout_s``: as for ``generate_batch``."""
        out = self.generate_batch([(prompt, params or SamplingParams())], timeout_s=timeout_s)
        return None if out is None else out[0]

    def generate_batch(self, requests: list[tuple[str | list[str], SamplingParams]], *,
                       timeout_s: float | None | str = "config"):
        """Several requests in one pipeline call: per request, what ``generate`` would return for it
        alone (None off rank 0). They must share size, steps, frames and guidance (``batch_key``);
        seeds, prompts and negative prompts may differ. Each request's noise comes from its own seed,
        so its images do not depend on what it is batched with.

        ``timeout_s`` (default: the config's ``request_timeout_s``; None: none): the call's deadline.
        Past it, or once ``stop()`` was called, every rank stops at the next transformer forward and
        the call raises ``meshsp.stop.CallStopped`` (from spawned workers: ``RankFailure`` whose
        ``exceptions`` hold it); the ranks stay up. Ranks that do not get there within the config's
        ``stuck_timeout_s`` more are stopped (``RankFailure`` with ``pool_failed``; ``restart()``).

        Example::

            a, b = engine.generate_batch([("a cat", SamplingParams(seed=1)), ("a dog", SamplingParams(seed=2))])
        """
        batch = []
        for prompt, params in requests:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
                raise ValueError(f"prompts must be non-empty strings, got {prompt!r}.")
            batch.append((prompts, params))
        if not batch:
            raise ValueError("generate_batch needs at least one (prompt, SamplingParams) request.")
        check_batching(len(batch), self.cache)
        if len({batch_key(params) for _, params in batch}) > 1:
            raise ValueError(f"requests batched together must share size, steps, frames and guidance (batch_key); "
                             f"got {[batch_key(params) for _, params in batch]}. Run them in separate batches.")
        if timeout_s == "config":
            timeout_s = self.config.request_timeout_s
        if self._pool is not None:
            failure = self._pool.failure()
            if failure is not None:
                raise RankFailure(f"the engine's workers are gone: {failure}; restart() starts new ones.",
                                  pool_failed=True)
            hard = None if timeout_s is None else timeout_s + self.config.stuck_timeout_s
            result = self._pool.run(_worker_generate, batch, timeout_s, timeout=hard)[0]
        else:
            if self._world_failure is not None:
                raise RankFailure(f"the torchrun world is out of step: {self._world_failure}", pool_failed=True)
            self._stop_asked.clear()
            should_stop = deadline_check(timeout_s, self._stop_asked.is_set)
            if self._leading:
                self._send("generate", batch)
                result = self._generate_checked_in(batch, should_stop)
            else:  # one process, or an SPMD script: rank 0 decides for every rank (meshsp.stop)
                result = self._runner.generate(batch, should_stop if _rank() == 0 else None)
        if result is None:
            return None
        outputs, self.last_seconds, self.last_stages, self.last_cache = result
        return outputs

    @property
    def progress(self) -> float:
        """How far the running (or last) call is, 0..1, after each denoising step; readable from
        another thread while ``generate`` runs."""
        return self._pool.progress if self._pool is not None else self._runner.progress

    def lead(self) -> None:
        """Under torchrun, on rank 0: from now on each ``generate`` is first sent to the other ranks,
        which wait in ``follow()`` (``meshsp serve`` under torchrun). The channel is its own gloo
        group without a timeout, so a server may sit idle for as long as it likes."""
        if self._control is None or _rank() != 0:
            raise ValueError("lead() is for rank 0 of a torchrun world of more than one rank.")
        self._leading = True

    def follow(self) -> None:
        """Under torchrun, on every rank but 0: run what rank 0 sends (``lead``) until it closes.
        A request that fails is logged on rank 0 by the caller; the loop goes on."""
        if self._control is None or _rank() == 0:
            raise ValueError("follow() is for the ranks other than 0 of a torchrun world of more than one rank.")
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0, group=self._control)
            command, payload = message[0]
            if command == "stop":
                return
            try:
                self._generate_checked_in(payload)
            except RankFailure:
                raise  # the world is out of step: this rank exits and torchrun stops the others
            except Exception:  # the same error reaches rank 0's caller, who reports it
                logger.debug("a request failed on rank %d", _rank(), exc_info=True)

    def _generate_checked_in(self, batch, should_stop: Callable[[], str | None] | None = None):
        """``generate`` on this rank, then a barrier of every rank (``CHECK_IN_S``) on a gloo group
        of its own. An error every rank raised alike passes it and the world goes on. A rank that
        failed alone (out of memory) leaves the others waiting in a collective until the process
        group's timeout: the barrier times out instead, and ``RankFailure`` ends the lead / follow
        loop so torchrun stops every rank within seconds rather than after the timeout."""
        error = None
        try:
            result = self._runner.generate(batch, should_stop)
        except Exception as exc:
            error = exc
        try:
            dist.barrier(group=self._check_in_group)
        except RuntimeError as exc:
            what = f"raised {error!r}" if error is not None else "finished"
            self._world_failure = f"rank {_rank()} {what}; not every rank finished the call"
            raise RankFailure(f"rank {_rank()} {what}, but not every rank finished the call within {CHECK_IN_S:g} s "
                              "of it (one failed alone and the others wait for it in a collective); the torchrun "
                              "world is out of step and stops", pool_failed=True) from (error or exc)
        if error is not None:
            raise error
        return result

    def stop(self) -> None:
        """Ask the running call (if any) to stop at its next transformer forward, on every rank
        (``CallStopped``, reason ``"cancelled"``); from any thread. The ranks stay up."""
        if self._pool is not None:
            self._pool.request_stop()
        self._stop_asked.set()

    def failure(self) -> str | None:
        """Why the engine cannot generate (its spawned workers are gone, or the torchrun world fell
        out of step), looked up now; None while it can."""
        if self._pool is not None:
            return self._pool.failure()
        return self._world_failure

    def restart(self) -> None:
        """Replace spawned workers that are gone by new ones, loading the pipeline again (the config's
        ``load_timeout_s``). A torchrun world cannot be restarted from inside: its launcher does that."""
        if self._pool is None:
            raise ValueError("restart() replaces an engine's spawned workers; this engine has none (one process, "
                             "or torchrun, whose launcher restarts the world).")
        self._pool.close()
        self._start_pool()

    def _start_pool(self) -> dict:
        backend = "nccl" if self.device == "cuda" else "gloo"
        self._pool = WorkerPool(self.config.world_size, backend=backend, pg_timeout_s=self.config.timeout_s)
        try:
            return self._pool.run(_worker_load, *self._load_args, timeout=self.config.load_timeout_s)[0]
        except BaseException:
            self._pool.close()
            raise

    def _send(self, command: str, payload) -> None:
        dist.broadcast_object_list([(command, payload)], src=0, group=self._control)

    def rank_info(self) -> list[dict]:
        """Per rank: the loaded pipeline components and their parameter counts."""
        if self._pool is not None:
            return self._pool.run(_worker_rank_info, timeout=self.config.request_timeout_s)
        return [self._runner.rank_info()]

    def weights_info(self) -> list[dict]:
        """Per rank, per model: ``bytes`` of parameters and buffers, the ``device`` they are kept on
        between calls, and whether they are ``offloaded`` (``cpu_offload``: moved to the rank's
        device only while the model runs).

        Example::

            with Engine("tiny-flux", cpu_offload=True) as engine:
                engine.weights_info()[0]["vae"]   # {"bytes": ..., "device": "cpu", "offloaded": True}
        """
        if self._pool is not None:
            return self._pool.run(_worker_weights_info, timeout=self.config.request_timeout_s)
        return [self._runner.weights_info()]

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the spawned workers (empty under torchrun or with one rank)."""
        return self._pool.pids if self._pool is not None else []

    def close(self) -> None:
        if self._leading:
            self._leading = False
            if self._world_failure is None:  # out of step, the others may never read it: torchrun stops them
                self._send("stop", None)
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
