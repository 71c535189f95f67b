"""The trainable projector from vision features to LM embeddings, with LLaVA-compatible weights.

`build_projector` returns a plain `nn.Sequential`, so its state-dict keys (`0.weight`, `2.weight`, ...)
are exactly LLaVA's `model.mm_projector.*` keys without the prefix.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from vlm.errors import ConfigError

__all__ = ["build_projector", "load_llava_projector", "parse_projector_type"]

LLAVA_PREFIX = "model.mm_projector."
_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def parse_projector_type(projector_type: str) -> int:
    """Number of linear layers for a projector type name; raises ConfigError on an unknown one."""
    if projector_type == "linear":
        return 1
    match = _MLP.match(projector_type)
    if match and int(match.group(1)) >= 1:
        return int(match.group(1))
    raise ConfigError(f"unknown projector type {projector_type!r}: use 'linear' or 'mlpNx_gelu' (e.g. 'mlp2x_gelu')")


def build_projector(projector_type: str, vision_dim: int, lm_dim: int) -> nn.Sequential:
    """(B, N, vision_dim) -> (B, N, lm_dim). `mlp2x_gelu` is Linear, GELU, Linear as in LLaVA-1.5."""
    depth = parse_projector_type(projector_type)
    layers: list[nn.Module] = [nn.Linear(vision_dim, lm_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(lm_dim, lm_dim)]
    return nn.Sequential(*layers)


def load_llava_projector(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an original LLaVA `mm_projector.bin` / `.safetensors` into our projector's key names.

    Pickle files are read with `weights_only=True`, so they cannot run code.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"projector file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors come in many types
            raise ConfigError(f"{path} is not a loadable weights-only PyTorch file: {e}") from e
    if not isinstance(state, dict) or not state:
        raise ConfigError(f"{path} holds no state dict")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key[len(LLAVA_PREFIX) :] if key.startswith(LLAVA_PREFIX) else key
        if name in ("weight", "bias"):  # LLaVA's linear projector is a bare nn.Linear
            name = f"0.{name}"
        if not re.fullmatch(r"\d+\.(weight|bias)", name):
            raise ConfigError(f"{path}: unexpected key {key!r}; expected '{LLAVA_PREFIX}<i>.weight' keys")
        out[name] = value
    return out
