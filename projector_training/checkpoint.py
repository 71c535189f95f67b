"""A run's files: atomic checkpoints (written to a temporary directory, renamed into place, older ones pruned
afterwards), the resume that continues one exactly, and the final adapter directory.

A checkpoint holds the projector, the optimiser and schedule states, the RNG states and `trainer_state.json`
(written last: its presence marks the checkpoint complete). It continues only the run it was written in: the
records, batching and seed that fix the sample order are recorded with it (`run_identity`) and checked on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from projector_training.config import TrainConfig
from projector_training.data import DataError
from vlm.adapter import PROJECTOR_NAME, write_adapter
from vlm.errors import ConfigError
from vlm.modeling import VisionLanguageModule

__all__ = [
    "CHECKPOINTS",
    "STATE",
    "TrainState",
    "apply_optimizer_settings",
    "check_fresh_start",
    "check_same_run",
    "latest_checkpoint",
    "load_checkpoint",
    "resume",
    "resume_path",
    "run_identity",
    "save_adapter",
    "save_checkpoint",
]

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


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def save_checkpoint(
    run_dir: Path, model: VisionLanguageModule, optimizer: Any, scheduler: Any, state: TrainState, keep: int
) -> Path:
    """A checkpoint of `state.step`, written under a temporary name and renamed into place; then the older ones
    beyond `keep` (and any past this step) are removed. Returns its directory."""
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
    """Restore the projector, optimiser, schedule and RNG states of a checkpoint; returns its TrainState."""
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
    non-finite guard advises) must lower it. With unchanged settings every value is the one restored. The loop
    reads the rate through `scheduler.get_last_lr()` only after a `scheduler.step()`, which sets it from these
    groups."""
    restored = scheduler.base_lrs[0]
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        betas = (cfg.adam_beta1, cfg.adam_beta2)
        group.update(initial_lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas, eps=cfg.adam_eps)
        group["lr"] = cfg.lr * factor(scheduler.last_epoch)  # as LambdaLR computes it
    if restored != cfg.lr:
        log(f"the checkpoint trained at lr {restored:g}; this run goes on at {cfg.lr:g}")


def save_adapter(run_dir: Path, model: VisionLanguageModule) -> None:
    """The final adapter in the run directory, each file replaced atomically."""
    write_adapter(run_dir, model.config, model.projector_state())


def resume_path(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint `--resume` names: none, the newest complete one in the run directory, or the one given."""
    if cfg.resume == "no":
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(cfg.resume)
    if not (path / STATE).is_file():
        raise DataError(f"--resume {path}: not a complete checkpoint directory (no {STATE})")
    return path


def check_fresh_start(cfg: TrainConfig, run_dir: Path) -> None:
    """`--resume no` into a directory that holds checkpoints would mix two runs' checkpoints: refused before
    anything is loaded or written."""
    if cfg.resume == "no" and latest_checkpoint(run_dir) is not None:
        raise ConfigError(
            f"{run_dir} already holds checkpoints of another run, which --resume no would mix with this one's; "
            f"use a new --output-dir, or remove {run_dir / CHECKPOINTS}"
        )


def resume(
    cfg: TrainConfig,
    run_dir: Path,
    model: VisionLanguageModule,
    optimizer: Any,
    scheduler: Any,
    identity: dict[str, Any],
    log: Callable[[str], Any],
) -> TrainState:
    """The state to go on from: the checkpoint `--resume` names once it is checked to be of this run (`identity`),
    with its projector, optimiser, schedule and RNGs restored and this run's optimiser settings over them; else a
    new state."""
    state = TrainState()
    resume_from = resume_path(cfg, run_dir)
    if resume_from is not None:
        check_same_run(resume_from, json.loads((resume_from / STATE).read_text()).get("run", {}), identity)
        state = load_checkpoint(resume_from, model, optimizer, scheduler)  # (RNGs and optimiser: only once checked)
        apply_optimizer_settings(cfg, optimizer, scheduler, log)
        log(f"resumed from {resume_from} at step {state.step}")
    state.run = identity
    return state
