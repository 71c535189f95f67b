"""The model as one `nn.Module`: a frozen vision tower, a trainable projector and a frozen causal LM.

pixels (I, 3, S, S) -> tower -> (I, N, Dv) -> projector -> (I, N, H)
input ids (B, T) with N image-token slots per image -> embeddings (B, T, H), slots filled in order
-> LM -> loss on label positions only (training), or the embeddings a decode engine starts from (generation)

It reads its config and never writes it: `resolve_config` makes the copy that knows the widths and the image row.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm.config import AdapterConfig
from vlm.errors import ConfigError, PromptError
from vlm.modeling.cuda_graphs import GraphedForward
from vlm.modeling.projector import build_projector
from vlm.modeling.towers import VisionTower
from vlm.processing.chat import IGNORE_INDEX

__all__ = ["ModelOutput", "VisionLanguageModule", "resolve_config"]

logger = logging.getLogger(__name__)


@dataclass
class ModelOutput:
    """Result of `VisionLanguageModule.forward`.

    loss: scalar mean cross-entropy over label tokens (None without labels).
    logits: with labels, (L, V) for the L label tokens only (the LM head never sees other positions);
        without labels, (B, T, V).
    num_label_tokens: L.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    num_label_tokens: int = 0


def resolve_config(config: AdapterConfig, vision: VisionTower, lm: nn.Module, tokenizer: Any) -> AdapterConfig:
    """A copy of `config` with what the backbones say filled in (feature widths, the image token's row when -1,
    `max_length` capped at the LM's positions), after checking that they are the ones the adapter was made for."""
    if config.vision_hidden_size and config.vision_hidden_size != vision.hidden_size:
        raise ConfigError(
            f"the adapter expects {config.vision_hidden_size}-d vision features but the tower "
            f"{config.vision_tower!r} gives {vision.hidden_size}-d"
        )
    lm_hidden = lm.get_input_embeddings().embedding_dim
    if config.lm_hidden_size and config.lm_hidden_size != lm_hidden:
        raise ConfigError(
            f"the adapter expects a {config.lm_hidden_size}-d LM but {config.lm!r} has {lm_hidden}-d embeddings"
        )
    max_length = config.max_length
    positions = getattr(lm.config, "max_position_embeddings", None)
    if isinstance(positions, int) and 0 < positions < max_length:
        # past the positions it was trained for the LM degrades quietly (the miniature world's LM answers
        # nothing): the prompt check refuses such conversations instead
        logger.info("max_length %d is past the LM's %d positions: using those", max_length, positions)
        max_length = positions
    image_token_id = config.image_token_id if config.image_token_id >= 0 else len(tokenizer)
    rows = lm.get_input_embeddings().num_embeddings
    if image_token_id >= rows:
        raise ConfigError(
            f"image token id {image_token_id} is past the LM's {rows} embedding rows; "
            "set image_token_id to a spare row or resize the LM's embeddings"
        )
    return dataclasses.replace(
        config,
        vision_hidden_size=vision.hidden_size,
        lm_hidden_size=lm_hidden,
        max_length=max_length,
        image_token_id=image_token_id,
        extra=dict(config.extra),
    )


class VisionLanguageModule(nn.Module):
    """Tower + projector + LM. `config` must be resolved (`resolve_config`); only the projector trains."""

    def __init__(self, config: AdapterConfig, vision: VisionTower, lm: nn.Module):
        super().__init__()
        if config.image_token_id < 0 or not config.vision_hidden_size or not config.lm_hidden_size:
            raise ConfigError("VisionLanguageModule needs a resolved config: pass it through resolve_config first")
        self.config = config
        self.vision = vision
        self.lm = lm
        self.projector = build_projector(config.projector_type, vision.hidden_size, config.lm_hidden_size)
        self.lm.requires_grad_(False)
        self.lm.eval()
        self._graphed_vision: GraphedForward | None = None

    # ----------------------------------------------------------------------------------------------
    # Training switches

    def compile_lm_layers(self, enable: bool = True) -> None:
        """Run each LM decoder layer through `torch.compile` (training, and prefill on the `dynamic`
        path; the static-cache paths compile their own layer pieces with `decode_mode="compiled"`), or undo it.

        The layers share their code and shapes, so one compilation serves them all; new sequence
        lengths recompile once and then run with dynamic shapes."""
        for layer in self.lm.get_decoder().layers:
            if enable:
                layer.compile()
            else:
                layer._compiled_call_impl = None  # what nn.Module.compile sets

    def enable_gradient_checkpointing(self, enable: bool = True) -> None:
        """Recompute the frozen LM's layer activations in backward instead of keeping them (less memory,
        about a third more compute), or stop. Takes effect in training mode; see `train`."""
        new_names = hasattr(self.lm, "activation_checkpointing_enable")  # transformers renamed these
        if enable and new_names:
            self.lm.activation_checkpointing_enable({"use_reentrant": False})
        elif enable:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif new_names:
            self.lm.activation_checkpointing_disable()
        else:
            self.lm.gradient_checkpointing_disable()
        self.train(self.training)

    def train(self, mode: bool = True) -> VisionLanguageModule:
        # Only the projector trains; the frozen LM and tower keep dropout and the like switched off.
        super().train(mode)
        self.lm.eval()
        # transformers checkpoints a layer only while that layer is in training mode: with checkpointing on,
        # flag the decoder layers themselves (not their attention or MLP, which keep dropout off).
        for layer in self.lm.get_decoder().layers:
            layer.training = mode and bool(getattr(layer, "gradient_checkpointing", False))
        return self

    # ----------------------------------------------------------------------------------------------
    # Properties and weights

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    def projector_state(self) -> dict[str, torch.Tensor]:
        """The projector's weights (what an adapter directory stores)."""
        return dict(self.projector.state_dict())

    def load_projector_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load projector weights, with an error naming any missing, extra or mis-shaped tensor."""
        own = self.projector.state_dict()
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise ConfigError(
                f"projector weights do not match a {self.config.projector_type} projector: "
                f"missing {missing}, unexpected {extra}"
            )
        for key, value in state.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ConfigError(
                    f"projector weight {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)} "
                    f"(vision {self.vision.hidden_size}-d -> LM {self.config.lm_hidden_size}-d)"
                )
        self.projector.load_state_dict(state)

    # ----------------------------------------------------------------------------------------------
    # The model

    def image_features(self, pixel_values: torch.Tensor, graphed: bool = False) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, Dv) tower features, before the projector. `graphed` (inference on a GPU): the
        tower runs as a CUDA-graph replay (see `vlm.modeling.cuda_graphs.GraphedForward`), whose output buffer
        the next replay overwrites."""
        pixel_values = pixel_values.to(self.device, self.vision_dtype)
        if graphed:
            if self._graphed_vision is None:
                self._graphed_vision = GraphedForward(self.vision)
            return self._graphed_vision(pixel_values)
        with torch.no_grad():
            return self.vision(pixel_values)  # (B, N, Dv)

    def encode_images(self, pixel_values: torch.Tensor, graphed: bool = False) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, H) image embeddings in LM space (tower, then projector)."""
        return self.project(self.image_features(pixel_values, graphed))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Tower features (B, N, Dv) -> (B, N, H) image embeddings in LM space."""
        projector_dtype = next(self.projector.parameters()).dtype
        return self.projector(features.to(self.device, projector_dtype))

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        graphed: bool = False,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) ids + (I, 3, S, S) pixels -> (B, T, H) embeddings with every image slot filled in order. Tower
        `features` (I, N, Dv) already computed (by a model sharing this tower) may be given instead of pixels."""
        embeds = self.lm.get_input_embeddings()(input_ids)  # (B, T, H)
        slots = input_ids == self.config.image_token_id  # (B, T)
        num_slots = int(slots.sum())
        given = features if features is not None else pixel_values
        num_images = 0 if given is None else given.shape[0]
        if num_slots != num_images * self.num_image_tokens:
            raise PromptError(
                f"the input has {num_slots} image-token slots but {num_images} image(s) x "
                f"{self.num_image_tokens} tokens were given; each image needs exactly one placeholder"
            )
        if num_images == 0:
            return embeds
        if features is None:
            features = self.image_features(pixel_values, graphed)
        images = self.project(features).to(embeds.dtype)  # (I, N, H)
        return embeds.masked_scatter(slots.unsqueeze(-1), images)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items: int | None = None,
    ) -> ModelOutput:
        """With `labels` (B, T), the LM head runs only where a next-token label exists.

        The loss is the mean over this batch's label tokens, or their sum divided by `num_items` when
        given (the label-token count of a whole accumulated or distributed global batch)."""
        embeds = self.embed(input_ids, pixel_values)
        if labels is None:
            logits = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
            return ModelOutput(loss=None, logits=logits)
        decoder = self.lm.get_decoder()
        hidden = decoder(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
        targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
        keep = targets != IGNORE_INDEX
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep])  # (L, V)
        if num_items is None:
            loss = F.cross_entropy(logits.float(), targets[keep]) if logits.shape[0] else logits.sum() * 0.0
        else:
            loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum") / num_items
        return ModelOutput(loss=loss, logits=logits, num_label_tokens=int(keep.sum()))
