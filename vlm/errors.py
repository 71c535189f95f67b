"""Errors a user can cause. Each message says what went wrong and what to do about it."""

from __future__ import annotations

__all__ = ["ConfigError", "ImageError", "InsufficientMemoryError", "PromptError", "VLMError"]


class VLMError(Exception):
    """Base class for every error that bad input or a bad setup can cause."""


class ImageError(VLMError):
    """An image could not be read safely (missing, truncated, too large, unsupported format, ...)."""


class ConfigError(VLMError):
    """An adapter directory, preset or configuration value is invalid or missing."""


class PromptError(VLMError):
    """A conversation cannot be turned into model input (bad roles, too long, image count mismatch)."""


class InsufficientMemoryError(VLMError):
    """The requested model does not fit in the available accelerator memory."""
