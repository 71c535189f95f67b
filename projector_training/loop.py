"""The training loop: `fit` runs one optimisation `step` per global batch until the schedule ends.

A step: forward and backward over the global batch's micro-batches (gradient accumulation, the loss normalised by
the global batch's label-token count) -> the non-finite guard (a step whose loss or gradient is not finite is
skipped and counted; too many stop the run) -> clipping and AdamW -> the schedule -> the unusable-sample guard ->
progress (bar and trackers) -> a checkpoint when due, or when a signal asked the run to stop.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from projector_training.checkpoint import TrainState, latest_checkpoint, save_checkpoint
from projector_training.config import TrainConfig
from projector_training.data import DataError
from projector_training.memory import is_out_of_memory
from vlm.errors import VLMError
from vlm.modeling import VisionLanguageModule
from vlm.processing.chat import IGNORE_INDEX

__all__ = ["Run", "StopRequest", "fit", "micro_batch_loss"]

logger = logging.getLogger("projector_training")

Batch = dict[str, Any]
"""A collated micro-batch (see `projector_training.data.Collator`)."""


@dataclass
class Run:
    """The moving parts of one run: built by `projector_training.run.train`, driven by `fit`."""

    cfg: TrainConfig
    run_dir: Path
    accelerator: Any  # accelerate.Accelerator
    model: torch.nn.Module
    """The model as accelerate wrapped it (DDP, FSDP): what the forward and backward passes run through."""
    core: VisionLanguageModule
    """The bare model: its projector is what checkpoints and the final adapter hold."""
    params: list[torch.nn.Parameter]
    """The projector's parameters, the only trainable ones."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: torch.utils.data.DataLoader
    state: TrainState
    total_steps: int
    micro_batch: int
    accumulation: int
    """Micro-batches per process and optimizer step."""
    checkpointing: bool
    fsdp: bool
    log: Callable[[str], Any]

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def total(self, count: int) -> int:
        """Sum of a per-process count over all processes."""
        return int(self.accelerator.reduce(torch.tensor(count, device=self.accelerator.device), "sum"))


def fit(run: Run) -> None:
    """Train from `run.state.step` to `run.total_steps`. SIGTERM or Ctrl-C stops at the next step boundary, after a
    checkpoint (see `StopRequest`)."""
    batches = iter(run.loader)
    progress = Progress(run)
    run.model.train()
    with StopRequest() as stop:
        while run.state.step < run.total_steps:
            step(run, [next(batches) for _ in range(run.accumulation)], progress)
            checkpoint_or_stop(run, stop)
    progress.close()


def step(run: Run, micro: list[Batch], progress: Progress) -> None:
    """One optimizer step over a global batch, given as this process's micro-batches."""
    step_loss, samples, skipped = accumulate(run, micro)
    nonfinite, grad_norm = update(run, step_loss)
    guard_nonfinite(run.cfg, run.state, nonfinite, run.log)
    run.scheduler.step()
    run.state.step += 1
    run.state.samples += samples
    run.state.skipped += skipped
    guard_unusable(run.cfg, run.state)
    progress.update(grad_norm)


def accumulate(run: Run, micro: list[Batch]) -> tuple[torch.Tensor, int, int]:
    """Forward and backward over the micro-batches, gradients accumulated. Returns the global batch's loss (the sum
    over its label tokens / their count), its used samples and its skipped ones, each over all processes."""
    num_items = run.total(sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in micro))
    step_loss = torch.zeros((), device=run.accelerator.device)
    for i, m in enumerate(micro):
        try:
            step_loss += backward(run, m, sync=i == run.accumulation - 1, num_items=max(num_items, 1))
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            raise VLMError(_out_of_memory_advice(run.run_dir, run.state.step, run.micro_batch, m)) from None
    if run.fsdp and run.world > 1:  # FSDP leaves the (ignored) projector's gradients to us: average them as DDP does
        _all_reduce_mean([p.grad for p in run.params if p.grad is not None], run.world)
    step_loss = run.accelerator.reduce(step_loss, "sum")
    return step_loss, run.total(sum(m["num_samples"] for m in micro)), run.total(sum(m["num_skipped"] for m in micro))


def backward(run: Run, micro: Batch, sync: bool, num_items: int) -> torch.Tensor:
    """Forward and backward of one micro-batch; gradients are synchronised over processes only when `sync` (the
    last micro-batch of a step). Returns the loss, detached."""
    with nullcontext() if sync or run.world == 1 else run.accelerator.no_sync(run.model):
        if micro["num_samples"] == 0:  # every sample was unusable: keep the processes in step
            loss = sum(p.sum() for p in run.params) * 0.0
        else:
            loss = micro_batch_loss(run.model, micro, run.accelerator, num_items=num_items)
        # DDP averages gradients over processes; scale so the result is sum / global label tokens.
        run.accelerator.backward(loss * run.world)
    return loss.detach()


def update(run: Run, step_loss: torch.Tensor) -> tuple[str | None, torch.Tensor | None]:
    """Clip the gradients and step the optimizer, unless the loss or the gradient is not finite. Returns which of
    them was not (None if neither) and the gradient norm (None when the loss was not finite: none was computed)."""
    nonfinite, grad_norm = None, None
    if not torch.isfinite(step_loss):
        nonfinite = "loss"
    else:
        grad_norm = run.accelerator.clip_grad_norm_(run.params, run.cfg.max_grad_norm)
        if torch.isfinite(grad_norm):
            run.optimizer.step()
            run.state.last_loss = float(step_loss)
        else:  # a finite loss with an overflowed gradient: clipping would spread NaN into every weight
            nonfinite = "gradient"
    run.optimizer.zero_grad(set_to_none=True)
    return nonfinite, grad_norm


def guard_nonfinite(cfg: TrainConfig, state: TrainState, nonfinite: str | None, log: Callable[[str], Any]) -> None:
    """Count a step skipped for a non-finite loss or gradient; more than max_nonfinite_steps of them stop the run."""
    if nonfinite is None:
        return
    state.nonfinite_steps += 1
    log(f"step {state.step}: non-finite {nonfinite}, update skipped ({state.nonfinite_steps} so far)")
    if state.nonfinite_steps > cfg.max_nonfinite_steps:
        raise VLMError(
            f"{state.nonfinite_steps} steps had a non-finite loss or gradient (limit "
            f"{cfg.max_nonfinite_steps}); lower the learning rate or check the data"
        )


def guard_unusable(cfg: TrainConfig, state: TrainState) -> None:
    """Stop when more than max_bad_fraction of the samples seen so far were unusable (once four batches are in)."""
    seen = state.samples + state.skipped
    if seen and state.skipped / seen > cfg.max_bad_fraction and seen >= cfg.global_batch_size * 4:
        raise DataError(
            f"{state.skipped} of {seen} samples were unusable (unreadable images, or no answer left within "
            f"max_length={cfg.max_length}), more than max_bad_fraction={cfg.max_bad_fraction:.1%}"
        )


def checkpoint_or_stop(run: Run, stop: StopRequest) -> None:
    """A checkpoint every save_every steps, at the last step, and when a signal asked any process to stop; then,
    if one did, stop with a message that says how to go on."""
    state, cfg = run.state, run.cfg
    stopping = run.total(int(stop.signal is not None)) > 0  # every process stops at the same step
    main = run.accelerator.is_main_process
    saved = None
    if main and (state.step % cfg.save_every == 0 or state.step == run.total_steps or stopping):
        saved = save_checkpoint(run.run_dir, run.core, run.optimizer, run.scheduler, state, cfg.keep_checkpoints)
    run.accelerator.wait_for_everyone()
    if stopping and state.step < run.total_steps:
        raise VLMError(
            f"stopped by {stop.signal or 'a signal on another process'} at step {state.step} of {run.total_steps}"
            + (f", checkpoint {saved}" if main else "")
            + "; run the same command again to resume"
        )


class Progress:
    """The progress bar (loss, lr, samples/s) and the trackers' scalars, timed over this session."""

    def __init__(self, run: Run) -> None:
        self.run = run
        disable = not run.accelerator.is_main_process
        self.bar = tqdm(total=run.total_steps, initial=run.state.step, disable=disable, desc="align")
        self.started, self.start_samples = time.time(), run.state.samples
        self.earlier = run.state.elapsed  # the time of the run before it was resumed
        self.grad_norm = torch.tensor(float("nan"))  # the last one computed

    def update(self, grad_norm: torch.Tensor | None) -> None:
        """After a step: the run's elapsed time, the bar, and the trackers (unless report_to is none)."""
        run, state = self.run, self.run.state
        if grad_norm is not None:
            self.grad_norm = grad_norm
        now = time.time()
        state.elapsed = self.earlier + now - self.started
        rate = (state.samples - self.start_samples) / max(1e-9, now - self.started)  # this session's samples and time
        lr = run.scheduler.get_last_lr()[0]
        self.bar.set_postfix(loss=f"{state.last_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
        self.bar.update(1)
        if run.cfg.report_to != "none":
            run.accelerator.log(
                {"loss": state.last_loss, "lr": lr, "grad_norm": float(self.grad_norm), "samples_per_s": rate},
                step=state.step,
            )

    def close(self) -> None:
        self.bar.close()


class StopRequest:
    """While held (`with`): SIGTERM (a scheduler's pre-emption) or Ctrl-C asks the loop to stop at the next step
    boundary, after a checkpoint, instead of losing every step since the last one. A second signal stops at once."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # only there can handlers be set
            for number in (signal.SIGTERM, signal.SIGINT):
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def _handle(self, number: int, frame: Any) -> None:
        if self.signal is not None:  # asked twice: do what the signal would have done
            self.__exit__()
            signal.raise_signal(number)
            return
        self.signal = signal.Signals(number).name
        logger.warning("%s: stopping after this step, with a checkpoint (send it again to stop at once)", self.signal)


def micro_batch_loss(model: Any, micro: Batch, accelerator: Any, num_items: int | None = None) -> torch.Tensor:
    """The loss of one collated micro-batch, moved to the device, under the run's autocast."""
    device = accelerator.device
    pixels = micro["pixel_values"]
    with accelerator.autocast():
        return model(
            input_ids=micro["input_ids"].to(device),
            attention_mask=micro["attention_mask"].to(device),
            pixel_values=None if pixels is None else pixels.to(device),
            labels=micro["labels"].to(device),
            num_items=num_items,
        ).loss


def _out_of_memory_advice(run_dir: Path, step: int, micro_batch: int, micro: dict[str, Any]) -> str:
    newest = latest_checkpoint(run_dir)
    where = f"the newest checkpoint is {newest}" if newest else "no checkpoint was written yet"
    tokens = tuple(micro["input_ids"].shape)
    return (
        f"out of device memory at step {step} on a micro-batch of {tokens[0]} x {tokens[1]} tokens; {where}. "
        f"Run the same command with --micro-batch-size {max(1, micro_batch // 2)} (or --gradient-checkpointing "
        "true, or a lower --max-length): with --resume auto it continues from that checkpoint"
    )


def _all_reduce_mean(grads: list[torch.Tensor], world: int) -> None:
    """Average gradients over the processes in one collective (what DDP does for its parameters)."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
