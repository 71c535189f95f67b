"""Export to llama.cpp: the vision tower and projector as an mmproj GGUF in the LLaVA-1.5 layout (the LM is converted
by llama.cpp's own script)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from vlm.adapter import atomic_write, read_config, read_projector
from vlm.api import VisionLanguageModel
from vlm.config import AdapterConfig
from vlm.errors import ConfigError
from vlm.export.towers import check_two_layer_projector, hf_vision_model
from vlm.modeling.loading import resolve_reference
from vlm.modeling.towers import VisionTower, build_vision_tower

__all__ = ["FEATURE_LAYER_KEY", "LLAMA_CPP_PAD_COLOUR", "export_gguf_mmproj"]

LLAMA_CPP_PAD_COLOUR = (122, 116, 104)  # llama.cpp's fixed pad colour for LLaVA-1.5 mmprojs (clip.cpp)
FEATURE_LAYER_KEY = "clip.vision.feature_layer"
"""llama.cpp's key for the hidden-state indices fed to the projector (not among gguf-py's constants)."""

_GGUF_TENSOR_NAMES: tuple[tuple[str, str], ...] = (
    (r"embeddings\.class_embedding", "v.class_embd"),
    (r"embeddings\.patch_embedding\.weight", "v.patch_embd.weight"),
    (r"embeddings\.position_embedding\.weight", "v.position_embd.weight"),
    (r"pre_layrnorm\.(weight|bias)", r"v.pre_ln.\1"),
    (r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"v.blk.\1.attn_\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"v.blk.\1.attn_out.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"v.blk.\1.ln1.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"v.blk.\1.ln2.\2"),
    # The LLaVA-1.5 mmproj layout llama.cpp's loader is written against stores fc1 as ffn_down and fc2
    # as ffn_up; clip.cpp recognises it from the shapes and swaps them back. (The opposite, modern
    # naming is mis-swapped by that check when the MLP is as wide as the model.)
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"v.blk.\1.ffn_down.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"v.blk.\1.ffn_up.\2"),
)
_GGUF_SKIPPED = re.compile(r"post_layernorm\..*|embeddings\.position_ids")
"""Not in a LLaVA mmproj: llama.cpp would apply post_layernorm to the features; position ids are implicit."""


def _gguf_vision_tensors(state: Mapping[str, torch.Tensor], num_blocks: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for the embeddings, ln_pre and the first `num_blocks` blocks of a CLIPVisionModel."""
    for key, tensor in state.items():
        key = key.removeprefix("vision_model.")
        if _GGUF_SKIPPED.fullmatch(key):
            continue
        for pattern, name in _GGUF_TENSOR_NAMES:
            match = re.fullmatch(pattern, key)
            if match:
                if key.startswith("encoder.layers.") and int(match.group(1)) >= num_blocks:
                    break  # blocks past the feature layer never run
                yield match.expand(name), tensor
                break
        else:
            raise ConfigError(f"unexpected CLIP vision weight {key!r}: cannot map it to llama.cpp's names")


def _use_gelu(hidden_act: str) -> bool:
    """llama.cpp's `clip.use_gelu`: true runs GELU (tanh approximation), false runs QuickGELU."""
    if hidden_act == "quick_gelu":
        return False
    if hidden_act in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        return True
    raise ConfigError(f"llama.cpp's CLIP runs GELU or QuickGELU MLPs; this tower uses {hidden_act!r}")


def export_gguf_mmproj(
    source: str | Path | VisionLanguageModel, out: str | Path, *, ftype: Literal["f16", "f32"] = "f16"
) -> Path:
    """Write an adapter's vision tower and projector (from its directory, or a loaded model) as a llama.cpp mmproj
    GGUF (LLaVA-1.5 `mlp` projector) at `out`, a file that must not exist.

    Only the blocks up to the selected feature layer are stored, and `clip.vision.feature_layer` names
    that layer explicitly, so llama.cpp computes exactly the hidden state the projector was trained on.
    `ftype="f16"` stores matrices in float16 (llama.cpp's usual mmproj), `"f32"` keeps everything float32.
    From a directory the LM is not loaded. Raises ConfigError for adapters llama.cpp cannot run (CLS features,
    projectors other than mlp2x_gelu, towers with no CLIP equivalent).
    """
    out = Path(out)
    if ftype not in ("f16", "f32"):
        raise ConfigError(f"ftype must be 'f16' or 'f32', got {ftype!r}")
    if out.exists():  # a GGUF of the LM, an earlier mmproj: never written over
        raise ConfigError(f"{out} already exists; choose a new file name or remove it first")
    config = source.config if isinstance(source, VisionLanguageModel) else read_config(source)
    check_two_layer_projector(config, "llama.cpp's LLaVA mmproj")
    if config.select_feature != "patch":
        raise ConfigError("llama.cpp's LLaVA projector reads patch tokens only; cls_patch adapters cannot be exported")
    tower, projector = _tower_and_projector(source, config)
    vision = hf_vision_model(tower)
    feature_layer = config.select_layer % (vision.config.num_hidden_layers + 1)  # hidden-state index, 0 = embeddings
    for warning in _llama_cpp_preprocessing(tower):
        warnings.warn(warning, stacklevel=2)

    def write(staging: Path) -> None:
        _write_mmproj(staging, config, tower, vision, projector, feature_layer, ftype)

    return atomic_write(out, write)


def _tower_and_projector(
    source: str | Path | VisionLanguageModel, config: AdapterConfig
) -> tuple[VisionTower, dict[str, torch.Tensor]]:
    if isinstance(source, VisionLanguageModel):
        return source.module.vision, {k: v.float().cpu() for k, v in source.module.projector_state().items()}
    projector = read_projector(source)
    return build_vision_tower(config, resolve_reference(config.vision_tower, Path(source))), projector


def _llama_cpp_preprocessing(tower: VisionTower) -> list[str]:
    """How llama.cpp's preprocessing of LLaVA-1.5 mmprojs will differ from vlm's for this tower: it pads to a
    square with a fixed colour (OpenAI CLIP's mean), whatever the GGUF's image mean says (checked with the
    llama.cpp in llama-cpp-python 0.3.36)."""
    notes = []
    if tower.aspect != "pad":
        notes.append(
            f"this adapter's images are {tower.aspect!r}-ed to a square, but llama.cpp pads them: non-square images "
            "will be seen differently than in training"
        )
    pad = tuple(int(m * 255) for m in tower.mean)
    if tower.aspect == "pad" and pad != LLAMA_CPP_PAD_COLOUR:
        notes.append(
            f"vlm pads non-square images with the tower's mean colour {pad}, but llama.cpp pads with "
            f"{LLAMA_CPP_PAD_COLOUR}: square images are unaffected, others get a different border"
        )
    return notes


def _write_mmproj(
    path: Path,
    config: AdapterConfig,
    tower: VisionTower,
    vision: Any,
    projector: Mapping[str, torch.Tensor],
    feature_layer: int,
    ftype: str,
) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="clip")
    vc = vision.config
    lm_hidden = projector["2.weight"].shape[0]

    def array(name: str, tensor: torch.Tensor) -> Any:
        half = ftype == "f16" and tensor.ndim >= 2 and name.endswith(".weight")
        return tensor.detach().to("cpu", torch.float16 if half else torch.float32).contiguous().numpy()

    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(Path(config.vision_tower.removeprefix("local-dir:")).name or "vlm-adapter")
    writer.add_description(f"image encoder for LLaVA: {config.vision_tower} + vlm {config.projector_type} projector")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if ftype == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_clip_has_vision_encoder(True)
    writer.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)
    writer.add_clip_projector_type("mlp")
    writer.add_vision_image_size(vc.image_size)
    writer.add_vision_patch_size(vc.patch_size)
    writer.add_vision_embedding_length(vc.hidden_size)
    writer.add_vision_feed_forward_length(vc.intermediate_size)
    writer.add_vision_projection_dim(lm_hidden)
    writer.add_vision_head_count(vc.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(vc.layer_norm_eps)
    writer.add_vision_block_count(feature_layer)
    writer.add_array(FEATURE_LAYER_KEY, [feature_layer])
    writer.add_vision_image_mean(list(tower.mean))
    writer.add_vision_image_std(list(tower.std))
    writer.add_vision_use_gelu(_use_gelu(vc.hidden_act))
    for name, tensor in _gguf_vision_tensors(vision.state_dict(), feature_layer):
        writer.add_tensor(name, array(name, tensor))
    for key in ("0.weight", "0.bias", "2.weight", "2.bias"):
        writer.add_tensor(f"mm.{key}", array(f"mm.{key}", projector[key]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
