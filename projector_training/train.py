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

import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
from vlm.adapter import PROJECTOR_NAME, load_llava_projector, write_adapter
from vlm.api import build_model
from vlm.config import AdapterConfig
from vlm.errors import ConfigError, VLMError
from vlm.modeling import VisionLanguageModule
from vlm.processing.chat import IGNORE_INDEX

__all__ = ["TrainState", "freeze", "main", "train"]

logger = logging.getLogger("projector_training")

CHECKPOINTS = "checkpoints"
STATE = "trainer_state.json"


@dataclass
class TrainState:
    """What a checkpoint must hold besides weights to continue exactly."""

    step: int = 0
    samples: int = 0
    skipped: int = 0
    nonfinite_steps: int = 0
    last_loss: float = float("nan")
    elapsed: float = 0.0
    run: dict[str, Any] = field(default_factory=dict)  # `run_identity`: what the sample order depends on


# ---------------------------------------------------------------------------------------------------
# Model


def freeze(model: VisionLanguageModule, log: Any = logger.info) -> list[torch.nn.Parameter]:
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


def init_projector(model: VisionLanguageModule, cfg: TrainConfig) -> None:
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
# Checkpoints: written to a temporary directory, renamed into place, older ones pruned afterwards.


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def save_checkpoint(
    run_dir: Path, model: VisionLanguageModule, optimizer: Any, scheduler: Any, state: TrainState, keep: int
) -> Path:
    from safetensors.torch import save_file

    root = run_dir / CHECKPOINTS
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    projector = {k: v.detach().cpu().contiguous() for k, v in model.projector.state_dict().items()}
    save_file(projector, str(tmp / PROJECTOR_NAME))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / STATE).write_text(json.dumps(state.__dict__, indent=2))  # written last: marks completeness
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    # Prune by step, among this run's own checkpoints: ones past this step are from a branch the run left when it
    # was resumed from an earlier checkpoint, and `--resume auto` must not pick them up again.
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in [p for p in steps if p.name > final.name] + [p for p in steps if p.name <= final.name][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; interrupted writes (`.tmp-*` or no state file) are ignored."""
    candidates = sorted(p for p in (run_dir / CHECKPOINTS).glob("step-*") if (p / STATE).is_file())
    return candidates[-1] if candidates else None


def load_checkpoint(path: Path, model: VisionLanguageModule, optimizer: Any, scheduler: Any) -> TrainState:
    from safetensors.torch import load_file

    device = next(model.projector.parameters()).device  # under FSDP the LM is still on the CPU here
    model.load_projector_state(load_file(str(path / PROJECTOR_NAME), device=str(device)))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=False)  # our own file: python/numpy RNG tuples
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    return TrainState(**json.loads((path / STATE).read_text()))


def run_identity(cfg: TrainConfig, records: list[dict[str, Any]], lengths: list[int]) -> dict[str, Any]:
    """What fixes a run's sample order (besides the step): a checkpoint continues its run exactly only where these
    are the same. Records are hashed as parsed JSON, so reformatting the file changes nothing."""
    data = hashlib.sha256()
    for start in range(0, len(records), 4096):  # in chunks: a few seconds for LLaVA's 558k pretraining records
        data.update(json.dumps(records[start : start + 4096], sort_keys=True, ensure_ascii=False).encode())
    return {
        "records": len(records),
        "data_sha256": data.hexdigest()[:16],
        "lengths_sha256": hashlib.sha256(np.asarray(lengths, dtype=np.int64).tobytes()).hexdigest()[:16],
        "global_batch_size": cfg.global_batch_size,
        "seed": cfg.seed,
        "group_by_length": cfg.group_by_length,
    }


def check_same_run(checkpoint: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to continue a checkpoint under a different sample order: some samples would be seen twice and others
    never, with nothing in the log to say so. Checkpoints from before identities were recorded pass."""
    if not saved or saved == current:
        return
    changes = []
    if saved.get("data_sha256") != current["data_sha256"]:
        changes.append(f"the usable training records differ ({saved.get('records')} then, {current['records']} now)")
    elif saved.get("lengths_sha256") != current["lengths_sha256"]:
        changes.append("the samples' lengths differ (another number of image tokens per image)")
    for key in ("global_batch_size", "seed", "group_by_length"):
        if saved.get(key) != current[key]:
            changes.append(f"{key} was {saved.get(key)}, now {current[key]}")
    raise ConfigError(
        f"{checkpoint} belongs to a run with other data or batching: {'; '.join(changes)}. Resuming would replay "
        f"a different sample order. To continue that run, run it with its own settings and data; to train anew "
        f"from its projector, use --init-projector {checkpoint} with a new --output-dir (or --resume no there)"
    )


def apply_optimizer_settings(cfg: TrainConfig, optimizer: Any, scheduler: Any, log: Any) -> None:
    """This run's optimiser settings over the ones a checkpoint brought back: resuming with a lower --lr (what the
    non-finite guard advises) must lower it. With unchanged settings every value is the one restored."""
    restored = scheduler.base_lrs[0]
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        betas = (cfg.adam_beta1, cfg.adam_beta2)
        group.update(initial_lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas, eps=cfg.adam_eps)
        group["lr"] = cfg.lr * factor(scheduler.last_epoch)  # as LambdaLR computes it
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if restored != cfg.lr:
        log(f"the checkpoint trained at lr {restored:g}; this run goes on at {cfg.lr:g}")


def save_adapter(run_dir: Path, model: VisionLanguageModule) -> None:
    """The final adapter in the run directory, each file replaced atomically."""
    write_adapter(run_dir, model.config, model.projector_state())


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
    built = build_model(adapter_config(cfg), device="cpu" if fsdp else accelerator.device, dtype=lm_dtype)
    model, processor = built.module, built.processor
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
    dataset = ConversationDataset(records, image_root, processor, cfg.max_length)
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
    resume_from = _resume_path(cfg, run_dir)
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
    core: VisionLanguageModule = accelerator.unwrap_model(model)
    if fsdp:
        _check_projector_unsharded(core, shapes)
        log(f"FSDP: {_count_fsdp_units(model)} sharded units; the projector is replicated on every process")

    sampler = GlobalBatchSampler(
        lengths, cfg.global_batch_size, world, accelerator.process_index, accum, cfg.seed,
        group_by_length=cfg.group_by_length, start_step=state.step, epochs=cfg.epochs,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=Collator(processor.pad_id), num_workers=cfg.num_workers
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
    cfg: TrainConfig, model: VisionLanguageModule, dataset: Any, lengths: list[int], accelerator: Any, log: Any
) -> tuple[int, bool]:
    """Try forward + backward on the longest samples at each candidate micro-batch (see memory.py);
    every process tries on its own card, then all take the most cautious answer."""
    world = accelerator.num_processes
    candidates = candidate_micro_batches(cfg.micro_batch_size, cfg.global_batch_size // world)
    longest = sorted(range(len(lengths)), key=lambda i: -lengths[i])[: candidates[0]]
    samples = sorted((s for s in (dataset[i] for i in longest) if s is not None), key=lambda s: -len(s.input_ids))
    if not samples:
        return cfg.micro_batch_size, cfg.gradient_checkpointing
    collate = Collator(dataset.processor.pad_id)

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


def _check_projector_unsharded(core: VisionLanguageModule, shapes: list[tuple[int, ...]]) -> None:
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


def _resume_path(cfg: TrainConfig, run_dir: Path) -> Path | None:
    if cfg.resume == "no":
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(cfg.resume)
    if not (path / STATE).is_file():
        raise DataError(f"--resume {path}: not a complete checkpoint directory (no {STATE})")
    return path


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
