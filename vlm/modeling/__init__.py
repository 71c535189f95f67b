"""The network: vision towers, the projector, and `VisionLanguageModule` (encode_images / embed / forward)."""

from vlm.modeling.loading import check_memory, load_backbones, resolve_reference
from vlm.modeling.model import ModelOutput, VisionLanguageModule, resolve_config
from vlm.modeling.projector import build_projector
from vlm.modeling.towers import HFCLIPTower, OpenCLIPTower, VisionTower, build_vision_tower

__all__ = [
    "HFCLIPTower",
    "ModelOutput",
    "OpenCLIPTower",
    "VisionLanguageModule",
    "VisionTower",
    "build_projector",
    "build_vision_tower",
    "check_memory",
    "load_backbones",
    "resolve_config",
    "resolve_reference",
]
