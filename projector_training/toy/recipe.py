"""The `toy` recipe end to end, offline: build (or reuse) the miniature world, align, evaluate before and after.

`vlm-train --recipe toy` runs `run_toy`; `ensure_toy_adapter` trains the toy adapter where it is missing (the
demo's default model).
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
from projector_training.toy.evaluate import evaluate, headline, provenance
from vlm.adapter import PROJECTOR_NAME
from vlm.api import build_model, load

__all__ = ["ensure_toy_adapter", "run_toy", "toy_config"]

logger = logging.getLogger("projector_training")


def toy_config(cfg: TrainConfig, world: Any) -> TrainConfig:
    """The toy recipe pointed at a built miniature world (fields the user set explicitly are kept)."""
    defaults = RECIPES["toy"]
    filled = {
        "lm": str(world.lm_dir),
        "vision_tower": world.vision_tower,
        "data": str(world.train_json),
        "image_root": str(world.world_dir),
    }
    return cfg.replace(**{k: v for k, v in filled.items() if getattr(cfg, k) == getattr(defaults, k)})


def run_toy(cfg: TrainConfig) -> dict[str, Any]:
    """Build the miniature world if needed (seeded by `cfg.seed`, like the alignment), align, evaluate every
    held-out set before and after; writes eval.json."""
    # Here, not at the top: the world's builder needs open_clip, which vlm-train's other recipes do without.
    from projector_training.toy import ToyConfig, ensure_toy_world

    started = time.time()
    world_config = ToyConfig.micro() if cfg.toy_world == "micro" else ToyConfig()
    world = ensure_toy_world(
        toy_world_dir(cfg), config=dataclasses.replace(world_config, seed=cfg.seed), log=logger.info
    )
    cfg = toy_config(cfg, world)

    before_model = build_model(adapter_config(cfg), device="cpu")
    init_projector(before_model.module, cfg)
    before = evaluate(before_model, world.world_dir)
    del before_model

    run_dir = train(cfg)
    after = evaluate(load(run_dir, device="cpu"), world.world_dir)
    report = {
        **headline(after),
        "before": headline(before),
        "details": after,
        "clip_zero_shot": world.clip_metrics.get("accuracy"),
        "lm_context_accuracy": world.lm_metrics.get("accuracy"),
        "lm_context": {k: v for k, v in world.lm_metrics.items() if k.endswith("_accuracy")},
        "seed": cfg.seed,
        **provenance(),
        "seconds_total": round(time.time() - started, 1),
    }
    (run_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "details"}, indent=2))
    return report


def ensure_toy_adapter(run_dir: str | Path = "runs/toy") -> Path:
    """The trained toy adapter, training it first (progress in the terminal) if it is missing."""
    run_dir = Path(run_dir)
    if not (run_dir / PROJECTOR_NAME).is_file():
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        logger.setLevel(logging.INFO)
        logger.info("no trained toy adapter in %s: training one (about 5 minutes on 2 CPU cores)", run_dir)
        run_toy(RECIPES["toy"].replace(output_dir=str(run_dir)))
    return run_dir
