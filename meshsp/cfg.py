"""CFG parallel: the conditional and unconditional branches on the two ranks of the ``cfg`` axis.

diffusers pipelines call the transformer twice per denoising step, inside
``transformer.cache_context("cond")`` and then ``cache_context("uncond")``, and combine the two
predictions only after the second call. ``CfgParallelHook`` (a diffusers ``ModelHook``, the hook
system diffusers' own caches use to replace a forward) exploits that order:

* cfg rank 0 computes the "cond" call; at the "uncond" call it only receives rank 1's result;
* cfg rank 1 answers the "cond" call at once with an empty tensor in the latents' shape, computes
  the "uncond" call, and then fills that tensor in place with rank 0's result (the pipeline has not
  read it yet). The two ranks first compare their prediction shapes (one tiny all-gather), so a
  model that predicts in another shape raises the same error on both instead of hanging.

So the two branches run at the same time on the two halves of the world, each sequence-parallel on
its own ``("ring", "ulysses")`` sub-mesh, and one all-gather per step over the ``cfg`` axis swaps
the predictions. Requests without classifier-free guidance make only "cond" calls; the hook is
then disabled and both halves compute the same branch.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager

from meshsp.ops.comm import _count

__all__ = ["CfgParallelHook", "apply_cfg_parallel", "check_cfg_pipeline", "uses_guidance"]

logger = logging.getLogger(__name__)

HOOK_NAME = "meshsp_cfg_parallel"


class _Context(BaseState):
    """Per-branch hook state diffusers asks for; the hook only needs the branch name."""

    def reset(self) -> None:
        pass


class CfgParallelHook(ModelHook):
    """Replaces the transformer's forward; see the module docstring."""

    _is_stateful = True  # receives the pipeline's cache_context ("cond" / "uncond")

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group
        self.rank = dist.get_rank(group)
        self.enabled = True
        self.state = StateManager(_Context)
        self._cond: torch.Tensor | None = None  # rank 0: its cond result; rank 1: the placeholder
        self.latents: torch.Tensor | None = None  # the call's latents, whole (see record_latents)
        self._warned = False

    def finish(self) -> None:
        """At the end of a pipeline call: raise if a 'cond' prediction was never completed by an
        'uncond' call (cfg rank 1 answered it with a placeholder), on both cfg ranks alike."""
        pending, self._cond, self.latents = self._cond is not None, None, None
        if pending:
            raise ValueError("CFG parallel expected an 'uncond' transformer call after the last 'cond' one, but the "
                             "pipeline call ended: it ran without guidance. Pass the arguments that enable guidance, "
                             "or use cfg_degree=1.")

    def record_latents(self, module, args, kwargs) -> None:
        """A forward pre-hook run before every other: the latents as the pipeline passed them."""
        self.latents = kwargs.get("hidden_states", args[0] if args else None)

    def reset_state(self, module):
        self.state.reset()
        self._cond = None
        return module

    def new_forward(self, module, *args, **kwargs):
        context = self.state._context
        name = context.name if context is not None else None
        if not self.enabled or name not in ("cond", "uncond"):
            if name == "uncond" and not self._warned and dist.get_rank() == 0:
                self._warned = True  # a call judged (uses_guidance) to run without guidance
                logger.warning("CFG parallel is off for this call (no guidance expected from its arguments), yet the "
                               "pipeline made an 'uncond' transformer call: both cfg halves compute both branches.")
            return self.fn_ref.original_forward(*args, **kwargs)
        return_dict = kwargs.get("return_dict", True)
        if name == "cond":
            if self._cond is not None:
                self._cond = None
                raise ValueError("CFG parallel expected an 'uncond' transformer call after the 'cond' one, but the "
                                 "pipeline called 'cond' again: this call runs without guidance. Pass the arguments "
                                 "that enable guidance, or use cfg_degree=1.")
            if self.rank == 0:
                out = self.fn_ref.original_forward(*args, **kwargs)
                self._cond = _sample(out)
                return out
            # A denoiser predicts in the latents' shape, as the pipeline passed them (recorded before
            # a sequence-parallel plan's own pre-hook shards them); filled in place at the "uncond"
            # call, before the pipeline reads it (views such as noise_pred[:, :n] see the data too).
            self._cond = torch.empty_like(self.latents)
            return _wrap(self._cond, return_dict)
        if self._cond is None:
            raise ValueError("CFG parallel needs a 'cond' transformer call before each 'uncond' call.")
        if self.rank == 1:
            out = self.fn_ref.original_forward(*args, **kwargs)
            mine = _sample(out)
        else:
            mine = self._cond
        shapes = funcol.wait_tensor(funcol.all_gather_single(
            torch.tensor(list(self._cond.shape) + [0] * (8 - self._cond.dim()), dtype=torch.int64,
                         device=mine.device), 0, self.group))  # rank 0: its prediction; rank 1: placeholder
        if not bool((shapes[:8] == shapes[8:]).all()):
            raise ValueError(
                f"CFG parallel assumes the transformer predicts in the latents' shape; got "
                f"{shapes[:8].tolist()} for cond vs {shapes[8:].tolist()}; use cfg_degree=1 for this model."
            )
        _count("cfg_all_gather", mine.numel() * mine.element_size())  # what this rank sends to the other half
        both = funcol.wait_tensor(funcol.all_gather_single(mine.contiguous(), 0, self.group))
        cond, uncond = both.chunk(2)
        if self.rank == 1:
            self._cond.copy_(cond)
        self._cond = None
        return _wrap(uncond, return_dict)


def check_cfg_pipeline(pipe) -> None:
    """``ValueError`` unless ``pipe`` calls its transformer once per guidance branch, marked with
    ``cache_context("uncond")`` (what CFG parallel splits between the halves)."""
    source = inspect.getsource(type(pipe).__call__)
    if 'cache_context("uncond"' not in source:
        raise ValueError(
            f"cfg_degree=2 needs a pipeline that calls its transformer once per guidance branch "
            f"(cache_context('cond') / ('uncond')); {type(pipe).__name__} does not. Use cfg_degree=1."
        )


def uses_guidance(pipe, arguments: dict) -> bool:
    """Whether a call of ``pipe`` with ``arguments`` (bound, defaults applied) runs a conditional and
    an unconditional branch per step: true CFG with a negative prompt (``true_cfg_scale`` > 1), or
    classic CFG (``guidance_scale`` > 1 where the pipeline has ``do_classifier_free_guidance``).

    Example::

        uses_guidance(pipe, {"true_cfg_scale": 4.0, "negative_prompt": "blurry"})   # True for Qwen-Image
    """
    if "true_cfg_scale" in arguments:
        negative = arguments.get("negative_prompt") is not None or arguments.get("negative_prompt_embeds") is not None
        return (arguments["true_cfg_scale"] or 0) > 1 and negative
    if "guidance_scale" in arguments and hasattr(type(pipe), "do_classifier_free_guidance"):
        return (arguments["guidance_scale"] or 0) > 1
    return False


def _sample(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def _wrap(sample: torch.Tensor, return_dict: bool):
    if return_dict:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)
    return (sample,)


def apply_cfg_parallel(transformer: torch.nn.Module, cfg_group: dist.ProcessGroup) -> CfgParallelHook:
    """Register the CFG-parallel hook on ``transformer``; returns it (``hook.enabled`` toggles it)."""
    if dist.get_world_size(cfg_group) != 2:
        raise ValueError(f"CFG parallel needs a cfg axis of size 2, got {dist.get_world_size(cfg_group)}.")
    hook = CfgParallelHook(cfg_group)
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, HOOK_NAME)
    transformer.register_forward_pre_hook(hook.record_latents, prepend=True, with_kwargs=True)
    return hook
