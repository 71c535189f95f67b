"""The `toy` and `toy-draft` recipes end to end, offline: build (or reuse) the miniature world, align, evaluate.

`vlm-train --recipe toy` runs `run_toy`: it aligns a projector to the world's LM (the target, in `output_dir`,
evaluated before and after) and then one to the world's draft LM (in `<output_dir>-draft`, `runs/toy-draft` by
default) with the same tower, select layer, preprocessing, data and settings, so that the two adapters can share
one image encoding when the draft proposes tokens for the target (speculative decoding, issue 19). The draft is as
wide as the LM and its embeddings started as the LM's, so its projector starts from the target's and is trained
for `DRAFT_STEPS` more. Each writes its
eval.json; the target's holds the draft's headline numbers under `draft`. `vlm-train --recipe toy-draft` aligns the
draft alone (`run_toy_draft`). `ensure_toy_adapter` and `ensure_toy_draft` train what is missing (the demo's
default model).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from projector_training.config import TrainConfig, adapter_config
from projector_training.recipes import RECIPES, toy_world_dir
from projector_training.run import init_projector, train
from projector_training.toy.evaluate import evaluate, headline, provenance, same_answers
from vlm.adapter import PROJECTOR_NAME
from vlm.api import build_model, load
from vlm.generation.speculative import SpeculationStats

__all__ = [
    "draft_run_config",
    "ensure_toy_adapter",
    "ensure_toy_draft",
    "run_toy",
    "run_toy_draft",
    "speculative",
    "toy_config",
]

logger = logging.getLogger("projector_training")

DRAFT_SUFFIX = "-draft"
"""The draft adapter's directory is the target's with this suffix: `runs/toy` -> `runs/toy-draft`."""


def toy_config(cfg: TrainConfig, world: Any) -> TrainConfig:
    """The toy (or toy-draft) recipe pointed at a built miniature world (fields the user set explicitly are kept)."""
    defaults = RECIPES[cfg.recipe]
    filled = {
        "lm": str(world.draft_lm_dir if cfg.recipe == "toy-draft" else world.lm_dir),
        "vision_tower": world.vision_tower,
        "data": str(world.train_json),
        "image_root": str(world.world_dir),
    }
    return cfg.replace(**{k: v for k, v in filled.items() if getattr(cfg, k) == getattr(defaults, k)})


DRAFT_STEPS = 500
"""Steps of the draft's alignment when its projector starts from the target's (a fifth of the target's)."""


def draft_run_config(cfg: TrainConfig, start_from: Path | None = None) -> TrainConfig:
    """The toy-draft run that goes with the toy run `cfg`: its settings, tower and data, the world's draft LM (never
    the target's `lm`), in `<output_dir>-draft`. Given the target's finished run `start_from`, the draft's projector
    starts from the target's and trains for `DRAFT_STEPS` at most (unless `cfg` names a projector to start from)."""
    draft = cfg.replace(
        recipe="toy-draft", lm=RECIPES["toy-draft"].lm, output_dir=f"{Path(cfg.output_dir)}{DRAFT_SUFFIX}"
    )
    if start_from is not None and cfg.init_projector is None:
        draft = draft.replace(init_projector=str(start_from), max_steps=min(cfg.max_steps or DRAFT_STEPS, DRAFT_STEPS))
    return draft


def _width(lm_dir: Path) -> int:
    return json.loads((lm_dir / "config.json").read_text())["hidden_size"]


def _world(cfg: TrainConfig) -> Any:
    """The miniature world of `cfg` (seeded by `cfg.seed`, like the alignment), built where missing."""
    # Here, not at the top: the world's builder needs open_clip, which vlm-train's other recipes do without.
    from projector_training.toy import ToyConfig, ensure_toy_world

    world_config = ToyConfig.micro() if cfg.toy_world == "micro" else ToyConfig()
    return ensure_toy_world(
        toy_world_dir(cfg), config=dataclasses.replace(world_config, seed=cfg.seed), log=logger.info
    )


def _align(cfg: TrainConfig, world: Any) -> tuple[Path, dict[str, Any]]:
    """Train the projector of `cfg` and evaluate the adapter on every held-out set, keeping its answers."""
    run_dir = train(cfg)
    return run_dir, evaluate(load(run_dir, device="cpu"), world.world_dir, keep_answers=True)


def _write(run_dir: Path, report: dict[str, Any]) -> None:
    (run_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "details"}, indent=2))


def run_toy(cfg: TrainConfig) -> dict[str, Any]:
    """Build the miniature world if needed, align the target and evaluate every held-out set before and after, then
    align and evaluate the draft (`run_toy_draft`); writes both eval.json files and returns the target's report."""
    started = time.time()
    world = _world(cfg)
    target_cfg = toy_config(cfg, world)

    before_model = build_model(adapter_config(target_cfg), device="cpu")
    init_projector(before_model.module, target_cfg)
    before = evaluate(before_model, world.world_dir)
    del before_model

    run_dir, after = _align(target_cfg, world)
    answers = after.pop("answers")
    # A projector maps into one LM's embedding space: the target's suits the draft only at the same width.
    start_from = run_dir if _width(world.draft_lm_dir) == _width(world.lm_dir) else None
    draft_cfg = draft_run_config(cfg, start_from)
    draft = run_toy_draft(draft_cfg, world=world, target_dir=run_dir, target_answers=answers)
    report = {
        **headline(after),
        "before": headline(before),
        "details": after,
        "clip_zero_shot": world.clip_metrics.get("accuracy"),
        "lm_context_accuracy": world.lm_metrics.get("accuracy"),
        "lm_context": {k: v for k, v in world.lm_metrics.items() if k.endswith("_accuracy")},
        "draft": {k: v for k, v in draft.items() if k not in ("details", "versions", "cpu", "commit")},
        "seed": cfg.seed,
        **provenance(),
        "seconds_total": round(time.time() - started, 1),
    }
    _write(run_dir, report)
    return report


SPECULATIVE_RECORDS = 48
"""Held-out records per set that `speculative` answers one at a time with the draft (every set, every turn)."""


class _OneAtATime:
    """A model whose batch answers are given one conversation at a time (speculative decoding speeds up one stream),
    adding up each answer's speculation statistics."""

    def __init__(self, model: Any):
        self.model = model
        self.stats = SpeculationStats()

    def chat_batch(self, conversations: list[Any], batch_size: int = 1, **generation: Any) -> list[str]:
        answers = []
        for messages in conversations:
            answers.append(self.model.chat(messages, **generation))
            self.stats.add(self.model.last_speculation)
        return answers


def speculative(target_dir: Path, draft_dir: Path, world: Any, target_answers: dict[str, list[str]]) -> dict[str, Any]:
    """The draft proposing for the target, one conversation at a time, on the first `SPECULATIVE_RECORDS` records of
    every held-out set: the acceptance rate, the mean tokens per target forward, and whether the answers are the
    target's own (greedy speculative decoding must give exactly those)."""
    started = time.time()
    runner = _OneAtATime(load(target_dir, device="cpu", draft=draft_dir))
    answers = evaluate(runner, world.world_dir, limit=SPECULATIVE_RECORDS, keep_answers=True)["answers"]
    reference = {name: target_answers[name][: len(given)] for name, given in answers.items()}
    return {
        **runner.stats.as_dict(),
        "answers_identical_to_target": same_answers(answers, reference),
        "records_per_set": SPECULATIVE_RECORDS,
        "draft_length": "adaptive",
        "seconds": round(time.time() - started, 1),
    }


def run_toy_draft(
    cfg: TrainConfig,
    *,
    world: Any = None,
    target_dir: Path | None = None,
    target_answers: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Align a projector to the world's draft LM and evaluate it on every held-out set; writes its eval.json.

    Given the target adapter and its held-out answers (`run_toy` passes them), the report says how many answers the
    draft writes exactly as the target does (`answers_equal_target`: what greedy speculative decoding would accept
    whole) and holds `speculative`; alone (`vlm-train --recipe toy-draft`) both are null."""
    started = time.time()
    world = world if world is not None else _world(cfg)
    cfg = toy_config(cfg, world)
    run_dir, after = _align(cfg, world)
    answers = after.pop("answers")
    lm = world.draft_lm_metrics
    paired = target_dir is not None and target_answers is not None
    report: dict[str, Any] = {
        "dir": str(run_dir),
        **headline(after),
        "answers_equal_target": same_answers(answers, target_answers) if paired else None,
        "init_projector": cfg.init_projector,
        "speculative": speculative(target_dir, run_dir, world, target_answers) if paired else None,
        "details": after,
        "lm_context_accuracy": lm.get("accuracy"),
        "lm_agreement": {k: lm.get(k) for k in ("token_agreement", "answer_agreement", "n_tokens")},
        "lm_size": {k: lm.get(k) for k in ("parameters", "teacher_parameters", "layer_cost_vs_teacher")},
        "seed": cfg.seed,
        **provenance(),
        "seconds_total": round(time.time() - started, 1),
    }
    _write(run_dir, report)
    return report


def _start_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO)


def ensure_toy_adapter(run_dir: str | Path = "runs/toy") -> Path:
    """The trained toy adapter, training it (and its draft) first (progress in the terminal) if it is missing."""
    run_dir = Path(run_dir)
    if not (run_dir / PROJECTOR_NAME).is_file():
        _start_logging()
        logger.info("no trained toy adapter in %s: training one (about 7 minutes on 2 CPU cores)", run_dir)
        run_toy(RECIPES["toy"].replace(output_dir=str(run_dir)))
    return run_dir


def ensure_toy_draft(run_dir: str | Path = "runs/toy") -> Path:
    """The trained draft adapter of the toy adapter in `run_dir` (`<run_dir>-draft`), training what is missing."""
    run_dir = ensure_toy_adapter(run_dir)
    draft_cfg = draft_run_config(RECIPES["toy"].replace(output_dir=str(run_dir)))
    if not (Path(draft_cfg.output_dir) / PROJECTOR_NAME).is_file():
        _start_logging()
        logger.info("no draft adapter in %s: training one (about 2 minutes on 2 CPU cores)", draft_cfg.output_dir)
        run_toy_draft(draft_cfg)
    return Path(draft_cfg.output_dir)
