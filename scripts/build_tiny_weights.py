"""Reproduce the trained weights the tiny embedded pipelines ship (``meshsp/assets/``).

The tiny pipelines are built from configs with seeded random weights; random weights draw noise. This
script teaches one of them to draw the generated shapes dataset (``meshsp.train.shapes``: circles,
squares, triangles and stars in six colours on plain backgrounds, captioned):

1. **The VAE** learns to encode and decode those pictures: an autoencoder fit (reconstruction plus a
   small KL term) of the pipeline's own VAE, for ``--vae-steps`` steps.
2. **The transformer** is fine-tuned with ``meshsp train`` (flow matching, full fine-tune) on the
   same dataset through the fitted VAE, for ``--steps`` steps.
3. The fitted VAE's and the trained transformer's weights (and the VAE's latent statistics, which
   the pipeline normalises latents with) are written to ``meshsp/assets/<name>.safetensors``, which ``meshsp.pipelines.build_tiny_pipeline`` loads over the
   seeded initialisation (the text encoder stays as built: it is random but deterministic, and the
   transformer learns from its embeddings).

Run from the repository root (a few CPU minutes)::

    python scripts/build_tiny_weights.py --name tiny-qwen-image
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("transformer", "vae")


def _images(vae_images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> the VAE's [B, 3, 1, H, W] (a one-frame video: the Qwen-Image VAE is a video VAE)."""
    return vae_images[:, :, None]


def fit_vae(vae, steps: int, batch: int, size: int, seed: int, lr: float = 2e-3, kl: float = 1e-4) -> list[float]:
    """Fit ``vae`` (in place) as an autoencoder of the shapes dataset; returns the loss per step."""
    from meshsp.train.shapes import ShapesDataset

    data = ShapesDataset(steps * batch, size=size, seed=seed + 1)  # not the transformer's samples
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    losses = []
    for step in range(steps):
        x = torch.stack([data[step * batch + i][0] for i in range(batch)])
        posterior = vae.encode(_images(x)).latent_dist
        z = posterior.sample(generator=torch.Generator().manual_seed(step))
        recon = vae.decode(z).sample[:, :, 0]
        loss = torch.nn.functional.mse_loss(recon, x) + kl * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step}: loss {loss.item():.4f}", flush=True)
    vae.eval()
    return losses


def latent_statistics(vae, n: int, size: int, seed: int) -> dict[str, list[float]]:
    """Per-channel mean and std of the fitted VAE's latent means over ``n`` pictures: the pipeline
    normalises latents with them (``latents_mean`` / ``latents_std``), so the transformer sees unit scale."""
    from meshsp.train.shapes import ShapesDataset

    data = ShapesDataset(n, size=size, seed=seed + 2)
    with torch.no_grad():
        z = torch.cat([vae.encode(_images(data[i][0][None])).latent_dist.mean for i in range(n)])
    dims = [0, 2, 3, 4]
    return {"latents_mean": z.mean(dims).tolist(), "latents_std": z.std(dims).tolist()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="tiny-qwen-image")
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--vae-resolution", type=int, default=64,
                        help="pictures the VAE is fitted on (convolutional: it then codes any size)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--dataset-size", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="keep intermediate files here (default: a temporary directory)")
    args = parser.parse_args(argv)

    from safetensors.torch import save_file

    from meshsp.pipelines import build_tiny_pipeline

    torch.manual_seed(args.seed)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="meshsp-tiny-"))
    started = time.perf_counter()
    pipe = build_tiny_pipeline(args.name, trained=False)
    vae_losses = fit_vae(pipe.vae, args.vae_steps, args.vae_batch, args.vae_resolution, args.seed)
    stats = latent_statistics(pipe.vae, 256, args.resolution, args.seed)
    pipe.vae.register_to_config(**stats)
    print(f"latent mean {[round(x, 3) for x in stats['latents_mean']]}, std {[round(x, 3) for x in stats['latents_std']]}")
    base = work / "with-vae"
    pipe.save_pretrained(base, safe_serialization=True)
    vae_seconds = time.perf_counter() - started

    out = work / "train"
    command = [sys.executable, "-m", "meshsp.cli", "train", "--model", str(base), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--learning-rate", str(args.learning_rate),
               "--resolution", str(args.resolution), "--seed", str(args.seed), "--output", str(out),
               "--dataset-size", str(args.dataset_size), "--checkpoint-every", str(args.steps)]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    from diffusers import DiffusionPipeline

    trained = DiffusionPipeline.from_pretrained(out / "pipeline")
    tensors = {f"{c}.{k}": v.detach().contiguous() for c in COMPONENTS
               for k, v in getattr(trained, c).state_dict().items()}
    target = ROOT / "meshsp" / "assets" / f"{args.name}.safetensors"
    target.parent.mkdir(exist_ok=True)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    save_file(tensors, target, metadata={"vae_config": json.dumps(stats),
        "vae_steps": str(args.vae_steps), "vae_loss_first": f"{vae_losses[0]:.4f}",
        "vae_loss_last": f"{vae_losses[-1]:.4f}", "steps": str(args.steps),
        "loss_first": f"{metrics[0]['loss']:.4f}", "loss_last": f"{metrics[-1]['loss']:.4f}",
        "seconds": f"{time.perf_counter() - started:.0f}", "vae_seconds": f"{vae_seconds:.0f}"})
    print(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB): VAE loss {vae_losses[0]:.4f} -> "
          f"{vae_losses[-1]:.4f}, flow loss {metrics[0]['loss']:.4f} -> {metrics[-1]['loss']:.4f}, "
          f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
