"""Conversion to other runtimes: the transformers LLaVA format (served by vLLM and SGLang).

`to_llava_hf` builds a `transformers.LlavaForConditionalGeneration` holding the same weights as a
`VisionLanguageModel`, so both compute the same function.
"""

from __future__ import annotations

from typing import Any

import torch

from vlm.errors import ConfigError
from vlm.model import VisionLanguageModel
from vlm.projector import parse_projector_type
from vlm.vision import HFCLIPTower

__all__ = ["to_llava_hf"]


def _llava_config(model: VisionLanguageModel) -> Any:
    from transformers import LlavaConfig

    if not isinstance(model.vision, HFCLIPTower):
        raise ConfigError("LLaVA export currently needs a transformers CLIP tower (vision_backend='hf')")
    if parse_projector_type(model.config.projector_type) != 2:
        raise ConfigError(
            f"transformers LLaVA has a two-layer projector; cannot export a {model.config.projector_type} projector"
        )
    return LlavaConfig(
        vision_config=model.vision.model.config.to_dict(),
        text_config=model.lm.config.to_dict(),
        image_token_id=model.config.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if model.config.select_feature == "patch" else "full",
        vision_feature_layer=model.config.select_layer,
        image_seq_length=model.num_image_tokens,
        multimodal_projector_bias=True,
        tie_word_embeddings=model.lm.config.tie_word_embeddings,
    )


@torch.no_grad()
def to_llava_hf(model: VisionLanguageModel) -> Any:
    """An in-memory `LlavaForConditionalGeneration` with this model's weights (same device and dtype)."""
    from transformers import LlavaForConditionalGeneration

    config = _llava_config(model)
    llava = LlavaForConditionalGeneration(config).to(device=model.device, dtype=model.dtype).eval()
    llava.model.vision_tower.load_state_dict(model.vision.model.state_dict())
    projector = llava.model.multi_modal_projector
    projector.linear_1.load_state_dict(model.projector[0].state_dict())
    projector.linear_2.load_state_dict(model.projector[2].state_dict())
    llava.model.language_model.load_state_dict(model.lm.get_decoder().state_dict())
    llava.lm_head.load_state_dict(model.lm.get_output_embeddings().state_dict())
    return llava
