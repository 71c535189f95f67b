"""vlm: give the CausalLM 14B and 7B chat models eyes with a LLaVA-1.5-style vision adapter.

import vlm
model = vlm.load("runs/toy")
model.caption("cat.jpg")
model.ask("cat.jpg", "What colour is the cat?")
for piece in model.chat(messages, stream=True): ...
"""

from vlm.config import AdapterConfig
from vlm.errors import ConfigError, ImageError, InsufficientMemoryError, PromptError, VLMError
from vlm.generation import GenerationOptions
from vlm.images import load_image
from vlm.model import VisionLanguageModel, load

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
