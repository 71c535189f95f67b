"""TrainConfig: every setting of an alignment run, checked when it is made, and the AdapterConfig it trains.

`vlm-train` (train.py) generates its flags from the fields and their docstrings, and resolves a run's config
from a recipe (recipes.py), then a YAML file (`--config run.yaml`), then `--field value` flags. The resolved
config is written to `train_config.yaml` in the run directory.

The settings a run shares with its adapter are AdapterConfig's fields, named in one place (`ADAPTER_FIELDS`):
`adapter_config` passes them on, and their allowed values and defaults are AdapterConfig's. They stay flat
fields here, so that flags, YAML keys and saved configs read `lm: ...` as before, and a run may start with
no `lm` (the toy recipe fills it in) where an AdapterConfig may not.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from vlm.config import AdapterConfig, check_field_types
from vlm.errors import ConfigError

__all__ = ["ADAPTER_FIELDS", "TrainConfig", "adapter_config"]

ADAPTER_FIELDS = (
    "lm",
    "vision_tower",
    "vision_backend",
    "vision_pretrained",
    "select_layer",
    "select_feature",
    "image_aspect",
    "projector_type",
    "system_prompt",
)
"""The TrainConfig fields that are AdapterConfig's, under the same names: the trained adapter's settings."""

_ADAPTER_CHOICES = {
    name: typing.get_args(hint)
    for name, hint in typing.get_type_hints(AdapterConfig).items()
    if name in ADAPTER_FIELDS and typing.get_origin(hint) is Literal
}
"""The allowed values of the shared fields that AdapterConfig types as a Literal (vision_backend, ...)."""


def _adapter_default(name: str) -> Any:
    """AdapterConfig's default for one of ADAPTER_FIELDS: a run trains the adapter `vlm` would build."""
    return next(f.default for f in dataclasses.fields(AdapterConfig) if f.name == name)


@dataclass
class TrainConfig:
    """One alignment run. Fields map one-to-one to `vlm-train --field-name VALUE` flags."""

    recipe: str = ""
    """The preset these values started from (see `projector_training.recipes.RECIPES`)."""

    # Backbones and projector: ADAPTER_FIELDS (the LM and the tower have no default there)
    lm: str = ""
    """Frozen causal LM: hub id (`CausalLM/14B`) or local path."""
    vision_tower: str = "openai/clip-vit-large-patch14-336"
    """Frozen CLIP: HF hub id / path, or an open_clip name, `hf-hub:` or `local-dir:` id."""
    vision_backend: str = _adapter_default("vision_backend")
    """`hf` (transformers CLIPVisionModel) or `open_clip`."""
    vision_pretrained: str | None = _adapter_default("vision_pretrained")
    """open_clip pretrained tag or checkpoint file, for plain open_clip model names."""
    select_layer: int = _adapter_default("select_layer")
    """Tower hidden state fed to the projector (HF indexing; -2 is LLaVA-1.5's)."""
    select_feature: str = _adapter_default("select_feature")
    """`patch` (drop CLS) or `cls_patch`."""
    image_aspect: str = _adapter_default("image_aspect")
    """`pad` (LLaVA-1.5), `resize` or `crop`."""
    projector_type: str = _adapter_default("projector_type")
    """`linear` or `mlpNx_gelu`."""
    init_projector: str | None = None
    """Start from these projector weights: an adapter directory or a LLaVA mm_projector file (stage 2); `none`
    starts from a fresh projector where the recipe names one."""
    system_prompt: str = _adapter_default("system_prompt")
    """System prompt of every training conversation that has none (never empty)."""
    caption_prompt: str | None = None
    """Default instruction of `model.caption()` for the trained adapter."""

    # Data
    data: str = ""
    """LLaVA conversation records: a JSON list or JSONL file."""
    image_root: str = "."
    """Folder the records' image paths are relative to."""
    max_length: int = 2048
    """Longer samples are truncated (never inside an image) or dropped when nothing is left to learn."""
    max_bad_fraction: float = 0.05
    """Stop with an error when more than this share of samples is unusable."""
    group_by_length: bool = True
    """Batch samples of similar length together (less padding)."""
    num_workers: int = 4
    """DataLoader worker processes (image decoding and tokenization)."""

    # Optimisation
    global_batch_size: int = 256
    """Samples per optimizer step over all processes (micro_batch_size x processes x accumulation)."""
    micro_batch_size: int = 16
    """Samples per forward pass on one process (with auto_micro_batch on a GPU: the largest tried)."""
    auto_micro_batch: bool = True
    """On a GPU, before training: halve micro_batch_size (powers of two that divide the batch) until a
    forward and backward pass of the longest samples fits; if none fits, switch gradient checkpointing
    on and search again. Not under FSDP or on the CPU, where micro_batch_size is used as given."""
    epochs: int = 1
    max_steps: int | None = None
    """Stop after this many optimizer steps (the schedule is laid out over them)."""
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    """`cosine` (with linear warmup) or `constant` (with linear warmup)."""
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    max_nonfinite_steps: int = 10
    """A step with a non-finite loss is skipped; more than this many stop the run."""
    mixed_precision: str = "auto"
    """`auto` (bf16 on GPU, fp32 on CPU), `bf16` or `no`."""
    gradient_checkpointing: bool = False
    """Recompute the frozen LM's activations in backward: less memory, about 30% slower."""
    compile_lm_layers: bool = False
    """Run each frozen LM decoder layer through torch.compile (fuses norms, rotary, SwiGLU and residuals):
    the same loss (tested on CPU); on an H100, 1.38x (14B) and 1.43x (7B) the samples/s of the plain layers,
    with less memory (bench_gpu.py).
    On in the LLaVA recipes; not applied under FSDP (an untested combination)."""
    device: str = "auto"
    """`auto` or `cpu` (accelerate picks the GPU for each process)."""
    seed: int = 42

    # Output
    output_dir: str = "runs/run"
    """Run directory: checkpoints, logs, the resolved config and the final adapter."""
    save_every: int = 500
    """Checkpoint every N optimizer steps (and at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept; older ones are removed only after a new one is complete."""
    resume: str = "auto"
    """`auto` (newest complete checkpoint in output_dir, if any), `no`, or a checkpoint directory."""
    report_to: str = "tensorboard"
    """`tensorboard`, `wandb` or `none`."""
    toy_world: str = "default"
    """`toy` recipe only: `default` (the full miniature world) or `micro` (seconds to build; learns nothing)."""

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.init_projector is not None and self.init_projector.lower() == "none":  # a flag cannot say null
            self.init_projector = None
        self._check_choices()
        self._check_numbers()
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            raise ConfigError(f"report_to={self.report_to} needs the {self.report_to} package: install it or pass none")
        if not self.system_prompt.strip():
            raise ConfigError("system_prompt must not be empty: the CausalLM models require one")

    def _check_choices(self) -> None:
        choices = {
            **_ADAPTER_CHOICES,
            "lr_schedule": ("cosine", "constant"),
            "mixed_precision": ("auto", "bf16", "no"),
            "device": ("auto", "cpu"),
            "report_to": ("tensorboard", "wandb", "none"),
            "toy_world": ("default", "micro"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

    def _check_numbers(self) -> None:
        positive = ("global_batch_size", "micro_batch_size", "epochs", "max_length", "save_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.warmup_ratio < 1 or not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError("need lr > 0, 0 <= warmup_ratio < 1 and 0 <= max_bad_fraction <= 1")
        if not (self.max_grad_norm > 0 and 0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1 and self.adam_eps > 0):
            raise ConfigError("need max_grad_norm > 0, 0 <= adam_beta1, adam_beta2 < 1 and adam_eps > 0")
        if self.num_workers < 0 or self.weight_decay < 0 or self.max_nonfinite_steps < 0:
            raise ConfigError("num_workers, weight_decay and max_nonfinite_steps must not be negative")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1 (or unset); got {self.max_steps}")

    def resolved_mixed_precision(self) -> str:
        if self.mixed_precision != "auto":
            return self.mixed_precision
        import torch

        return "bf16" if torch.cuda.is_available() and self.device != "cpu" else "no"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **changes: Any) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown training settings {unknown}")
        return dataclasses.replace(self, **changes)


def adapter_config(cfg: TrainConfig) -> AdapterConfig:
    """The adapter a run trains: its ADAPTER_FIELDS, room for prompts at least 4096 tokens long, and the recipe and
    caption prompt as provenance."""
    return AdapterConfig(
        **{name: getattr(cfg, name) for name in ADAPTER_FIELDS},
        max_length=max(cfg.max_length, 4096),
        extra={"recipe": cfg.recipe, **({"caption_prompt": cfg.caption_prompt} if cfg.caption_prompt else {})},
    )
