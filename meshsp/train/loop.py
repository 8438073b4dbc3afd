"""The training loop: one rank's pipeline, its transformer made trainable, AdamW, metrics, export.

``Trainer(train, parallel)`` runs on every rank of the world (under torchrun, or on the ranks
``meshsp.train.launch`` spawns); ``run()`` trains ``train.steps`` steps and writes, from rank 0,
``DIR/metrics.jsonl`` (one object per step, appended as it ends: ``step``, ``loss``, ``lr``, ``seconds``),
``DIR/loss.png`` (with matplotlib), ``DIR/checkpoints/step-N`` (every rank) and at the end the
pipeline with the trained transformer, LoRA merged, at ``DIR/pipeline``.

Example::

    trainer = Trainer(TrainConfig(model="tiny-qwen-image", steps=30, output="runs/a"), ParallelConfig())
    losses = trainer.run()
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from meshsp.config import ParallelConfig
from meshsp.train.adapters import adapter_for
from meshsp.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from meshsp.train.config import TrainConfig
from meshsp.train.data import local_batch, make_dataset
from meshsp.train.launch import check_run
from meshsp.train.flow import draw_noise, flow_loss, noisy_and_target, sample_generator
from meshsp.train.parallel import mean_over_ranks, prepare_transformer, train_mesh, trainable_parameters
from meshsp.train.report import MetricsLog

__all__ = ["Trainer", "load_frozen_pipeline"]

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def load_frozen_pipeline(model: str):
    """The pipeline in float32 with every component frozen and in eval mode."""
    from diffusers import DiffusionPipeline

    from meshsp.engine import resolve_model

    pipe = DiffusionPipeline.from_pretrained(resolve_model(model), dtype=torch.float32)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Trainer:
    """One rank's part of a fine-tuning run (see the module docstring).

    Example::

        Trainer(TrainConfig(steps=5, batch_size=4, output="runs/b"), ParallelConfig(data_parallel_size=2)).run()
    """

    def __init__(self, train: TrainConfig, parallel: ParallelConfig | None = None, *, progress: bool = True) -> None:
        parallel = parallel or ParallelConfig()
        check_run(train, parallel)  # every refusal of train(), also for this way in
        self.train, self.parallel = train, parallel
        self.dataset = make_dataset(train.data, train.resolution, seed=train.seed, n=train.dataset_size)
        self.pipe = load_frozen_pipeline(train.model)
        self.adapter = adapter_for(self.pipe, train.resolution)
        self.mesh = train_mesh(parallel)
        self.data_rank = self.mesh.get_local_rank("dp") if self.mesh is not None and parallel.data_parallel_size > 1 else 0
        self.model = prepare_transformer(self.pipe.transformer, self.mesh, parallel, lora_rank=train.lora_rank,
                                         activation_checkpointing=train.activation_checkpointing, seed=train.seed)
        self.optimizer = torch.optim.AdamW(trainable_parameters(self.model), lr=train.learning_rate, weight_decay=0.0)
        self.progress = progress and _rank() == 0
        self.run_dir = Path(train.output)
        self.step = 0

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """This data rank's ``(x_t, target, timesteps, text)`` of ``step``: the same on each of its sequence ranks."""
        t = self.train
        images, captions, positions = local_batch(self.dataset, step=step, batch_size=t.batch_size,
                                                  data_rank=self.data_rank, data_ranks=self.parallel.data_parallel_size)
        vae_generators = [sample_generator(t.seed, step, p, stream="vae") for p in positions]
        x0 = self.adapter.encode_images(images, vae_generators)
        noise, timesteps = draw_noise(x0, seed=t.seed, step=step, positions=positions)
        x_t, target = noisy_and_target(x0, noise, timesteps)
        return x_t, target, timesteps, self.adapter.encode_text(captions)

    def loss(self, step: int) -> torch.Tensor:
        """The full-sequence loss of this data rank's samples of ``step`` (differentiable)."""
        x_t, target, timesteps, text = self.batch(step)
        prediction = self.adapter.predict(self.model, x_t, timesteps, text)
        return flow_loss(prediction, target)

    def train_step(self) -> float:
        """One optimizer step; returns the global batch's mean loss (the same on every rank)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.step)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return float(mean_over_ranks(loss, self.mesh))

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint of the run directory; False when there is none."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return False
        self.step = load_checkpoint(path, model=self.model, optimizer=self.optimizer)
        return True

    def run(self) -> list[dict]:
        """Train to ``train.steps`` (from the checkpoint with ``resume``); the metrics of the steps run here."""
        t = self.train
        if t.resume and not self.resume() and self.progress:
            print(f"no checkpoint under {self.run_dir / 'checkpoints'}; starting at step 0", flush=True)
        log = MetricsLog(self.run_dir, self.step) if _rank() == 0 else None
        records = []
        while self.step < t.steps:
            start = time.perf_counter()
            loss = self.train_step()
            record = {"step": self.step - 1, "loss": loss, "lr": t.learning_rate,
                      "seconds": round(time.perf_counter() - start, 4)}
            records.append(record)
            if log is not None:
                log.append(record)
            if self.progress:
                print(f"step {self.step}/{t.steps}  loss {loss:.5f}  lr {t.learning_rate:g}  "
                      f"{record['seconds']:.2f} s", flush=True)
            if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < t.steps:
                save_checkpoint(self.run_dir, step=self.step, model=self.model, optimizer=self.optimizer)
        save_checkpoint(self.run_dir, step=self.step, model=self.model, optimizer=self.optimizer)
        if log is not None:
            log.plot()
        from meshsp.train.export import export_pipeline

        export_pipeline(self, self.run_dir / "pipeline")
        return records
