"""The trained pipeline as a diffusers directory: ``save_pretrained`` with the trained transformer.

The full transformer state is gathered from the FSDP shards (``get_model_state_dict`` with
``full_state_dict``: collective, every rank calls it); rank 0 loads a fresh copy of the pipeline,
puts the weights in (LoRA adapters injected alike, then merged into their base weights) and saves
it. ``meshsp generate --model DIR/pipeline`` loads the result.

Example::

    export_pipeline(trainer, "runs/a/pipeline")
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

__all__ = ["export_pipeline"]


def export_pipeline(trainer, path: str | Path) -> Path:
    """Save ``trainer``'s pipeline with its trained transformer at ``path`` (written by rank 0).

    Example::

        export_pipeline(trainer, "runs/a/pipeline")   # every rank calls it
        DiffusionPipeline.from_pretrained("runs/a/pipeline")
    """
    from meshsp.train.loop import load_frozen_pipeline
    from meshsp.train.parallel import add_lora, merge_lora

    state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = Path(path)
    if rank == 0:
        pipe = load_frozen_pipeline(trainer.train.model)
        if trainer.train.lora_rank > 0:
            add_lora(pipe.transformer, trainer.train.lora_rank)
        pipe.transformer.load_state_dict(state, strict=True)
        if trainer.train.lora_rank > 0:
            merge_lora(pipe.transformer)
        pipe.transformer.requires_grad_(False)
        pipe.save_pretrained(path, safe_serialization=True)
    if dist.is_initialized():
        dist.barrier()
    return path
