"""The decode-engine protocol, and the choice of engine for a decode mode.

An engine owns a KV cache for a batch of rows: `prefill` runs left-padded prompt embeddings, `step` feeds one id
per row, `extend` feeds several at once and `rollback` forgets positions (speculative decoding checks drafted
tokens with `extend` and forgets the rejected ones). The decode loops (`vlm.generation.loop`,
`vlm.generation.speculative`) drive any engine the same way.

Engines: `PlainEngine` (transformers' forward and DynamicCache: any LM, any device) and `StaticEngine` (a static
cache, CUDA-graph replay on GPUs, Llama-architecture LMs).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from vlm.errors import VLMError
from vlm.generation.plain import PlainEngine
from vlm.generation.static import StaticEngine, supports_static_decode

__all__ = ["DECODE_MODES", "DecodeEngine", "EngineCache"]

DECODE_MODES = ("auto", "cuda_graph", "static", "compiled", "dynamic")
"""`auto` (static cache + CUDA graph on GPU for Llama LMs, else plain), `cuda_graph`, `static` (static cache
without graph capture), `compiled` (as `cuda_graph` on GPU, with each decoder layer's elementwise work fused by
torch.compile: faster decoding and batched captioning, but a first reply that waits for compilation) or `dynamic`
(transformers' DynamicCache)."""


class DecodeEngine(Protocol):
    """What the decode loop needs from an engine."""

    batch_size: int
    length: int
    """Positions the cache holds (prompt width + steps taken)."""
    use_cuda_graph: bool
    """Whether steps replay captured CUDA graphs (the vision tower then runs graphed too)."""

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Left-padded prompt embeddings (B, T, H), mask (B, T), rotary positions (B, T) -> last logits (B, V)."""
        ...

    def step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One id per row (B,) at rotary positions (B,) -> the following logits (B, V)."""
        ...

    def extend(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """K ids per row (B, K) at rotary positions (B, K), in one forward -> the logits after each (B, K, V)
        (speculative decoding checks K drafted tokens at once)."""
        ...

    def rollback(self, length: int) -> None:
        """Forget every position from `length` on."""
        ...


class EngineCache:
    """Chooses the engine for each generation and keeps the static one (and its captured graph) while it can serve:
    same mode and batch size, long enough, and the LM's weights where they were. Cache lengths are rounded up to
    256 so one captured graph serves many prompts."""

    def __init__(self, lm: nn.Module):
        self.lm = lm
        self.static: StaticEngine | None = None
        self.static_mode = ""  # the decode mode `static` was built for

    def engine(self, mode: str, device: torch.device, batch_size: int, length: int) -> DecodeEngine:
        if mode not in DECODE_MODES:
            raise VLMError(f"unknown decode mode {mode!r}: use one of {', '.join(DECODE_MODES)}")
        if mode == "auto":
            mode = "cuda_graph" if device.type == "cuda" and supports_static_decode(self.lm) else "dynamic"
        if mode == "dynamic":
            return PlainEngine(self.lm, batch_size)
        current = self.static
        reusable = current is not None and self.static_mode == mode and current.batch_size == batch_size
        if not reusable or current.max_len < length or not current.is_current():
            self.static = None  # free the old cache before allocating the new one
            bucket = -(-length // 256) * 256
            graph = mode == "cuda_graph" or (mode == "compiled" and device.type == "cuda")
            self.static = StaticEngine(self.lm, batch_size, bucket, graph, compile_layers=mode == "compiled")
            self.static_mode = mode
        return self.static
