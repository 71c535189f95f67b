"""Frozen CLIP vision towers (transformers or open_clip).

A tower turns a batch of normalised pixels (B, 3, S, S) into patch features (B, N, D) taken from one
hidden layer, HF-style indexed: hidden state 0 is the embedding output, hidden state k the output of
block k, so -2 is the second-to-last block (LLaVA-1.5's choice).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vlm.config import AdapterConfig
from vlm.errors import ConfigError
from vlm.processing.image_processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor

__all__ = ["HFCLIPTower", "OpenCLIPTower", "VisionTower", "build_vision_tower"]


class VisionTower(nn.Module):
    """A frozen image encoder. Subclasses set the attributes below and implement `features`."""

    hidden_size: int
    """Width D of the features."""
    image_size: int
    """Side S of the square input, in pixels."""
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __init__(self, select_layer: int, select_feature: str, aspect: str) -> None:
        super().__init__()
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.aspect = aspect

    @property
    def num_patches(self) -> int:
        """Number N of feature tokens per image (patches, plus CLS with `cls_patch`)."""
        grid = (self.image_size // self.patch_size) ** 2
        return grid + (1 if self.select_feature == "cls_patch" else 0)

    @property
    def image_processor(self) -> ImageProcessor:
        """The preprocessing this tower expects: its size, mean and std, with the adapter's aspect mode."""
        return ImageProcessor(self.image_size, self.mean, self.std, self.aspect)

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VisionTower:
        # Frozen towers stay in eval mode whatever the parent module is switched to.
        return super().train(False)

    def features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> (CLS (B, 1, D), patches (B, N, D)) at the selected layer."""
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cls, patches = self.features(pixel_values)
        if self.select_feature == "cls_patch":
            return torch.cat([cls, patches], dim=1)  # (B, 1 + N, D)
        return patches  # (B, N, D)


class HFCLIPTower(VisionTower):
    """transformers `CLIPVisionModel` from a hub id or local path (a full CLIP checkpoint works too)."""

    def __init__(self, name_or_path: str, select_layer: int = -2, select_feature: str = "patch", aspect: str = "pad"):
        super().__init__(select_layer, select_feature, aspect)
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        try:
            config = CLIPVisionConfig.from_pretrained(name_or_path)
            self.model = CLIPVisionModel.from_pretrained(name_or_path, config=config)
        except OSError as e:
            raise ConfigError(f"could not load CLIP vision tower {name_or_path!r}: {e}") from e
        try:
            processor = CLIPImageProcessor.from_pretrained(name_or_path)
            self.mean, self.std = tuple(processor.image_mean), tuple(processor.image_std)
        except OSError:
            self.mean, self.std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        self.hidden_size = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        num_layers = config.num_hidden_layers
        if not -(num_layers + 1) <= select_layer <= num_layers:
            raise ConfigError(f"select_layer {select_layer} is out of range for a {num_layers}-layer tower")
        self.freeze()

    def features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        hidden = out.hidden_states[self.select_layer]  # (B, 1 + N, D)
        return hidden[:, :1], hidden[:, 1:]


class OpenCLIPTower(VisionTower):
    """The visual half of an open_clip model: `ViT-L-14-336` + a pretrained tag or checkpoint file,
    `hf-hub:org/repo`, or `local-dir:/path`. Only OpenAI-style `VisionTransformer` towers are supported.
    A tag that needs QuickGELU (`openai`) gets it; a checkpoint file of OpenAI weights needs the `-quickgelu`
    name (`ViT-L-14-336-quickgelu`), since a file does not say which activation it was trained with."""

    def __init__(
        self,
        name: str,
        pretrained: str | None = None,
        select_layer: int = -2,
        select_feature: str = "patch",
        aspect: str = "pad",
    ):
        super().__init__(select_layer, select_feature, aspect)
        import open_clip
        from open_clip.transformer import VisionTransformer

        if pretrained is None and not name.startswith(("hf-hub:", "local-dir:")):
            # open_clip would build the tower with random weights and only log a warning
            raise ConfigError(
                f"open_clip model {name!r} is a bare architecture name: give its weights as a pretrained tag "
                "(`openai`) or checkpoint file (vision_pretrained, `--vision-pretrained`), or name the tower "
                "`hf-hub:org/repo` or `local-dir:/path`"
            )
        try:
            # OpenAI's weights were trained with QuickGELU, which a plain name such as `ViT-L-14-336` does not build:
            # open_clip only warns, and the tower would run with GELU. The tag's own config says which it needs.
            quick_gelu = bool(
                pretrained
                and not Path(pretrained).is_file()
                and open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False)
            )
            clip = open_clip.create_model(name, pretrained=pretrained, device="cpu", force_quick_gelu=quick_gelu)
        except (OSError, RuntimeError, ValueError) as e:
            raise ConfigError(f"could not load open_clip model {name!r} (pretrained={pretrained!r}): {e}") from e
        visual = clip.visual
        if not isinstance(visual, VisionTransformer):
            raise ConfigError(
                f"open_clip model {name!r} has a {type(visual).__name__} tower; only ViT towers "
                "(open_clip VisionTransformer) are supported"
            )
        self.visual = visual
        del clip  # the text tower is not needed
        self.hidden_size = visual.transformer.width
        self.image_size = int(visual.image_size[0])
        self.patch_size = int(visual.patch_size[0])
        self.mean = tuple(getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN)
        self.std = tuple(getattr(visual, "image_std", None) or OPENAI_CLIP_STD)
        num_layers = len(visual.transformer.resblocks)
        layer = select_layer % (num_layers + 1)
        if not -(num_layers + 1) <= select_layer <= num_layers or layer == 0:
            raise ConfigError(
                f"select_layer {select_layer} is out of range for a {num_layers}-block open_clip tower "
                "(block outputs 1..N, or -1..-N, are supported)"
            )
        self.block_index = layer - 1  # HF hidden state k is the output of block k-1 (0-based)
        self.freeze()

    def features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.visual.forward_intermediates(
            pixel_values,
            indices=[self.block_index],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        return out["image_intermediates_prefix"][0], out["image_intermediates"][0]  # (B, 1, D), (B, N, D)


def build_vision_tower(config: AdapterConfig, vision_tower: str | None = None) -> VisionTower:
    """The tower named by `config` (or by `vision_tower`, a resolved path, when given)."""
    name = vision_tower or config.vision_tower
    if config.vision_backend == "hf":
        return HFCLIPTower(name, config.select_layer, config.select_feature, config.image_aspect)
    return OpenCLIPTower(
        name, config.vision_pretrained, config.select_layer, config.select_feature, config.image_aspect
    )
