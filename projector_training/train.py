"""Align a projector between a frozen CLIP tower and a frozen causal LM. Read top to bottom.

    vlm-train --recipe llava15-stage1-14b --data blip_laion_cc_sbu_558k.json --image-root images/
    accelerate launch --config_file configs/ddp.yaml -m projector_training --recipe ...   # several GPUs
    vlm-train --recipe toy                                                                 # offline demo

The story: resolve the config -> load the records -> build the model (only the projector trains) ->
resume from the newest complete checkpoint if there is one -> loop over global batches (gradient
accumulation, loss normalised by the global batch's label-token count, non-finite guard, clipping,
AdamW, cosine schedule) -> atomic checkpoints -> the final adapter directory that `vlm.load` opens.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from projector_training.checkpoint import (
    CHECKPOINTS,
    STATE,
    TrainState,
    apply_optimizer_settings,
    check_same_run,
    latest_checkpoint,
    load_checkpoint,
    resume_path,
    run_identity,
    save_adapter,
    save_checkpoint,
)
from projector_training.config import TrainConfig, parse_args
from projector_training.data import (
    Collator,
    ConversationDataset,
    DataError,
    GlobalBatchSampler,
    load_records,
    malformed,
    record_images,
)
from projector_training.memory import candidate_micro_batches, fit_micro_batch, is_out_of_memory, try_training_pass
from vlm.config import PROJECTOR_NAME, AdapterConfig
from vlm.errors import ConfigError, VLMError
from vlm.model import VisionLanguageModel, build_model
from vlm.projector import load_llava_projector
from vlm.prompt import IGNORE_INDEX

__all__ = ["freeze", "main", "train"]

logger = logging.getLogger("projector_training")

# ---------------------------------------------------------------------------------------------------
# Model


def freeze(model: VisionLanguageModel, log: Any = logger.info) -> list[torch.nn.Parameter]:
    """Only the projector trains. Logs each part as frozen or trainable; returns the trainable params."""
    model.vision.requires_grad_(False)
    model.lm.requires_grad_(False)
    model.projector.requires_grad_(True)
    for name, part in (("vision tower", model.vision), ("projector", model.projector), ("language model", model.lm)):
        count = sum(p.numel() for p in part.parameters())
        state = "trainable" if any(p.requires_grad for p in part.parameters()) else "frozen"
        log(f"{name:>14}: {state:9} {count / 1e6:10.2f}M parameters")
    return list(model.projector.parameters())


def adapter_config(cfg: TrainConfig) -> AdapterConfig:
    return AdapterConfig(
        lm=cfg.lm,
        vision_tower=cfg.vision_tower,
        vision_backend=cfg.vision_backend,
        vision_pretrained=cfg.vision_pretrained,
        select_layer=cfg.select_layer,
        select_feature=cfg.select_feature,
        image_aspect=cfg.image_aspect,
        projector_type=cfg.projector_type,
        system_prompt=cfg.system_prompt,
        max_length=max(cfg.max_length, 4096),
        extra={"recipe": cfg.recipe, **({"caption_prompt": cfg.caption_prompt} if cfg.caption_prompt else {})},
    )


def init_projector(model: VisionLanguageModel, cfg: TrainConfig) -> None:
    """Seeded default init, or weights from an adapter directory / LLaVA mm_projector file."""
    torch.manual_seed(cfg.seed)
    for module in model.projector:
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    if cfg.init_projector:
        source = Path(cfg.init_projector)
        if source.is_dir():
            from safetensors.torch import load_file

            if not (source / PROJECTOR_NAME).is_file():
                raise ConfigError(
                    f"--init-projector {source}: no {PROJECTOR_NAME} there (an unfinished run?); give a finished run "
                    "directory, or a LLaVA mm_projector.bin / .safetensors file"
                )
            state = load_file(str(source / PROJECTOR_NAME))
        else:
            state = load_llava_projector(source)
        model.load_projector_state({k: v.float() for k, v in state.items()})


# ---------------------------------------------------------------------------------------------------
# Data


def check_records(
    records: list[dict[str, Any]], image_root: Path, max_bad_fraction: float, log: Any
) -> list[dict[str, Any]]:
    """Drop malformed records (see `malformed`; the first few are named) and those whose image files are missing;
    stop if too many are."""
    good, bad, missing = [], 0, 0
    for index, record in enumerate(records):
        if (reason := malformed(record)) is not None:
            bad += 1
            if bad <= 3:
                log(f"skipping record {index} (id {record.get('id')!r}): {reason}")
        elif not all((image_root / p).is_file() for p in record_images(record)):
            missing += 1
        else:
            good.append(record)
    if bad:
        log(f"skipping {bad} of {len(records)} malformed records")
    if missing:
        log(f"skipping {missing} of {len(records)} records with missing image files under {image_root}")
    if records and (bad + missing) / len(records) > max_bad_fraction:
        raise DataError(
            f"{bad + missing} of {len(records)} records ({(bad + missing) / len(records):.1%}) cannot be used "
            f"({bad} malformed, {missing} with missing images), more than max_bad_fraction={max_bad_fraction:.1%}; "
            f"check the data file and --image-root ({image_root})"
        )
    return good


# ---------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig) -> Path:
    from accelerate import Accelerator, DistributedType
    from tqdm.auto import tqdm
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    run_dir = Path(cfg.output_dir)
    if cfg.resume == "no" and latest_checkpoint(run_dir) is not None:
        raise ConfigError(
            f"{run_dir} already holds checkpoints of another run, which --resume no would mix with this one's; "
            f"use a new --output-dir, or remove {run_dir / CHECKPOINTS}"
        )
    accelerator = Accelerator(
        mixed_precision=cfg.resolved_mixed_precision(),
        cpu=cfg.device == "cpu",
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(run_dir),
    )
    world = accelerator.num_processes
    if cfg.global_batch_size % (cfg.micro_batch_size * world):
        raise DataError(
            f"global_batch_size {cfg.global_batch_size} must be a multiple of micro_batch_size x processes "
            f"({cfg.micro_batch_size} x {world})"
        )
    log = logger.info if accelerator.is_main_process else (lambda *_: None)
    log(f"run directory {run_dir}; {world} process(es)")

    # 1. The records, before the model: a typo in --data should not cost loading a 14B model.
    image_root = Path(cfg.image_root)
    records = check_records(load_records(cfg.data), image_root, cfg.max_bad_fraction, log)

    # 2. The model: frozen tower and LM in the compute dtype, fp32 projector (the trainable master weights).
    #    Under FSDP the frozen backbones stay on the CPU until FSDP shards them onto the devices (a card need
    #    not hold a whole replica); the projector, replicated, goes to the device now.
    lm_dtype = torch.bfloat16 if cfg.resolved_mixed_precision() == "bf16" else torch.float32
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    model = build_model(adapter_config(cfg), device="cpu" if fsdp else accelerator.device, dtype=lm_dtype)
    model.projector.to(device=accelerator.device, dtype=torch.float32)
    init_projector(model, cfg)
    params = freeze(model, log)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if cfg.compile_lm_layers and fsdp:
        log("compile_lm_layers is not applied under FSDP (an untested combination)")
    elif cfg.compile_lm_layers:
        model.compile_lm_layers()

    # 3. The samples.
    dataset = ConversationDataset(records, image_root, model, cfg.max_length)
    lengths = [dataset.length(i) for i in range(len(dataset))]

    # 4. The micro-batch: on a GPU, the largest that fits (halving micro_batch_size, checkpointing last).
    micro_batch, checkpointing = cfg.micro_batch_size, cfg.gradient_checkpointing
    if cfg.auto_micro_batch and _can_probe(accelerator, fsdp):
        micro_batch, checkpointing = _choose_micro_batch(cfg, model, dataset, lengths, accelerator, log)
    accum = cfg.global_batch_size // (micro_batch * world)
    log(f"micro-batch {micro_batch}, accumulation {accum}" + (", gradient checkpointing" if checkpointing else ""))

    # 5. Optimiser and schedule over the whole run.
    steps_per_epoch = len(records) // cfg.global_batch_size
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    if total_steps < 1:
        raise DataError(f"{len(records)} usable records make no full global batch of {cfg.global_batch_size}")
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps
    )
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    schedule = get_cosine_schedule_with_warmup if cfg.lr_schedule == "cosine" else get_constant_schedule_with_warmup
    scheduler = schedule(optimizer, warmup, total_steps) if cfg.lr_schedule == "cosine" else schedule(optimizer, warmup)

    # 6. Resume from the newest complete checkpoint.
    state = TrainState()
    identity = run_identity(cfg, records, lengths)
    resume_from = resume_path(cfg, run_dir)
    if resume_from is not None:
        check_same_run(resume_from, json.loads((resume_from / STATE).read_text()).get("run", {}), identity)
        state = load_checkpoint(resume_from, model, optimizer, scheduler)  # (RNGs and optimiser: only once checked)
        apply_optimizer_settings(cfg, optimizer, scheduler, log)
        log(f"resumed from {resume_from} at step {state.step}")
    state.run = identity
    if accelerator.is_main_process:  # after the resume checks: a refused run leaves the old run's settings alone
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "train_config.yaml")
    shapes = [tuple(p.shape) for p in params]
    model, optimizer = accelerator.prepare(model, optimizer)
    core: VisionLanguageModel = accelerator.unwrap_model(model)
    if fsdp:
        _check_projector_unsharded(core, shapes)
        log(f"FSDP: {_count_fsdp_units(model)} sharded units; the projector is replicated on every process")

    sampler = GlobalBatchSampler(
        lengths, cfg.global_batch_size, world, accelerator.process_index, accum, cfg.seed,
        group_by_length=cfg.group_by_length, start_step=state.step, epochs=cfg.epochs,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=Collator(core.pad_id), num_workers=cfg.num_workers
    )
    if cfg.report_to != "none":
        accelerator.init_trackers("train", config=cfg.to_dict())

    # 7. The loop: one optimizer step per global batch.
    batches = iter(loader)
    bar = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_main_process, desc="align")
    started, start_samples = time.time(), state.samples
    earlier = state.elapsed  # the time of the run before it was resumed
    model.train()
    grad_norm = torch.tensor(float("nan"))

    def total(count: int) -> int:
        """Sum of a per-process count over all processes."""
        return int(accelerator.reduce(torch.tensor(count, device=accelerator.device), "sum"))

    with StopRequest() as stop:
        while state.step < total_steps:
            micro = [next(batches) for _ in range(accum)]
            num_items = total(sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in micro))
            step_loss = torch.zeros((), device=accelerator.device)
            for i, m in enumerate(micro):
                sync = i == accum - 1
                try:
                    with nullcontext() if sync or world == 1 else accelerator.no_sync(model):
                        if m["num_samples"] == 0:  # every sample was unusable: keep the processes in step
                            loss = sum(p.sum() for p in params) * 0.0
                        else:
                            loss = _loss(model, m, accelerator, num_items=max(num_items, 1))
                        # DDP averages gradients over processes; scale so the result is sum / global label tokens.
                        accelerator.backward(loss * world)
                        step_loss += loss.detach()
                except Exception as error:
                    if not is_out_of_memory(error):
                        raise
                    raise VLMError(_out_of_memory_advice(run_dir, state.step, micro_batch, m)) from None
            if fsdp and world > 1:  # FSDP leaves the (ignored) projector's gradients to us: average them as DDP does
                _all_reduce_mean([p.grad for p in params if p.grad is not None], world)
            step_loss = accelerator.reduce(step_loss, "sum")
            batch_samples = total(sum(m["num_samples"] for m in micro))
            skipped = total(sum(m["num_skipped"] for m in micro))

            nonfinite = None
            if not torch.isfinite(step_loss):
                nonfinite = "loss"
            else:
                grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                if torch.isfinite(grad_norm):
                    optimizer.step()
                    state.last_loss = float(step_loss)
                else:  # a finite loss with an overflowed gradient: clipping would spread NaN into every weight
                    nonfinite = "gradient"
            optimizer.zero_grad(set_to_none=True)
            if nonfinite:
                state.nonfinite_steps += 1
                log(f"step {state.step}: non-finite {nonfinite}, update skipped ({state.nonfinite_steps} so far)")
                if state.nonfinite_steps > cfg.max_nonfinite_steps:
                    raise VLMError(
                        f"{state.nonfinite_steps} steps had a non-finite loss or gradient (limit "
                        f"{cfg.max_nonfinite_steps}); lower the learning rate or check the data"
                    )
            scheduler.step()
            state.step += 1
            state.samples += batch_samples
            state.skipped += skipped
            seen = state.samples + state.skipped
            if seen and state.skipped / seen > cfg.max_bad_fraction and seen >= cfg.global_batch_size * 4:
                raise DataError(
                    f"{state.skipped} of {seen} samples were unusable (unreadable images, or no answer left within "
                    f"max_length={cfg.max_length}), more than max_bad_fraction={cfg.max_bad_fraction:.1%}"
                )
            now = time.time()
            state.elapsed = earlier + now - started
            rate = (state.samples - start_samples) / max(1e-9, now - started)  # this session's samples and time
            lr = scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{state.last_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
            bar.update(1)
            if cfg.report_to != "none":
                accelerator.log(
                    {"loss": state.last_loss, "lr": lr, "grad_norm": float(grad_norm), "samples_per_s": rate},
                    step=state.step,
                )
            stopping = total(int(stop.signal is not None)) > 0  # every process stops at the same step
            if accelerator.is_main_process and (
                state.step % cfg.save_every == 0 or state.step == total_steps or stopping
            ):
                saved = save_checkpoint(run_dir, core, optimizer, scheduler, state, cfg.keep_checkpoints)
            accelerator.wait_for_everyone()
            if stopping and state.step < total_steps:
                raise VLMError(
                    f"stopped by {stop.signal or 'a signal on another process'} at step {state.step} of {total_steps}"
                    + (f", checkpoint {saved}" if accelerator.is_main_process else "")
                    + "; run the same command again to resume"
                )
    bar.close()
    if state.samples == 0:  # a run too short for the fraction check above, every sample of which was unusable
        raise DataError(
            f"none of the {state.skipped} samples could be used (unreadable images, or no answer left within "
            f"max_length={cfg.max_length}); no adapter was written"
        )

    if accelerator.is_main_process:
        save_adapter(run_dir, core)
        summary = {
            "steps": state.step,
            "samples": state.samples,
            "skipped": state.skipped,
            "nonfinite_steps": state.nonfinite_steps,
            "seconds": round(state.elapsed, 1),
            "final_loss": state.last_loss,
            "micro_batch_size": micro_batch,
            "gradient_checkpointing": checkpointing,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log("summary: " + json.dumps(summary))
    accelerator.end_training()
    return run_dir


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


def _can_probe(accelerator: Any, fsdp: bool) -> bool:
    """Memory tries need a CUDA device; under FSDP a try would run sharded collectives that an
    out-of-memory on one process would leave the others waiting in, so FSDP keeps micro_batch_size."""
    return accelerator.device.type == "cuda" and not fsdp


def _choose_micro_batch(
    cfg: TrainConfig, model: VisionLanguageModel, dataset: Any, lengths: list[int], accelerator: Any, log: Any
) -> tuple[int, bool]:
    """Try forward + backward on the longest samples at each candidate micro-batch (see memory.py);
    every process tries on its own card, then all take the most cautious answer."""
    world = accelerator.num_processes
    candidates = candidate_micro_batches(cfg.micro_batch_size, cfg.global_batch_size // world)
    longest = sorted(range(len(lengths)), key=lambda i: -lengths[i])[: candidates[0]]
    samples = sorted((s for s in (dataset[i] for i in longest) if s is not None), key=lambda s: -len(s.input_ids))
    if not samples:
        return cfg.micro_batch_size, cfg.gradient_checkpointing
    collate = Collator(model.pad_id)

    def fits(batch: int) -> bool:
        m = collate([samples[i % len(samples)] for i in range(batch)])
        return try_training_pass(model, lambda: _loss(model, m, accelerator), accelerator.device)

    what = f"{len(samples[0].input_ids)} tokens each"
    batch, checkpointing = fit_micro_batch(
        candidates, fits, model.enable_gradient_checkpointing, cfg.gradient_checkpointing, log, what
    )
    if world > 1:  # the smallest micro-batch any process can take, checkpointing if any process needs it
        answers = accelerator.gather(torch.tensor([[batch, int(checkpointing)]], device=accelerator.device))
        batch, needs = int(answers[:, 0].min()), bool(answers[:, 1].max())
        if needs and not checkpointing:
            model.enable_gradient_checkpointing()
        checkpointing = needs
    return batch, checkpointing


def _out_of_memory_advice(run_dir: Path, step: int, micro_batch: int, micro: dict[str, Any]) -> str:
    newest = latest_checkpoint(run_dir)
    where = f"the newest checkpoint is {newest}" if newest else "no checkpoint was written yet"
    tokens = tuple(micro["input_ids"].shape)
    return (
        f"out of device memory at step {step} on a micro-batch of {tokens[0]} x {tokens[1]} tokens; {where}. "
        f"Run the same command with --micro-batch-size {max(1, micro_batch // 2)} (or --gradient-checkpointing "
        "true, or a lower --max-length): with --resume auto it continues from that checkpoint"
    )


def _check_projector_unsharded(core: VisionLanguageModel, shapes: list[tuple[int, ...]]) -> None:
    """Under FSDP the frozen towers are sharded but the small trainable projector must stay whole."""
    from torch.distributed.tensor import DTensor

    params = list(core.projector.parameters())
    if any(isinstance(p, DTensor) for p in params) or [tuple(p.shape) for p in params] != shapes:
        raise ConfigError(
            "FSDP sharded the projector: add `fsdp_ignored_modules: projector` to the accelerate config's "
            "fsdp_config (configs/accelerate/fsdp.yaml has it) so that only the frozen LM and tower are sharded"
        )


def _count_fsdp_units(model: torch.nn.Module) -> int:
    """FSDP1 wrappers or FSDP2 fully_shard modules (whose classes are renamed FSDP<name>)."""
    names = (type(m).__name__ for m in model.modules())
    return sum(name == "FullyShardedDataParallel" or name.startswith("FSDP") for name in names)


def _all_reduce_mean(grads: list[torch.Tensor], world: int) -> None:
    """Average gradients over the processes in one collective (what DDP does for its parameters)."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _loss(model: Any, micro: dict[str, Any], accelerator: Any, num_items: int | None = None) -> torch.Tensor:
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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logger.setLevel(logging.INFO)
    try:
        cfg = parse_args(argv)
        if cfg.recipe == "toy":
            from projector_training.recipes import run_toy

            run_toy(cfg)
        else:
            train(cfg)
    except VLMError as e:
        if os.environ.get("VLM_DEBUG"):
            raise
        print(f"vlm-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
