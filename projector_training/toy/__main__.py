"""`python -m projector_training.toy --example-image [N]`: print held-out miniature-world image paths.

Handy for trying a trained toy adapter: `vlm caption --model runs/toy "$(python -m projector_training.toy
--example-image)"`. The world must have been built (by `vlm-train --recipe toy`).
"""

from __future__ import annotations

import argparse
import sys

from projector_training.recipes import toy_cache_dir
from projector_training.toy.world import WorldFiles, load_records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m projector_training.toy", description=__doc__.splitlines()[0])
    parser.add_argument("--example-image", type=int, nargs="?", const=1, default=1, metavar="N")
    parser.add_argument("--world", choices=["default", "micro"], default="default")
    args = parser.parse_args(argv)
    files = WorldFiles.at(toy_cache_dir() / args.world / "world")
    if not files.eval_captions_json.is_file():
        print(f"no miniature world at {files.root}: run `vlm-train --recipe toy` first", file=sys.stderr)
        return 2
    for record in load_records(files.eval_captions_json)[: args.example_image]:
        print(files.root / record["image"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
