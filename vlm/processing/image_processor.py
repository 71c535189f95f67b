"""Image preprocessing: an RGB image -> normalised pixels of the tower's size (pad / resize / crop, mean and std)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vlm.errors import ConfigError

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "ImageProcessor", "preprocess_image"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PAD_SIDE = 8192  # `pad`: longer sides are shrunk to this before padding (a 200 MB canvas at most)
MAX_CROP_RATIO = 16  # `crop`: of a longer side, only the centre 16 x the short side is resized


def preprocess_image(
    image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float], aspect: str = "pad"
) -> torch.Tensor:
    """RGB PIL image -> normalised (3, size, size) float32 tensor.

    `pad`: pad to a square with the mean colour, then resize (LLaVA-1.5); `resize`: squash to a square;
    `crop`: resize the short side to `size`, then centre-crop (CLIP's own transform, with transformers' crop offsets).
    """
    image = image.convert("RGB")
    width, height = image.size
    long, short = max(width, height), min(width, height)
    if aspect == "pad" and long > MAX_PAD_SIDE:
        # The square canvas would take long² pixels (a 60000 x 1 PNG of 256 bytes: 10 GB): shrink first, which
        # changes only images this large.
        scale = MAX_PAD_SIDE / long
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    elif aspect == "crop" and long > MAX_CROP_RATIO * short:
        # Resizing the short side to `size` would make the long one enormous: keep only the centre the crop takes
        # from, with a wide margin.
        kept = (MAX_CROP_RATIO * short, height) if width > height else (width, MAX_CROP_RATIO * short)
        left, top = (width - kept[0]) // 2, (height - kept[1]) // 2
        image = image.crop((left, top, left + kept[0], top + kept[1]))
        width, height = kept
    if aspect == "pad":
        if width != height:
            side = max(width, height)
            fill = tuple(int(m * 255) for m in mean)  # truncated, as LLaVA's expand2square and transformers
            square = Image.new("RGB", (side, side), fill)
            square.paste(image, ((side - width) // 2, (side - height) // 2))
            image = square
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    elif aspect == "resize":
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    elif aspect == "crop":
        # transformers' arithmetic (CLIPImageProcessor, LLaVA's, the llava-hf export's): the long side truncated,
        # the offsets too, where torchvision's CenterCrop rounds them half to even (one pixel apart for margins of
        # 3, 7, 11, ...).
        # `short` is still the short side: the cut above keeps it.
        new_w, new_h = (size, int(size * height / short)) if width == short else (int(size * width / short), size)
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    else:
        raise ConfigError(f"unknown image aspect mode {aspect!r}: use 'pad', 'resize' or 'crop'")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (pixels - mean_t) / std_t


@dataclass(frozen=True)
class ImageProcessor:
    """A tower's preprocessing: square side `size`, per-channel `mean` and `std`, and the `aspect` mode."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    aspect: str = "pad"

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """List of RGB images -> (B, 3, S, S) float32 pixels."""
        return torch.stack([preprocess_image(im, self.size, self.mean, self.std, self.aspect) for im in images])
