"""Rank-side work of tests/test_train.py: losses and gradients of a few training steps per layout."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from meshsp.config import ParallelConfig
from meshsp.ops import record_comm
from meshsp.train.config import TrainConfig
from meshsp.train.loop import Trainer


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def gradients(trainer: Trainer, step: int) -> dict[str, torch.Tensor]:
    """Every trainable parameter's gradient of ``step``'s loss, whole (FSDP shards gathered)."""
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.loss(step).backward()
    grads = {}
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            # a parameter the loss does not reach has no gradient: zeros, as FSDP may report it
            grad = torch.zeros(p.shape) if p.grad is None else _full(p.grad).clone()
            grads[name.replace("._checkpoint_wrapped_module", "")] = grad
    trainer.optimizer.zero_grad(set_to_none=True)
    return grads


def losses(train: dict, parallel: dict, steps: int, with_grads: bool = False) -> dict:
    """Losses of ``steps`` optimizer steps (the global-batch mean, on every rank), and with
    ``with_grads`` the gradients of step 0 before any update."""
    trainer = Trainer(TrainConfig(**train), ParallelConfig(**parallel), progress=False)
    with record_comm() as stats:  # the plan really splits the sequence: attention sends bytes
        out = {"grads": gradients(trainer, 0) if with_grads else None}
    out["bytes"] = sum(stats.bytes_sent.values())
    params = list(trainer.model.parameters())  # FSDP: each rank keeps its shard of every weight
    out["numel"] = (sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
                    sum(p.numel() for p in params))
    out["checkpointed"] = sum("_checkpoint_wrapped_module" in n for n, _ in trainer.model.named_modules())
    out["losses"] = [trainer.train_step() for _ in range(steps)]
    return out


def resume_runs(train: dict, parallel: dict, whole: str, split: str) -> dict:
    """Steps 0..4 in one run into ``whole``; steps 0..2, then a resumed run to 4, into ``split``."""
    par = ParallelConfig(**parallel)
    train = {k: v for k, v in train.items() if k not in ("steps", "output", "resume")}
    one = Trainer(TrainConfig(**train, steps=5, output=whole), par, progress=False).run()
    Trainer(TrainConfig(**train, steps=3, output=split), par, progress=False).run()
    resumed = Trainer(TrainConfig(**train, steps=5, output=split, resume=True), par, progress=False)
    return {"whole": one, "resumed": resumed.run()}


def lora_run(train: dict, parallel: dict) -> dict:
    """A LoRA run: which parameters train, the losses, and what it exported."""
    trainer = Trainer(TrainConfig(**train), ParallelConfig(**parallel), progress=False)
    trainable = sorted(n.replace("._checkpoint_wrapped_module", "") for n, p in trainer.model.named_parameters()
                       if p.requires_grad)
    frozen = sum(1 for _, p in trainer.model.named_parameters() if not p.requires_grad)
    records = trainer.run()
    return {"trainable": trainable, "frozen": frozen, "losses": [r["loss"] for r in records]}
