"""Greedy tokens of the GPU benchmark's --tiny models (random weights, fixed seeds), on each decode path: the same
script runs against the code before and after a refactor. Prints JSON."""
import json
import sys

import torch

sys.path.insert(0, "benchmarks")
import bench_gpu as b  # noqa: E402
from vlm.generation import GenerationOptions  # noqa: E402

torch.manual_seed(0)
ours, stock = b.build("tiny", torch.device("cpu"), torch.float32)
out = {}
for mode in ("dynamic", "static"):
    ours.decode_mode = mode
    for batch in (1, 3):
        data = b.inputs(ours, batch, torch.device("cpu"), seed=batch)
        steps = ours.generate_tokens(data["input_ids"], data["attention_mask"], data["pixel_values"],
                                     GenerationOptions(max_new_tokens=16))
        out[f"{mode}-batch{batch}"] = torch.stack(list(steps), 1).tolist()
print(json.dumps(out))
