"""vlm: give the CausalLM 14B and 7B chat models eyes with a LLaVA-1.5-style vision adapter.

import vlm
model = vlm.load("runs/toy")
model.caption("cat.jpg")
model.ask("cat.jpg", "What colour is the cat?")
for piece in model.chat(messages, stream=True): ...

Layers (each imports only those before it): processing -> modeling -> generation -> api -> cli / export.
See docs/architecture.md.
"""

from vlm.api import VisionLanguageModel, load
from vlm.config import AdapterConfig
from vlm.errors import ConfigError, ImageError, InsufficientMemoryError, PromptError, VLMError
from vlm.generation.options import GenerationOptions
from vlm.processing.images import load_image

__all__ = [
    "AdapterConfig",
    "ConfigError",
    "GenerationOptions",
    "ImageError",
    "InsufficientMemoryError",
    "PromptError",
    "VLMError",
    "VisionLanguageModel",
    "load",
    "load_image",
]

__version__ = "0.1.0"
