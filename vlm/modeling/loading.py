"""Loading the backbones an adapter names: references relative to the adapter, devices, dtypes, the memory check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm.config import AdapterConfig
from vlm.errors import ConfigError, InsufficientMemoryError
from vlm.modeling.towers import VisionTower, build_vision_tower

__all__ = [
    "check_memory",
    "lm_config_of",
    "load_backbones",
    "resolve_reference",
    "torch_device",
    "torch_dtype",
    "vision_identity",
]


def resolve_reference(reference: str, base: Path | None) -> str:
    """A backbone reference from an adapter config: a relative local path is relative to the adapter directory
    `base`; anything else (a hub id, an absolute path) is returned as it is."""
    if base is not None and not Path(reference).is_absolute() and (base / reference).exists():
        return str(base / reference)
    return reference


def _lm_bytes(lm_config: Any, dtype: torch.dtype) -> int:
    """Approximate weight bytes of a Llama-architecture LM from its config."""
    hidden, layers = lm_config.hidden_size, lm_config.num_hidden_layers
    heads = lm_config.num_attention_heads
    kv_heads = getattr(lm_config, "num_key_value_heads", None) or heads
    head_dim = getattr(lm_config, "head_dim", None) or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * lm_config.intermediate_size
    embeddings = lm_config.vocab_size * hidden * (1 if getattr(lm_config, "tie_word_embeddings", False) else 2)
    return (layers * (attention + mlp) + embeddings) * torch.finfo(dtype).bits // 8


def check_memory(
    lm_name: str,
    lm_config: Any,
    dtype: torch.dtype,
    free_bytes: int,
    reserve_bytes: int = 2 << 30,
    draft: tuple[str, Any] | None = None,
) -> None:
    """Raise InsufficientMemoryError if the LM's weights plus a working reserve exceed `free_bytes`; with a
    `draft` (name, config) for speculative decoding, both LMs' weights."""
    need = _lm_bytes(lm_config, dtype) + reserve_bytes + (_lm_bytes(draft[1], dtype) if draft else 0)
    if need <= free_bytes:
        return
    names = f"{lm_name} + the draft {draft[0]}" if draft else lm_name
    if draft:
        advice = "decode without the draft (speculative decoding keeps both LMs on one card) or use a larger card"
    elif lm_config.hidden_size >= 5120:
        advice = (
            "use the 7B preset ('causallm-7b') instead: the CausalLM model card recommends the 7B over a quantized 14B"
        )
    else:
        advice = "free accelerator memory or use a larger card"
    raise InsufficientMemoryError(
        f"{names} need{'' if draft else 's'} about {need / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')} "
        f"(weights + working memory) but only {free_bytes / 2**30:.1f} GiB is free; {advice}"
    )


def lm_config_of(config: AdapterConfig, base: Path | None) -> Any:
    """The transformers config of the LM an adapter names (no weights read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_reference(config.lm, base))
    except OSError as e:
        raise ConfigError(
            f"could not load the LM {config.lm!r}: {e}. If it is a hub id, check the name and that the hub is "
            "reachable (HF_HUB_OFFLINE unset), or give a local path"
        ) from e


def torch_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    name = dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"unknown or unsupported dtype {name!r}: use 'bfloat16', 'float16' or 'float32'")
    return dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def torch_device(device: str | torch.device | None) -> torch.device:
    """The device to load onto (CUDA when there is one), checked before any weights are read."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from e
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError("no CUDA device is available here; use device 'cpu'")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"there is no {device}: this machine has {count} CUDA device(s)")
    return device


def load_backbones(
    config: AdapterConfig,
    base: Path | None,
    device: torch.device,
    dtype: torch.dtype,
    vision: VisionTower | None = None,
) -> tuple[VisionTower, nn.Module, Any]:
    """The tower, LM (in `dtype`) and tokenizer named by `config` (paths relative to `base`), on the CPU; on CUDA,
    after checking that the LM fits on `device`. A `vision` tower already loaded (shared with another model) is
    used instead of loading one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm_ref = resolve_reference(config.lm, base)
    lm_config = lm_config_of(config, base)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        check_memory(config.lm, lm_config, dtype, free)
    try:
        tokenizer = AutoTokenizer.from_pretrained(lm_ref)
        lm = AutoModelForCausalLM.from_pretrained(lm_ref, config=lm_config, dtype=dtype)
    except OSError as e:
        raise ConfigError(
            f"could not load the LM {config.lm!r}: {e}. If it is a hub id, check the name and that the hub is "
            "reachable (HF_HUB_OFFLINE unset), or give a local path"
        ) from e
    if vision is None:
        vision = build_vision_tower(config, resolve_reference(config.vision_tower, base))
    return vision, lm, tokenizer


def vision_identity(config: AdapterConfig, base: Path | None) -> tuple[Any, ...]:
    """What decides a tower's features: two adapters with equal identities can share one tower and its output."""
    return (
        config.vision_backend,
        resolve_reference(config.vision_tower, base),
        config.vision_pretrained,
        config.select_layer,
        config.select_feature,
        config.image_aspect,
    )
