"""The lmms-eval entry point (`lmms_eval.models` in pyproject.toml): registers `causallm_vlm`.

lmms-eval calls `manifest()` when it builds its model registry; the model class is imported only when a run asks
for it, so listing lmms-eval's models does not load torch models.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MODEL_ID", "manifest"]

MODEL_ID = "causallm_vlm"


def manifest() -> Any:
    """lmms-eval's ModelManifest for the adapter model (a chat model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, chat_class_path="vlm.evaluation.lmms_eval_model.CausalLMVLM")
