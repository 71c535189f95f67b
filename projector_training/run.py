"""One alignment run, read top to bottom: `train(cfg)` aligns a projector between a frozen CLIP tower and a frozen
causal LM.

The story: the records -> the model (only the projector trains) -> the samples -> the micro-batch -> the optimiser
and a schedule over the whole run -> resume from the newest complete checkpoint if there is one -> accelerate's
wrappers and the loader -> `fit` (loop.py: gradient accumulation, loss normalised by the global batch's label-token
count, non-finite guard, clipping, AdamW, atomic checkpoints) -> the final adapter directory that `vlm.load` opens.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from projector_training.checkpoint import check_fresh_start, resume, run_identity, save_adapter
from projector_training.config import TrainConfig, adapter_config
from projector_training.data import (
    Collator,
    ConversationDataset,
    DataError,
    GlobalBatchSampler,
    load_records,
    malformed,
    record_images,
)
from projector_training.loop import Run, fit, micro_batch_loss
from projector_training.memory import candidate_micro_batches, fit_micro_batch, try_training_pass
from vlm.adapter import PROJECTOR_NAME, load_llava_projector, read_projector
from vlm.api import build_model
from vlm.errors import ConfigError
from vlm.modeling import VisionLanguageModule
from vlm.processing import Processor

__all__ = ["check_records", "freeze", "init_projector", "train"]

logger = logging.getLogger("projector_training")

Log = Callable[[str], Any]


def train(cfg: TrainConfig) -> Path:
    """Align the projector as `cfg` says; returns the run directory, which then holds the final adapter."""
    from accelerate import DistributedType

    run_dir = Path(cfg.output_dir)
    check_fresh_start(cfg, run_dir)
    accelerator = start_accelerator(cfg, run_dir)
    log = logger.info if accelerator.is_main_process else (lambda *_: None)
    log(f"run directory {run_dir}; {accelerator.num_processes} process(es)")
    fsdp = accelerator.distributed_type == DistributedType.FSDP

    # The records before the model: a typo in --data should not cost loading a 14B model.
    image_root = Path(cfg.image_root)
    records = check_records(load_records(cfg.data), image_root, cfg.max_bad_fraction, log)
    model, processor, params = prepare_model(cfg, accelerator, fsdp, log)
    dataset = ConversationDataset(records, image_root, processor, cfg.max_length)
    lengths = [dataset.length(i) for i in range(len(dataset))]
    micro_batch, checkpointing = choose_micro_batch(cfg, model, dataset, lengths, accelerator, fsdp, log)
    accum = cfg.global_batch_size // (micro_batch * accelerator.num_processes)
    log(f"micro-batch {micro_batch}, accumulation {accum}" + (", gradient checkpointing" if checkpointing else ""))
    total_steps, optimizer, scheduler = optimise(cfg, params, len(records))
    state = resume(cfg, run_dir, model, optimizer, scheduler, run_identity(cfg, records, lengths), log)
    if accelerator.is_main_process:  # after the resume checks: a refused run leaves the old run's settings alone
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "train_config.yaml")
    wrapped, optimizer, core = distribute(accelerator, model, optimizer, params, fsdp, log)
    loader = batches(cfg, dataset, lengths, accelerator, accum, state.step, processor.pad_id)
    if cfg.report_to != "none":
        accelerator.init_trackers("train", config=cfg.to_dict())

    run = Run(
        cfg=cfg, run_dir=run_dir, accelerator=accelerator, model=wrapped, core=core, params=params,
        optimizer=optimizer, scheduler=scheduler, loader=loader, state=state, total_steps=total_steps,
        micro_batch=micro_batch, accumulation=accum, checkpointing=checkpointing, fsdp=fsdp, log=log,
    )  # fmt: skip
    fit(run)
    return finish(run)


def start_accelerator(cfg: TrainConfig, run_dir: Path) -> Any:
    """accelerate's view of the devices and processes, once the global batch is known to split evenly over them."""
    from accelerate import Accelerator

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
    return accelerator


# ---------------------------------------------------------------------------------------------------
# The records


def check_records(
    records: list[dict[str, Any]], image_root: Path, max_bad_fraction: float, log: Log
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
# The model


def prepare_model(
    cfg: TrainConfig, accelerator: Any, fsdp: bool, log: Log
) -> tuple[VisionLanguageModule, Processor, list[torch.nn.Parameter]]:
    """The model, the processor that makes its inputs, and its trainable parameters: frozen tower and LM in the
    compute dtype, fp32 projector (the trainable master weights). Under FSDP the frozen backbones stay on the CPU
    until FSDP shards them onto the devices (a card need not hold a whole replica); the projector, replicated, goes
    to the device now."""
    lm_dtype = torch.bfloat16 if cfg.resolved_mixed_precision() == "bf16" else torch.float32
    built = build_model(adapter_config(cfg), device="cpu" if fsdp else accelerator.device, dtype=lm_dtype)
    model = built.module
    model.projector.to(device=accelerator.device, dtype=torch.float32)
    init_projector(model, cfg)
    params = freeze(model, log)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if cfg.compile_lm_layers and fsdp:
        log("compile_lm_layers is not applied under FSDP (an untested combination)")
    elif cfg.compile_lm_layers:
        model.compile_lm_layers()
    return model, built.processor, params


def freeze(model: VisionLanguageModule, log: Log = logger.info) -> list[torch.nn.Parameter]:
    """Only the projector trains. Logs each part as frozen or trainable; returns the trainable params."""
    model.vision.requires_grad_(False)
    model.lm.requires_grad_(False)
    model.projector.requires_grad_(True)
    for name, part in (("vision tower", model.vision), ("projector", model.projector), ("language model", model.lm)):
        count = sum(p.numel() for p in part.parameters())
        state = "trainable" if any(p.requires_grad for p in part.parameters()) else "frozen"
        log(f"{name:>14}: {state:9} {count / 1e6:10.2f}M parameters")
    return list(model.projector.parameters())


def init_projector(model: VisionLanguageModule, cfg: TrainConfig) -> None:
    """Seeded default init, or weights from an adapter directory / LLaVA mm_projector file."""
    torch.manual_seed(cfg.seed)
    for module in model.projector:
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    if cfg.init_projector:
        source = Path(cfg.init_projector)
        if source.is_dir():
            if not (source / PROJECTOR_NAME).is_file():
                raise ConfigError(
                    f"--init-projector {source}: no {PROJECTOR_NAME} there (an unfinished run?); give a finished run "
                    "directory, or a LLaVA mm_projector.bin / .safetensors file"
                )
            state = read_projector(source)
        else:
            state = load_llava_projector(source)
        model.load_projector_state({k: v.float() for k, v in state.items()})


# ---------------------------------------------------------------------------------------------------
# The micro-batch: on a GPU, the largest that fits (halving micro_batch_size, checkpointing last)


def choose_micro_batch(
    cfg: TrainConfig, model: VisionLanguageModule, dataset: Any, lengths: list[int], accelerator: Any, fsdp: bool,
    log: Log,
) -> tuple[int, bool]:  # fmt: skip
    """(micro_batch, gradient checkpointing): the configured ones, or where memory can be tried, what fits."""
    if cfg.auto_micro_batch and _can_probe(accelerator, fsdp):
        return _search_micro_batch(cfg, model, dataset, lengths, accelerator, log)
    return cfg.micro_batch_size, cfg.gradient_checkpointing


def _can_probe(accelerator: Any, fsdp: bool) -> bool:
    """Memory tries need a CUDA device; under FSDP a try would run sharded collectives that an
    out-of-memory on one process would leave the others waiting in, so FSDP keeps micro_batch_size."""
    return accelerator.device.type == "cuda" and not fsdp


def _search_micro_batch(
    cfg: TrainConfig, model: VisionLanguageModule, dataset: Any, lengths: list[int], accelerator: Any, log: Log
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
        return try_training_pass(model, lambda: micro_batch_loss(model, m, accelerator), accelerator.device)

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


# ---------------------------------------------------------------------------------------------------
# Optimiser, schedule, accelerate's wrappers and the batches


def optimise(cfg: TrainConfig, params: list[torch.nn.Parameter], records: int) -> tuple[int, Any, Any]:
    """(total_steps, AdamW, its schedule over the whole run) for `records` usable records."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    steps_per_epoch = records // cfg.global_batch_size
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    if total_steps < 1:
        raise DataError(f"{records} usable records make no full global batch of {cfg.global_batch_size}")
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps
    )
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if cfg.lr_schedule == "cosine":
        return total_steps, optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    return total_steps, optimizer, get_constant_schedule_with_warmup(optimizer, warmup)


def distribute(
    accelerator: Any,
    model: VisionLanguageModule,
    optimizer: Any,
    params: list[torch.nn.Parameter],
    fsdp: bool,
    log: Log,
) -> tuple[torch.nn.Module, Any, VisionLanguageModule]:
    """The model and optimiser as accelerate wraps them (DDP; or FSDP, sharding the frozen parts only), and the bare
    model inside."""
    shapes = [tuple(p.shape) for p in params]
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    core: VisionLanguageModule = accelerator.unwrap_model(wrapped)
    if fsdp:
        _check_projector_unsharded(core, shapes)
        log(f"FSDP: {_count_fsdp_units(wrapped)} sharded units; the projector is replicated on every process")
    return wrapped, optimizer, core


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


def batches(
    cfg: TrainConfig, dataset: Any, lengths: list[int], accelerator: Any, accum: int, start_step: int, pad_id: int
) -> torch.utils.data.DataLoader:
    """This process's micro-batches from `start_step` on: `accum` of them per global batch, global batches of
    samples of similar length (`group_by_length`), in an order fixed by the seed and shared by every process."""
    sampler = GlobalBatchSampler(
        lengths, cfg.global_batch_size, accelerator.num_processes, accelerator.process_index, accum, cfg.seed,
        group_by_length=cfg.group_by_length, start_step=start_step, epochs=cfg.epochs,
    )  # fmt: skip
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=Collator(pad_id), num_workers=cfg.num_workers
    )


# ---------------------------------------------------------------------------------------------------
# The end


def finish(run: Run) -> Path:
    """The final adapter and summary.json in the run directory; returns it."""
    state = run.state
    if state.samples == 0:  # a run too short for the loop's fraction check, every sample of which was unusable
        raise DataError(
            f"none of the {state.skipped} samples could be used (unreadable images, or no answer left within "
            f"max_length={run.cfg.max_length}); no adapter was written"
        )
    if run.accelerator.is_main_process:
        save_adapter(run.run_dir, run.core)
        summary = {
            "steps": state.step,
            "samples": state.samples,
            "skipped": state.skipped,
            "nonfinite_steps": state.nonfinite_steps,
            "seconds": round(state.elapsed, 1),
            "final_loss": state.last_loss,
            "micro_batch_size": run.micro_batch,
            "gradient_checkpointing": run.checkpointing,
        }
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        run.log("summary: " + json.dumps(summary))
    run.accelerator.end_training()
    return run.run_dir
