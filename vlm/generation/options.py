"""How to generate: `GenerationOptions`, checked when made so a bad value is a VLMError naming the option."""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any

from vlm.errors import VLMError

__all__ = ["GenerationOptions"]


@dataclass
class GenerationOptions:
    """How to generate. `temperature=0` is greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    """Extra stop strings; generation also stops on `<|im_end|>` and `<|endoftext|>`."""
    blocked_words: list[str] = field(default_factory=list)
    """Words or phrases the output may not contain: their token sequences are banned, and any that
    still appear (spelled with other tokens) are replaced by `[filtered]`."""

    def __post_init__(self) -> None:
        self._check_types()
        if self.max_new_tokens < 1:
            raise VLMError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise VLMError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise VLMError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise VLMError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise VLMError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.temperature == 0 and (self.top_p < 1 or self.top_k > 0):
            warnings.warn(
                "top_p and top_k do nothing at temperature 0 (greedy decoding); give a temperature > 0 to sample",
                stacklevel=4,
            )
        self.stop = [s for s in self.stop if s]
        self.blocked_words = [w for w in (w.strip() for w in self.blocked_words) if w]

    def _check_types(self) -> None:
        """Whole numbers where counts are meant, floats (2 is 2.0) for the rest, strings for stop and blocked
        words (one string is a list of one): a wrong type is a VLMError naming the option, not a failure deep in
        the sampling code."""
        for name in ("max_new_tokens", "top_k", "seed"):
            value = getattr(self, name)
            if value is None and name == "seed":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise VLMError(f"{name} must be a whole number, got {value!r}")
            setattr(self, name, int(value))
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise VLMError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise VLMError(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise VLMError(f"seed must fit in 64 bits (0 to 2**64 - 1), got {self.seed}")
        for name in ("stop", "blocked_words"):
            value = getattr(self, name)
            value = [] if value is None else [value] if isinstance(value, str) else value
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise VLMError(f"{name} must be a string or a list of strings, got {value!r}")
            setattr(self, name, list(value))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> GenerationOptions:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise VLMError(f"unknown generation options {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in kwargs.items() if v is not None})
