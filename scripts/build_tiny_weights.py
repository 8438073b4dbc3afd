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


def fit_vae(vae, steps: int, batch: int, size: int, seed: int, lr: float = 3e-3, kl: float = 1e-4) -> list[float]:
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


def write_asset(name: str, run: Path, stats: dict, vae_fit: dict, train: dict) -> Path:
    """The trained run's transformer and VAE weights, and the VAE's latent statistics, as the asset."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    trained = DiffusionPipeline.from_pretrained(run / "pipeline")
    tensors = {f"{c}.{k}": v.detach().contiguous() for c in COMPONENTS
               for k, v in getattr(trained, c).state_dict().items()}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    target = ROOT / "meshsp" / "assets" / f"{name}.safetensors"
    target.parent.mkdir(exist_ok=True)
    save_file(tensors, target, metadata={
        "vae_config": json.dumps(stats), **{f"vae_{k}": str(v) for k, v in vae_fit.items()},
        **{k: str(v) for k, v in train.items()}, "steps": str(len(metrics)),
        "loss_first": f"{metrics[0]['loss']:.4f}", "loss_last": f"{metrics[-1]['loss']:.4f}"})
    print(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB): VAE loss {vae_fit['loss_first']} -> "
          f"{vae_fit['loss_last']}, flow loss {metrics[0]['loss']:.4f} -> {metrics[-1]['loss']:.4f}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="tiny-qwen-image")
    parser.add_argument("--vae-steps", type=int, default=2500)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--vae-resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=15000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dataset-size", type=int, default=384)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="keep intermediate files here (default: a temporary directory)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the fitted VAE in --work and continue its meshsp train run")
    args = parser.parse_args(argv)

    from meshsp.pipelines import build_tiny_pipeline

    torch.manual_seed(args.seed)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="meshsp-tiny-"))
    base, run = work / "with-vae", work / "train"
    if not (args.resume and (base / "vae_fit.json").is_file()):
        pipe = build_tiny_pipeline(args.name, trained=False)
        losses = fit_vae(pipe.vae, args.vae_steps, args.vae_batch, args.vae_resolution, args.seed)
        stats = latent_statistics(pipe.vae, 256, args.resolution, args.seed)
        pipe.vae.register_to_config(**stats)
        pipe.save_pretrained(base, safe_serialization=True)
        fit = {"steps": args.vae_steps, "loss_first": f"{losses[0]:.4f}", "loss_last": f"{losses[-1]:.4f}",
               "stats": stats}
        (base / "vae_fit.json").write_text(json.dumps(fit))
    fit = json.loads((base / "vae_fit.json").read_text())
    stats = fit.pop("stats")
    print(f"VAE: loss {fit['loss_first']} -> {fit['loss_last']} in {fit['steps']} steps; latent mean "
          f"{[round(x, 3) for x in stats['latents_mean']]}, std {[round(x, 3) for x in stats['latents_std']]}")

    command = [sys.executable, "-m", "meshsp.cli", "train", "--model", str(base), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--learning-rate", str(args.learning_rate),
               "--resolution", str(args.resolution), "--seed", str(args.seed), "--output", str(run),
               "--dataset-size", str(args.dataset_size), "--checkpoint-every", "2000"]
    command += ["--resume"] if args.resume else []
    print(" ".join(command), flush=True)
    trained = time.perf_counter()
    subprocess.run(command, check=True)
    write_asset(args.name, run, stats, fit, {
        "batch_size": args.batch_size, "learning_rate": f"{args.learning_rate:g}", "dataset_size": args.dataset_size,
        "transformer_seconds": f"{time.perf_counter() - trained:.0f}"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
