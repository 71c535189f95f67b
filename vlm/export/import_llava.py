"""Import an original LLaVA projector (`mm_projector.bin` / `.safetensors`) as an adapter directory."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch

from vlm.adapter import atomic_write, check_output_dir, load_llava_projector, write_adapter
from vlm.config import AdapterConfig
from vlm.errors import ConfigError
from vlm.modeling.towers import OpenCLIPTower

__all__ = ["import_llava"]


def _projector_type(state: Mapping[str, torch.Tensor], source: Path) -> str:
    """`linear` or `mlpNx_gelu` from the layer indices of LLaVA projector weights (0, 2, 4, ...)."""
    indices = sorted({int(key.split(".")[0]) for key in state})
    depth = len(indices)
    complete = all(f"{i}.{kind}" in state for i in indices for kind in ("weight", "bias"))
    if indices != list(range(0, 2 * depth, 2)) or not complete:
        raise ConfigError(
            f"{source}: projector layers {indices} are not LLaVA's linear layers 0, 2, 4, ... (with GELU between)"
        )
    return "linear" if depth == 1 else f"mlp{depth}x_gelu"


def _vision_width(vision_tower: str, vision_backend: str, vision_pretrained: str | None) -> int:
    """Feature width of the named tower, read from its config (HF) or the built tower (open_clip)."""
    if vision_backend == "hf":
        from transformers import CLIPVisionConfig

        try:
            return CLIPVisionConfig.from_pretrained(vision_tower).hidden_size
        except OSError as e:
            raise ConfigError(f"could not read the CLIP vision config of {vision_tower!r}: {e}") from e
    return OpenCLIPTower(vision_tower, vision_pretrained).hidden_size


def _reference(name: str) -> str:
    """An existing local path becomes absolute (the adapter may be moved), after open_clip's `local-dir:`
    prefix too; hub ids, `hf-hub:` names and pretrained tags are kept as they are."""
    prefix = "local-dir:" if name.startswith("local-dir:") else ""
    path = Path(name.removeprefix(prefix))
    return prefix + str(path.resolve()) if path.exists() else name


def import_llava(
    projector_path: str | Path,
    *,
    vision_tower: str,
    lm: str,
    out: str | Path,
    vision_backend: Literal["hf", "open_clip"] = "hf",
    vision_pretrained: str | None = None,
) -> Path:
    """Make an adapter directory from an original LLaVA `mm_projector.bin` / `.safetensors`.

    The projector type (`linear` or `mlpNx_gelu`) is inferred from the weight keys and its shapes are
    checked against the named backbones' configs; LLaVA-1.5's settings are used for the rest (layer -2,
    patch features, pad-to-square). `vision_pretrained` is open_clip's pretrained tag or checkpoint for a
    plain model name such as `ViT-L-14-336`. Returns `out`, which `vlm.load` accepts.
    """
    projector_path, out = Path(projector_path), Path(out)
    check_output_dir(out)
    _check_names(vision_tower, lm, vision_backend)
    state = load_llava_projector(projector_path)
    projector_type = _projector_type(state, projector_path)
    lm_dim, vision_dim = _check_shapes(state, projector_path)
    width = _vision_width(vision_tower, vision_backend, vision_pretrained)
    if width != vision_dim:
        raise ConfigError(
            f"the projector expects {vision_dim}-d vision features but {vision_tower!r} gives {width}-d; "
            "use the vision tower the projector was trained with"
        )
    _check_lm_width(lm, lm_dim)
    config = AdapterConfig(
        lm=_reference(lm),
        # an open_clip name is a path only after `local-dir:`
        vision_tower=_reference(vision_tower) if vision_backend == "hf" or ":" in vision_tower else vision_tower,
        vision_backend=vision_backend,
        vision_pretrained=None if vision_pretrained is None else _reference(vision_pretrained),
        projector_type=projector_type,
        vision_hidden_size=vision_dim,
        lm_hidden_size=lm_dim,
        extra={"imported_from": str(projector_path.resolve())},
    )
    # written whole, then renamed: never half an adapter at `out`
    atomic_write(out, lambda staging: write_adapter(staging, config, state))
    return out


def _check_names(vision_tower: str, lm: str, vision_backend: str) -> None:
    if vision_backend == "hf" and vision_tower.startswith(("local-dir:", "hf-hub:")):
        raise ConfigError(f"{vision_tower!r} is an open_clip name: add --vision-backend open_clip")
    local = [("LM", lm)] + ([("vision tower", vision_tower)] if vision_backend == "hf" else [])
    for what, name in local:  # a path, not a hub id: the hub's "Repo id must be in the form..." would mislead
        if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
            raise ConfigError(f"the {what} {name!r} is not there: no such directory")


def _check_shapes(state: Mapping[str, torch.Tensor], source: Path) -> tuple[int, int]:
    """Every weight's shape fits one projector -> (LM width, vision width)."""
    lm_dim, vision_dim = state["0.weight"].shape
    for key, tensor in state.items():
        expected = (lm_dim,) if key.endswith("bias") else (lm_dim, vision_dim if key == "0.weight" else lm_dim)
        if tuple(tensor.shape) != expected:
            raise ConfigError(f"{source}: weight {key} has shape {tuple(tensor.shape)}, expected {expected}")
    return lm_dim, vision_dim


def _check_lm_width(lm: str, lm_dim: int) -> None:
    from transformers import AutoConfig

    try:
        lm_config = AutoConfig.from_pretrained(lm)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not read the config of the LM {lm!r}: {e}") from e
    lm_hidden = getattr(lm_config, "hidden_size", None)
    if lm_hidden is None or lm_config.get_text_config() is not lm_config:
        raise ConfigError(
            f"{lm!r} is a {type(lm_config).__name__}, not a plain causal LM; give the language model itself "
            "(a LlamaForCausalLM checkpoint such as CausalLM/14B)"
        )
    if lm_hidden != lm_dim:
        raise ConfigError(
            f"the projector outputs {lm_dim}-d embeddings but {lm!r} has {lm_hidden}-d hidden states; "
            "use the LM the projector was trained for"
        )
