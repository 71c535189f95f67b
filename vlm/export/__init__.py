"""Conversion to and from other runtimes.

- `export_llava_hf` (llava_hf.py): a directory that `transformers.LlavaForConditionalGeneration` and
  `AutoProcessor` load, so vLLM and SGLang can serve the model; `to_llava_hf` is the in-memory model it writes.
- `export_gguf_mmproj` (gguf.py): the vision tower and projector as a llama.cpp mmproj GGUF (LLaVA-1.5 layout).
- `import_llava` (import_llava.py): an adapter directory from an original LLaVA `mm_projector.bin` / `.safetensors`.

Both exports take an adapter directory or a loaded `vlm.VisionLanguageModel`. open_clip towers laid out like
OpenAI's CLIP are converted to transformers `CLIPVisionModel` weights (towers.py), so both work for them too.
"""

from vlm.export.gguf import FEATURE_LAYER_KEY, export_gguf_mmproj
from vlm.export.import_llava import import_llava
from vlm.export.llava_hf import LOAD_TIME_SETTINGS, chatml_template, export_llava_hf, lm_checkpoint_dtype, to_llava_hf
from vlm.export.towers import open_clip_to_hf

__all__ = [
    "FEATURE_LAYER_KEY",
    "LOAD_TIME_SETTINGS",
    "chatml_template",
    "export_gguf_mmproj",
    "export_llava_hf",
    "import_llava",
    "lm_checkpoint_dtype",
    "open_clip_to_hf",
    "to_llava_hf",
]
