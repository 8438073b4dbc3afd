"""Training (meshsp.train, meshsp train): layouts against one process, adapters against their
pipelines, resume, LoRA, export, the CLI, every refusal."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_tasks
from meshsp.config import ParallelConfig
from meshsp.pipelines import tiny_pipeline_path
from meshsp.train import TrainConfig, check_run, train
from meshsp.train.adapters import adapter_for
from meshsp.train.data import FolderDataset, check_folder, local_batch
from meshsp.train.flow import sample_generator
from meshsp.train.loop import Trainer, load_frozen_pipeline
from meshsp.train.shapes import ShapesDataset

# 64 px: 16 image tokens (4 per rank on 4 ranks); the text lengths differ per caption (a padding mask).
TRAIN = dict(model="tiny-qwen-image", batch_size=4, resolution=64, learning_rate=1e-3, output="unused")
UAA = "advanced_uaa"
LAYOUTS_2 = {"dp2": dict(data_parallel_size=2), "U2": dict(ulysses_degree=2, ulysses_mode=UAA)}
LAYOUTS_4 = {"dp2xU2": dict(data_parallel_size=2, ulysses_degree=2, ulysses_mode=UAA),
             "U2xR2": dict(ulysses_degree=2, ring_degree=2, ulysses_mode=UAA)}


@pytest.fixture(scope="module")
def reference():
    """One process: the first three losses and the gradients of step 0 (the same global batch and seed)."""
    return train_tasks.losses(TRAIN, {}, 3, with_grads=True)


@pytest.fixture(scope="module")
def layouts(pools):
    out = {name: pools(2).run(train_tasks.losses, TRAIN, par, 3, True)[0] for name, par in LAYOUTS_2.items()}
    out["U2+checkpointing"] = pools(2).run(train_tasks.losses, dict(TRAIN, activation_checkpointing=True),
                                           LAYOUTS_2["U2"], 1, True)[0]
    out.update({name: pools(4).run(train_tasks.losses, TRAIN, par, 3, True)[0] for name, par in LAYOUTS_4.items()})
    return out


def _close_grads(got: dict, want: dict, layout: str) -> None:
    assert sorted(got) == sorted(want), layout
    for name, ref in want.items():
        scale = ref.abs().max().item() or 1.0
        torch.testing.assert_close(got[name], ref, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{layout} {name}: {m}")


@pytest.mark.parametrize("layout", [*LAYOUTS_2, "U2+checkpointing", *LAYOUTS_4])
def test_layout_matches_one_process(layouts, reference, layout):
    got = layouts[layout]
    n = len(got["losses"])
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(reference["losses"][:n]), rtol=1e-5, atol=1e-6)
    _close_grads(got["grads"], reference["grads"], layout)
    if layout != "dp2":  # the sequence really is split: attention exchanges bytes
        assert got["bytes"] > 0, layout
    world = 4 if layout in LAYOUTS_4 else 2
    local, total = got["numel"]  # sharded over every rank, dp x sp (torch.chunk sizes: ceil per weight)
    assert total / world <= local <= 1.15 * total / world, (layout, local, total)
    assert (got["checkpointed"] > 0) == layout.endswith("checkpointing")
    assert any(g.abs().sum() > 0 for g in got["grads"].values())


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-wan"])
def test_other_families_on_ulysses_match_one_process(pools, model):
    """Flux and Wan through their adapters on U2: the loss and every gradient of step 0 as one process."""
    train = dict(TRAIN, model=model)
    want = train_tasks.losses(train, {}, 1, with_grads=True)
    got = pools(2).run(train_tasks.losses, train, LAYOUTS_2["U2"], 1, True)[0]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-5, atol=1e-6)
    _close_grads(got["grads"], want["grads"], f"{model} U2")
    assert got["bytes"] > 0


@pytest.mark.parametrize("name", ["tiny-qwen-image", "tiny-flux", "tiny-wan"])
def test_adapter_prediction_is_the_pipelines(name):
    """The transformer prediction the adapter makes equals the pipeline's own first-step call."""
    pipe = load_frozen_pipeline(name)
    adapter = adapter_for(pipe, 64)
    captions = ["a red circle on a white background", "a blue star on a black background"]
    x0 = adapter.encode_images(ShapesDataset(2, size=64)[0][0][None].repeat(2, 1, 1, 1),
                               [sample_generator(0, 0, i, "vae") for i in range(2)])
    x_t = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    seen = []
    hook = pipe.transformer.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append((kwargs["hidden_states"].clone(), out[0].clone())), with_kwargs=True)
    pipe(prompt=captions, latents=x_t, num_inference_steps=2, output_type="latent", **adapter.call_kwargs())
    hook.remove()
    first_input, first_output = seen[0]
    assert torch.equal(first_input, x_t)
    with torch.no_grad():
        mine = adapter.predict(pipe.transformer, x_t, pipe.scheduler.timesteps[0].expand(2), adapter.encode_text(captions))
    assert torch.equal(mine, first_output), (mine - first_output).abs().max()


@pytest.mark.parametrize("name,img2img", [("tiny-qwen-image", "QwenImageImg2ImgPipeline"),
                                          ("tiny-flux", "FluxImg2ImgPipeline")])
def test_adapter_latents_are_the_pipelines(name, img2img):
    """The latents equal the img2img pipeline's own VAE encoding, packed as its prepare_latents packs."""
    import diffusers

    pipe = load_frozen_pipeline(name)
    other = getattr(diffusers, img2img)(**pipe.components)
    adapter = adapter_for(pipe, 64)
    images = torch.stack([ShapesDataset(2, size=64)[i][0] for i in range(2)])
    mine = adapter.encode_images(images, [sample_generator(0, 0, i, "vae") for i in range(2)])
    theirs_in = images[:, :, None] if name == "tiny-qwen-image" else images
    theirs = other._encode_vae_image(theirs_in, [sample_generator(0, 0, i, "vae") for i in range(2)])
    theirs = theirs[:, :, 0] if name == "tiny-qwen-image" else theirs
    b, c, h, w = theirs.shape
    assert torch.equal(mine, other._pack_latents(theirs, b, c, h, w))


def test_resume_is_bit_identical(pools, tmp_path):
    """Steps 0..4 equal steps 0..2 + resume + 3..4 exactly: losses and the trained weights."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    out = pools(2).run(train_tasks.resume_runs, dict(TRAIN, checkpoint_every=2), LAYOUTS_2["dp2"],
                       str(whole), str(split))[0]
    assert [r["step"] for r in out["resumed"]] == [3, 4]
    assert [r["loss"] for r in out["whole"][3:]] == [r["loss"] for r in out["resumed"]]
    rows = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in out["whole"]]
    a = load_file(whole / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(split / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["step-2", "step-3", "step-4", "step-5"]
    # The dp2 checkpoint loads into another layout (DCP reshards): one process, nothing left to train.
    single = tmp_path / "single"
    shutil.copytree(split, single)
    resumed = Trainer(TrainConfig(**dict(TRAIN, steps=5, output=str(single), resume=True)), progress=False)
    assert resumed.run() == [] and resumed.step == 5
    c = load_file(single / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_lora_trains_adapters_only_and_exports(pools, tmp_path):
    out_dir = tmp_path / "lora"
    got = pools(2).run(train_tasks.lora_run, dict(TRAIN, lora_rank=4, steps=3, output=str(out_dir)),
                       LAYOUTS_2["U2"])[0]
    assert got["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in got["trainable"])
    assert any(n.endswith("attn.add_q_proj.lora_A.default.weight") for n in got["trainable"])  # the text stream too
    assert got["frozen"] > len(got["trainable"])
    want = train_tasks.losses(dict(TRAIN, lora_rank=4), {}, 3)["losses"]  # LoRA on one process
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want), rtol=1e-5, atol=1e-6)
    trained = load_file(out_dir / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    base = load_file(tiny_pipeline_path("tiny-qwen-image") / "transformer" / "diffusion_pytorch_model.safetensors")
    assert sorted(trained) == sorted(base)  # merged: no adapter weights left
    changed = {k for k in base if not torch.equal(trained[k], base[k])}
    assert changed and all(".attn." in k and k.endswith(".weight") for k in changed), sorted(changed)
    pipe = load_frozen_pipeline(str(out_dir / "pipeline"))
    image = pipe("a red circle", height=64, width=64, num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def _folder(path, n: int = 4):
    path.mkdir()
    for i in range(n):
        image, caption = ShapesDataset(n, size=40, seed=1)[i]
        from PIL import Image

        Image.fromarray(((image + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(path / f"s{i}.png")
        (path / f"s{i}.txt").write_text(caption + "\n")
    return path


def test_cli_end_to_end(tmp_path, capfd):
    """meshsp train on two spawned ranks from a folder, then meshsp generate from what it exported."""
    from meshsp.cli import main

    data, out = _folder(tmp_path / "data"), tmp_path / "run"
    assert main(["train", "--model", "tiny-qwen-image", "--steps", "4", "--batch-size", "2", "--resolution", "32",
                 "--data", str(data), "--output", str(out), "--data-parallel-size", "2", "--checkpoint-every", "2",
                 "--activation-checkpointing", "--learning-rate", "1e-3"]) == 0
    printed = capfd.readouterr().out  # the progress lines come from the spawned rank 0
    assert "step 4/4" in printed and f"{out}/pipeline" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all({"step", "loss", "lr", "seconds"} <= set(r) and r["loss"] > 0 for r in rows)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert main(["generate", "--model", str(out / "pipeline"), "--width", "32", "--height", "32",
                 "--num-inference-steps", "2", "--output", str(tmp_path / "out.png")]) == 0
    assert (tmp_path / "out.png").is_file()
    example = subprocess.run([sys.executable, "examples/training/train.py", "--help"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert example.returncode == 0 and "--data-parallel-size" in example.stdout and "--lora-rank" in example.stdout


def test_folder_dataset_and_batch_slices(tmp_path):
    data = FolderDataset(_folder(tmp_path / "d", 3), size=32)
    image, caption = data[1]
    assert image.shape == (3, 32, 32) and -1 <= image.min() and image.max() <= 1 and caption.startswith("a ")
    whole = local_batch(data, step=1, batch_size=4, data_rank=0, data_ranks=1)
    halves = [local_batch(data, step=1, batch_size=4, data_rank=d, data_ranks=2) for d in range(2)]
    assert whole[1] == halves[0][1] + halves[1][1] and halves[1][2] == [2, 3]
    assert torch.equal(whole[0], torch.cat([halves[0][0], halves[1][0]]))
    from PIL import Image

    wide = tmp_path / "wide"
    wide.mkdir()
    Image.new("RGB", (90, 30), (255, 0, 0)).save(wide / "w.jpg")  # resized to 32 high, centre-cropped
    (wide / "w.txt").write_text("a red background\n")
    image, caption = FolderDataset(wide, size=32)[0]
    assert image.shape == (3, 32, 32) and caption == "a red background"
    assert image[0].min() > 0.95 and image[1:].max() < -0.95


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(batch_size=-2), "batch_size"),
    (dict(learning_rate=0), "learning_rate must be a positive number"),
    (dict(lora_rank=-1), "lora_rank"),
    (dict(resolution=50), r"resolution=50 must be a multiple of 16 .*; try 48"),
    (dict(model=""), "model must be"),
    (dict(output=""), "output must be"),
])
def test_train_config_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("parallel,match", [
    (dict(data_parallel_size=3), "batch_size=4 is not divisible by data_parallel_size=3"),
    (dict(tensor_parallel_size=2), "does not support tensor parallelism"),
    (dict(cfg_degree=2), "cfg_degree=2: training"),
])
def test_layout_refusals(parallel, match):
    with pytest.raises(ValueError, match=match):
        check_run(TrainConfig(batch_size=4), ParallelConfig(**parallel))


def test_data_refusals(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        check_folder(tmp_path / "nowhere")
    folder = _folder(tmp_path / "d", 2)
    (folder / "extra.png").write_bytes((folder / "s0.png").read_bytes())
    (folder / "lonely.txt").write_text("a caption")
    with pytest.raises(ValueError, match=r"without a \.txt caption \['extra.png'\].*without an image \['lonely.txt'\]"):
        check_folder(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        check_folder(tmp_path / "empty")


def test_refused_before_any_rank_starts(tmp_path, monkeypatch, capsys):
    """train() and meshsp train refuse a bad run without starting ranks or writing anything."""
    import meshsp.launch

    def no_pool(*args, **kwargs):
        raise AssertionError("a rank was started")

    monkeypatch.setattr(meshsp.launch, "WorkerPool", no_pool)
    with pytest.raises(ValueError, match="does not exist"):
        train(TrainConfig(data=str(tmp_path / "none"), output=str(tmp_path / "o")), ParallelConfig(data_parallel_size=2))
    from meshsp.cli import main

    with pytest.raises(SystemExit, match="meshsp train: batch_size=3 is not divisible by data_parallel_size=2"):
        main(["train", "--batch-size", "3", "--data-parallel-size", "2", "--output", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="data_parallel_size must be a positive integer"):
        main(["train", "--data-parallel-size", "0", "--output", str(tmp_path / "o")])
    done = tmp_path / "done"
    (done / "checkpoints" / "step-7").mkdir(parents=True)
    (done / "checkpoints" / "step-7" / "trainer.json").write_text('{"step": 7}')
    with pytest.raises(ValueError, match="already holds checkpoints \\(step-7\\); pass resume=True"):
        train(TrainConfig(output=str(done)), ParallelConfig(data_parallel_size=2))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="torchrun started 3 processes but the layout needs"):
        check_run(TrainConfig(), ParallelConfig(data_parallel_size=2))
    assert not (tmp_path / "o").exists()


def test_other_refusals(tmp_path):
    with pytest.raises(ValueError, match="training does not know"):
        adapter_for(object(), 64)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="training does not know StableDiffusionPipeline"):
        check_run(TrainConfig(model=str(tmp_path)), ParallelConfig())
    check_run(TrainConfig(model=str(tiny_pipeline_path("tiny-flux")), output=str(tmp_path / "o")), ParallelConfig())
    with pytest.raises(ValueError, match="data_parallel_size=2 is for training"):
        from meshsp.recipe import parallelize_pipeline

        parallelize_pipeline(object(), ParallelConfig(data_parallel_size=2))
    with pytest.raises(ValueError, match="data_parallel_size=2 is for training"):
        from meshsp.engine import Engine

        Engine("tiny-qwen-image", ParallelConfig(data_parallel_size=2))
    assert ParallelConfig(data_parallel_size=2, ulysses_degree=2).world_size == 4
