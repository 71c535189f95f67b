"""`vlm-train`: align a projector between a frozen CLIP tower and a frozen causal LM.

    vlm-train --recipe llava15-stage1-14b --data blip_laion_cc_sbu_558k.json --image-root images/
    accelerate launch --config_file configs/ddp.yaml -m projector_training --recipe ...   # several GPUs
    vlm-train --recipe toy                                                                 # offline demo

The command resolves the config (the recipe's values, then a YAML file, then flags) and runs it: `train` (run.py)
for a recipe, or for `toy` the miniature world's build, alignment and evaluation. A user's mistake is one line on
stderr and exit status 2 (`VLM_DEBUG=1` shows the traceback).
"""

from __future__ import annotations

import logging
import os
import sys

from projector_training.config import parse_args
from projector_training.run import train
from vlm.errors import VLMError

__all__ = ["main"]

logger = logging.getLogger("projector_training")


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
