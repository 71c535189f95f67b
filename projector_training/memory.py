"""Choosing the micro-batch: the largest that fits the card without gradient checkpointing, else with it.

Stage-1 speed barely changes between micro-batches 8 and 32 on a 14B LM, but recomputing the frozen
LM's activations costs about a third more compute, so checkpointing is the last resort: the search
first halves the micro-batch without it, and only when not even the smallest fits does it switch
checkpointing on and search again. Each try is one forward and backward pass of the longest samples,
run on the bare model before any distributed wrapper, so an out-of-memory try touches no collective.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from vlm.errors import ConfigError

__all__ = [
    "HEADROOM",
    "candidate_micro_batches",
    "fit_micro_batch",
    "is_out_of_memory",
    "try_training_pass",
    "within_headroom",
]

HEADROOM = 0.05
"""Share of the card's memory a try must leave unreserved: later batches of other lengths fragment
the allocator, so a try that only just fits is counted as not fitting."""


def is_out_of_memory(error: BaseException) -> bool:
    """Out of device or host memory (accelerate's classifier, which knows each backend's message)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    from accelerate.utils.memory import should_reduce_batch_size

    return should_reduce_batch_size(error)


def candidate_micro_batches(largest: int, per_process: int) -> list[int]:
    """`largest`, then the powers of two below it that divide the per-process share of a global batch."""
    powers = (2**k for k in range(largest.bit_length(), -1, -1))
    return [largest] + [b for b in powers if b < largest and not per_process % b]


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fit_micro_batch(
    candidates: list[int],
    fits: Callable[[int], bool],
    enable_checkpointing: Callable[[], None],
    checkpointing: bool,
    log: Callable[[str], Any],
    what: str = "one sample",
) -> tuple[int, bool]:
    """The first of `candidates` for which `fits(batch)` holds, without checkpointing if any does.

    `fits` raises an out-of-memory error or returns False when the batch does not fit. Returns
    (micro_batch, checkpointing); raises ConfigError when nothing fits even with checkpointing."""
    for with_checkpointing in (False, True) if not checkpointing else (True,):
        if with_checkpointing and not checkpointing:
            log("micro-batch: nothing fits without gradient checkpointing; switching it on")
            enable_checkpointing()
        for batch in candidates:
            try:
                ok = fits(batch)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                ok = False
            _release_memory()  # outside the except block: the traceback no longer pins the activations
            if ok:
                log(f"micro-batch: {batch} fits" + (" with gradient checkpointing" if with_checkpointing else ""))
                return batch, with_checkpointing
            log(f"micro-batch: {batch} does not fit" + (" with gradient checkpointing" if with_checkpointing else ""))
    raise ConfigError(
        f"not even a micro-batch of {candidates[-1]} ({what}) fits in memory with gradient checkpointing; "
        "shard the frozen LM with FSDP (accelerate launch --config_file configs/accelerate/fsdp.yaml), "
        "lower --max-length, or use a card with more memory"
    )


def try_training_pass(model: Any, loss: Callable[[], torch.Tensor], device: torch.device) -> bool:
    """One forward and backward pass of `loss()` with `model` in training mode (its projector's gradients
    cleared and its mode restored after) -> whether it stayed within HEADROOM. Out-of-memory propagates."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    was_training = model.training
    model.train()
    try:
        loss().backward()
    finally:
        model.projector.zero_grad(set_to_none=True)
        model.train(was_training)
    return within_headroom(device)


def within_headroom(device: torch.device) -> bool:
    """After a try on a CUDA device: whether its peak reservation left HEADROOM of the card free."""
    if device.type != "cuda":
        return True
    total = torch.cuda.get_device_properties(device).total_memory
    return torch.cuda.max_memory_reserved(device) <= (1 - HEADROOM) * total
