"""Greedy tokens of the GPU benchmark's tiny models (random weights, fixed seeds) on the plain and static decode
paths, as JSON: run it before and after a change to the decode code and compare the two outputs.

    HF_HUB_OFFLINE=1 python tools/decode_tokens.py > after.json
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from vlm.generation import GenerationOptions


def _bench():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    bench = _bench()
    torch.manual_seed(0)
    ours, _ = bench.build("tiny", torch.device("cpu"), torch.float32)
    out = {}
    for mode in ("dynamic", "static"):
        ours.decode_mode = mode
        for batch in (1, 3):
            data = bench.inputs(ours, batch, torch.device("cpu"), seed=batch)
            options = GenerationOptions(max_new_tokens=16)
            steps = ours.generate_tokens(data["input_ids"], data["attention_mask"], data["pixel_values"], options)
            out[f"{mode}-batch{batch}"] = torch.stack(list(steps), 1).tolist()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
