"""`python -m projector_training.toy.pretrain`: train the miniature world's backbones and bundle them with the package.

The toy CLIP, LM and draft stand for the pretrained CLIP ViT and CausalLM 14B and 7B, which this project downloads
rather than trains: the toy recipe, like the real ones, trains only the projector. Training them takes longer than
the recipe's few minutes (the LM above all: learning to answer yes/no and multiple-choice questions from its context
takes a 4-layer LM thousands of steps, because the answer depends on two things at once, the value asked about and
the one in the context), so they are trained once, here, with `ToyConfig`'s settings and seed 0, and shipped in
`projector_training/toy/bundled/<piece>/`, each with a `pretraining.json` that says how (the settings, its metrics,
the time, the package versions and the commit). The world copies them into its cache and measures them again on its
own held-out data; it refuses a bundled piece whose settings are not `ToyConfig`'s.

Seconds on a quiet 2-core CPU: clip about 70, draft_lm about 400, lm about 2,500. The draft is distilled from the
LM in `--out`, so retrain it after the LM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from projector_training.toy.backbones import (
    BUNDLED,
    PIECES,
    PRETRAINING,
    ToyConfig,
    _train_clip,
    _train_draft_lm,
    _train_lm,
    compact_clip,
    piece_settings,
)
from projector_training.toy.evaluate import provenance
from projector_training.toy.world import WorldFiles, build_world

__all__ = ["main"]

Log = Callable[[str], Any]


def _train(piece: str, config: ToyConfig, out: Path, bundle: Path, scratch: Path, log: Log) -> dict[str, Any]:
    """Train `piece` into `out`; the CLIP learns from a world of `config.seed` built in `scratch`, the draft from
    the LM already in `bundle`."""
    device = torch.device("cpu")
    if piece == "clip":
        world = WorldFiles.at(scratch / "world")
        if not world.train_json.is_file():
            # Only the images the CLIP learns from: the first `clip_images` are the same whatever n_train is.
            build_world(world.root, seed=config.seed, n_train=config.clip_images, n_eval=config.n_eval,
                        image_size=config.image_size)  # fmt: skip
        metrics = _train_clip(config, world, out, log, device)
        compact_clip(out, config)
        return metrics
    if piece == "lm":
        return _train_lm(config, out, log, device)
    return _train_draft_lm(config, bundle / "lm", out, log, device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m projector_training.toy.pretrain", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--pieces", nargs="+", choices=PIECES, default=list(PIECES), help="what to train (default: all)"
    )
    parser.add_argument("--out", type=Path, default=BUNDLED, help="where the pieces go (default: the bundled ones)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    config = dataclasses.replace(ToyConfig(), backbones="train", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        for piece in [p for p in PIECES if p in args.pieces]:  # in dependency order: the draft learns from the LM
            started = time.perf_counter()
            built = Path(tmp) / piece
            metrics = _train(piece, config, built, args.out, Path(tmp), lambda line: print(line, flush=True))
            made = {
                "command": f"python -m projector_training.toy.pretrain --pieces {piece}",
                "settings": piece_settings(config, piece),
                "seed": config.seed,
                "metrics": metrics,
                "seconds": round(time.perf_counter() - started, 1),
                **provenance(),
            }
            (built / PRETRAINING).write_text(json.dumps(made, indent=2) + "\n")
            shutil.rmtree(args.out / piece, ignore_errors=True)
            shutil.copytree(built, args.out / piece)
            print(json.dumps(made, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
