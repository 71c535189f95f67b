"""`python -m projector_training.toy.pretrain_lm`: train the miniature world's LM and bundle it with the package.

The toy LM stands for CausalLM's weights, which this project downloads rather than trains. Learning to answer
yes/no and multiple-choice questions from its context takes a 4-layer LM thousands of steps (the answer depends
on two things at once: the value asked about and the one in the context), far past the toy recipe's few minutes,
so it is trained once, here, with `ToyConfig`'s `lm_*` settings and seed 0, and shipped in
`projector_training/toy/bundled_lm/` with a `pretraining.json` that says how (the settings, its accuracy on held-out
text prompts per question kind, the time, the package versions and the commit). The recipe copies it into the
world's cache and measures it again there; it refuses a bundled LM whose settings are not `ToyConfig`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from projector_training.toy.backbones import BUNDLED_LM, PRETRAINING, ToyConfig, _train_lm, lm_settings
from projector_training.toy.evaluate import provenance

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m projector_training.toy.pretrain_lm", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=BUNDLED_LM, help="where to write the LM (default: the bundled one)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    config = dataclasses.replace(ToyConfig(), lm_source="train", seed=0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(tmp) / "lm"
        metrics = _train_lm(config, built, lambda line: print(line, flush=True), torch.device("cpu"))
        made = {
            "command": "python -m projector_training.toy.pretrain_lm",
            "settings": lm_settings(config),
            "seed": config.seed,
            "metrics": metrics,
            "seconds": round(time.perf_counter() - started, 1),
            **provenance(),
        }
        (built / PRETRAINING).write_text(json.dumps(made, indent=2) + "\n")
        shutil.rmtree(args.out, ignore_errors=True)
        shutil.copytree(built, args.out)
    print(json.dumps(made, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
