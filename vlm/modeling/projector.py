"""The trainable projector from vision features to LM embeddings, with LLaVA-compatible weights.

`build_projector` returns a plain `nn.Sequential`, so its state-dict keys (`0.weight`, `2.weight`, ...)
are exactly LLaVA's `model.mm_projector.*` keys without the prefix (`vlm.adapter.load_llava_projector` reads them).
"""

from __future__ import annotations

from torch import nn

from vlm.config import parse_projector_type

__all__ = ["build_projector"]


def build_projector(projector_type: str, vision_dim: int, lm_dim: int) -> nn.Sequential:
    """(B, N, vision_dim) -> (B, N, lm_dim). `mlp2x_gelu` is Linear, GELU, Linear as in LLaVA-1.5."""
    depth = parse_projector_type(projector_type)
    layers: list[nn.Module] = [nn.Linear(vision_dim, lm_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(lm_dim, lm_dim)]
    return nn.Sequential(*layers)
