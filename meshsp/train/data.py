"""Training data: a folder of captioned images, and each data rank's slice of a global batch.

Sample ``i`` of step ``s`` is ``dataset[(s * batch_size + i) % len(dataset)]`` whatever the layout;
data rank ``d`` of ``D`` takes positions ``d * B / D`` to ``(d + 1) * B / D`` of the global batch,
and every sequence-parallel rank of that data rank takes the same ones.

Example::

    data = FolderDataset("photos/", size=64)        # photos/cat.png + photos/cat.txt, ...
    images, captions, positions = local_batch(data, step=3, batch_size=8, data_rank=1, data_ranks=2)
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from meshsp.train.shapes import ShapesDataset, to_tensor

__all__ = ["IMAGE_SUFFIXES", "FolderDataset", "check_folder", "local_batch", "make_dataset"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def check_folder(folder: str | Path) -> list[tuple[Path, Path]]:
    """The ``(image, caption)`` file pairs of ``folder``, sorted by name; ``ValueError`` for a missing
    folder, an empty one, an image without a caption or a caption without an image (naming them)."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"data folder {str(root)!r} does not exist; give a folder of images with same-named .txt "
                         "captions, or leave data unset for the generated shapes dataset.")
    images = {p.stem: p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    captions = {p.stem: p for p in root.iterdir() if p.suffix == ".txt"}
    no_caption = sorted(images[s].name for s in set(images) - set(captions))
    no_image = sorted(captions[s].name for s in set(captions) - set(images))
    if no_caption or no_image:
        raise ValueError(f"data folder {str(root)!r}: images without a .txt caption {no_caption}, captions without an "
                         f"image {no_image}; every image needs a caption of the same name (cat.png + cat.txt).")
    if not images:
        raise ValueError(f"data folder {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}) with captions.")
    return [(images[s], captions[s]) for s in sorted(images)]


class FolderDataset(torch.utils.data.Dataset):
    """Images of a folder (resized and centre-cropped to ``size``) with their ``.txt`` captions.

    Example::

        image, caption = FolderDataset("photos/", size=64)[0]   # [3, 64, 64] in [-1, 1], the text
    """

    def __init__(self, folder: str | Path, *, size: int) -> None:
        self.pairs = check_folder(folder)
        self.size = size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image_path, caption_path = self.pairs[index]
        with Image.open(image_path) as image:
            image = image.convert("RGB")
            scale = self.size / min(image.size)
            w, h = max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))
            image = image.resize((w, h), Image.BICUBIC)
            left, top = (w - self.size) // 2, (h - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        return to_tensor(image), caption_path.read_text().strip()


def make_dataset(data: str | None, size: int, *, seed: int = 0, n: int = 4096) -> torch.utils.data.Dataset:
    """``FolderDataset(data)``, or the generated shapes when ``data`` is None."""
    if data is None:
        return ShapesDataset(n, size=size, seed=seed)
    return FolderDataset(data, size=size)


def local_batch(dataset, *, step: int, batch_size: int, data_rank: int, data_ranks: int
                ) -> tuple[torch.Tensor, list[str], list[int]]:
    """This data rank's ``(images [b, 3, S, S], captions, positions in the global batch)`` of ``step``."""
    local = batch_size // data_ranks
    positions = list(range(data_rank * local, (data_rank + 1) * local))
    samples = [dataset[(step * batch_size + p) % len(dataset)] for p in positions]
    return torch.stack([image for image, _ in samples]), [text for _, text in samples], positions
