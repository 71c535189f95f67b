"""The plain decode engine: the LM's own forward with transformers' DynamicCache (any causal LM, any device)."""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

__all__ = ["PlainEngine", "cache_kwarg"]


@functools.cache
def cache_kwarg(lm_class: type) -> str:
    """transformers renamed `past_key_values` to `cache`: the name this version's LM class takes."""
    return "cache" if "cache" in inspect.signature(lm_class.forward).parameters else "past_key_values"


class PlainEngine:
    """Prefill, one-token steps and several-token extensions through `lm.forward` (see
    `vlm.generation.engine.DecodeEngine`)."""

    use_cuda_graph = False

    def __init__(self, lm: nn.Module, batch_size: int):
        self.lm = lm
        self.batch_size = batch_size
        self.length = 0
        self._cache_kwarg = cache_kwarg(type(lm))
        self._cache = None
        self._mask: torch.Tensor | None = None

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Left-padded prompts (B, T, H) -> the last position's logits (B, V); the cache holds T positions."""
        from transformers import DynamicCache

        self._cache = DynamicCache(config=self.lm.config)
        self._mask = attention_mask
        self.length = attention_mask.shape[1]
        return self.lm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: self._cache},
        ).logits[:, -1]

    def step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids (B,) at rotary positions (B,) -> the following logits (B, V)."""
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        self.length += 1
        return self.lm(
            input_ids=ids[:, None],
            attention_mask=self._mask,
            position_ids=positions[:, None],
            use_cache=True,
            **{self._cache_kwarg: self._cache},
        ).logits[:, -1]

    def extend(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids (B, K) at rotary positions (B, K) in one forward -> the logits after each (B, K, V)."""
        self._mask = torch.cat([self._mask, torch.ones_like(ids, dtype=self._mask.dtype)], dim=1)
        self.length += ids.shape[1]
        return self.lm(
            input_ids=ids,
            attention_mask=self._mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kwarg: self._cache},
        ).logits

    def rollback(self, length: int) -> None:
        """Forget every position from `length` on."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: the cache holds {self.length} positions")
        if length < self.length:  # a negative count removes that many (positive sizes are gone in transformers 5)
            self._cache.crop(length - self.length)
        self._mask = self._mask[:, :length]
        self.length = length
