"""AdapterConfig: everything needed to rebuild a vision-language model from an adapter directory.

An adapter directory (read and written by `vlm.adapter`) holds `adapter_config.json` (this dataclass) and
`projector.safetensors`. Base models are referenced by hub id or local path, never copied. A config is not
changed once made: what a loaded model measures (widths, the image token's row) lives in its own copy.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from vlm.errors import ConfigError

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "FORMAT_VERSION",
    "PRESETS",
    "AdapterConfig",
    "parse_projector_type",
]

FORMAT_VERSION = 1
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

VisionBackend = Literal["hf", "open_clip"]
SelectFeature = Literal["patch", "cls_patch"]
AspectMode = Literal["pad", "resize", "crop"]


def _runtime_types(hint: Any) -> tuple[type, ...]:
    """The classes a value of an annotated type may have: `str | None` -> (str, NoneType), a Literal of strings
    -> (str,), `dict[str, Any]` -> (dict,)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return tuple({type(arg) for arg in typing.get_args(hint)})
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _runtime_types(arg))
    return (origin or hint,)


def check_field_types(instance: Any, prefix: str = "") -> None:
    """Raise ConfigError for a dataclass field whose value does not have its annotated type (a hand-edited file
    may say "-2" or null where a number or text belongs); a whole number where a float is meant becomes one."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        value, allowed = getattr(instance, f.name), _runtime_types(hints[f.name])
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            setattr(instance, f.name, value)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            kinds = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ConfigError(f"{prefix}{f.name} must be a {kinds}; got {value!r}")


_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def parse_projector_type(projector_type: str) -> int:
    """Number of linear layers for a projector type name; raises ConfigError on an unknown one."""
    if projector_type == "linear":
        return 1
    match = _MLP.match(projector_type)
    if match and int(match.group(1)) >= 1:
        return int(match.group(1))
    raise ConfigError(f"unknown projector type {projector_type!r}: use 'linear' or 'mlpNx_gelu' (e.g. 'mlp2x_gelu')")


@dataclass
class AdapterConfig:
    """Configuration of one adapter: which backbones, how images become tokens, and the projector."""

    lm: str
    """Hub id or local path of the frozen causal LM (a `LlamaForCausalLM` checkpoint with its tokenizer)."""

    vision_tower: str
    """HF: a hub id or path of a CLIP checkpoint. open_clip: a model name (`ViT-L-14-336`),
    `hf-hub:org/repo` or `local-dir:/path`."""

    vision_backend: VisionBackend = "hf"
    """`hf` for transformers `CLIPVisionModel`, `open_clip` for open_clip_torch."""

    vision_pretrained: str | None = None
    """open_clip only: a pretrained tag (`openai`) or a checkpoint file, for plain model names (a file of OpenAI
    weights goes with a `-quickgelu` model name)."""

    select_layer: int = -2
    """Which hidden state of the tower feeds the projector, HF-style: 0 is the embeddings, -1 the last
    block, -2 (LLaVA-1.5) the second-to-last block."""

    select_feature: SelectFeature = "patch"
    """`patch` drops the CLS token (LLaVA default); `cls_patch` keeps it."""

    image_aspect: AspectMode = "pad"
    """`pad` pads to a square with the mean colour then resizes (LLaVA-1.5); `resize` squashes;
    `crop` resizes the short side and centre-crops (CLIP default)."""

    projector_type: str = "mlp2x_gelu"
    """`linear` or `mlpNx_gelu` (N >= 1 linear layers with GELU between; `mlp2x_gelu` is LLaVA-1.5's)."""

    vision_hidden_size: int = 0
    """Width of the tower's features (filled in from the tower when 0)."""

    lm_hidden_size: int = 0
    """Width of the LM's input embeddings (filled in from the LM when 0)."""

    image_token: str = "<image>"
    """The placeholder in LLaVA training text and in the exported tokenizer. Never parsed from user text."""

    image_token_id: int = -1
    """Embedding row used for image slots; -1 means the first row past the tokenizer (151646 for the
    Qwen vocabulary, as in the transformers LLaVA conversion). Must be below the LM's vocabulary rows."""

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    """Default system prompt; the LM requires a non-empty one."""

    template: Literal["chatml"] = "chatml"
    """Chat template name. CausalLM models use ChatML."""

    max_length: int = 4096
    """Longest input (prompt + image tokens) accepted before generation; longer inputs are refused."""

    format_version: int = FORMAT_VERSION
    """Version of this file format."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (training recipe, metrics). Not interpreted by the library."""

    def __post_init__(self) -> None:
        check_field_types(self, "adapter config: ")
        if not self.lm:
            raise ConfigError("adapter config: `lm` must name a causal LM (hub id or local path)")
        if not self.vision_tower:
            raise ConfigError("adapter config: `vision_tower` must name a CLIP vision model")
        if self.vision_backend not in ("hf", "open_clip"):
            raise ConfigError(
                f"adapter config: vision_backend must be 'hf' or 'open_clip', got {self.vision_backend!r}"
            )
        if self.select_feature not in ("patch", "cls_patch"):
            raise ConfigError(
                f"adapter config: select_feature must be 'patch' or 'cls_patch', got {self.select_feature!r}"
            )
        if self.image_aspect not in ("pad", "resize", "crop"):
            raise ConfigError(
                f"adapter config: image_aspect must be 'pad', 'resize' or 'crop', got {self.image_aspect!r}"
            )
        if self.template != "chatml":
            raise ConfigError(f"adapter config: only the 'chatml' template is supported, got {self.template!r}")
        if not self.system_prompt.strip():
            raise ConfigError("adapter config: system_prompt must not be empty (the LM requires one)")
        if self.format_version > FORMAT_VERSION:
            raise ConfigError(
                f"adapter format version {self.format_version} is newer than this library supports "
                f"({FORMAT_VERSION}); upgrade the `causallm-vlm` package"
            )
        if self.max_length <= 0:
            raise ConfigError("adapter config: max_length must be positive")
        parse_projector_type(self.projector_type)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"adapter config: unknown fields {unknown}; is it from a newer version?")
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"adapter config: {e}") from e


PRESETS: dict[str, AdapterConfig] = {
    "causallm-14b": AdapterConfig(
        lm="CausalLM/14B",
        vision_tower="openai/clip-vit-large-patch14-336",
        vision_hidden_size=1024,
        lm_hidden_size=5120,
        image_token_id=151646,
    ),
    "causallm-7b": AdapterConfig(
        lm="CausalLM/7B",
        vision_tower="openai/clip-vit-large-patch14-336",
        vision_hidden_size=1024,
        lm_hidden_size=4096,
        image_token_id=151646,
    ),
}
"""Named starting points. Their projector is untrained until an alignment run writes one."""
