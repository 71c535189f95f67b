"""Speculative decoding on a GPU gives the target's own greedy tokens: every decode mode, fp32 and bf16. Prints JSON.

The CPU tests cover the algorithm; this covers what only a GPU runs: the verify forward captured as a CUDA graph
(one per draft length), the draft's graphed steps, the shared tower's graphed encoding. Tiny random models in
memory (the GPU benchmark's `tiny` shapes), so it needs no files and runs in seconds:

    python tools/check_speculative_cuda.py            # on a machine with CUDA
    python tools/check_speculative_cuda.py --cpu      # the same on the CPU, a smoke test of the script
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlm.generation import GenerationOptions  # noqa: E402


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prompts(bench, model, device, count: int, rows: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`count` batches of `rows` prompts (one image each), left-padded to different lengths."""
    out = []
    for i in range(count):
        batch = bench.inputs(model, rows, device, seed=seed + i)
        batch.pop("labels")
        for row in range(1, rows):  # left padding: row r loses its first r text tokens
            batch["attention_mask"][row, :row] = 0
            batch["input_ids"][row, :row] = 0
        out.append(batch)
    return out


def _tokens(model, prompt, options) -> list[list[int]]:
    return [step.tolist() for step in model.generate_tokens(**prompt, options=options)]


def main() -> int:
    on_cpu = "--cpu" in sys.argv  # a smoke test of this script (the graph modes then run as plain static ones)
    if not (on_cpu or torch.cuda.is_available()):
        print(json.dumps({"error": "no CUDA device (--cpu runs it on the CPU)"}))
        return 1
    bench = _bench()
    device = torch.device("cpu" if on_cpu else "cuda")
    name = "cpu" if on_cpu else torch.cuda.get_device_name()
    report: dict = {"device": name, "torch": torch.__version__, "checks": []}
    option_sets = {
        "greedy": GenerationOptions(max_new_tokens=24),
        "repetition_penalty": GenerationOptions(max_new_tokens=24, repetition_penalty=1.3),
    }  # (the blocked-words ban needs a tokenizer that matches the LM's rows: the CPU tests cover it)
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        target, _ = bench.build("tiny", device, dtype, image_token_id=bench.shared_image_row("tiny"))
        drafts = {"self": None, "random": bench.build("tiny-draft", device, dtype, target.config.image_token_id,
                                                      target.module.vision)[0]}  # fmt: skip
        for model in (target, *[d for d in drafts.values() if d is not None]):
            model.processor.stop_ids, model.suppress_ids = [-1], [model.config.image_token_id]
            model.module.projector.to(dtype)
        for mode in ("cuda_graph", "static", "dynamic"):
            for rows in (1, 4):
                prompts = _prompts(bench, target, device, count=8 if rows == 1 else 3, rows=rows, seed=rows)
                for draft_name, draft in drafts.items():
                    for option_name, options in option_sets.items():
                        target.attach_draft(None)
                        target.decode_mode = mode
                        plain = [_tokens(target, p, options) for p in prompts]
                        helper = draft if draft is not None else _self_draft(bench, target, device, dtype)
                        helper.decode_mode = mode
                        target.attach_draft(helper)
                        for length in (None, 3):
                            target.draft_length = length
                            drafted = [_tokens(target, p, options) for p in prompts]
                            stats = target.last_speculation.as_dict()
                            same = sum(a == b for a, b in zip(plain, drafted, strict=True))
                            report["checks"].append({
                                "dtype": str(dtype).removeprefix("torch."), "mode": mode, "rows": rows,
                                "draft": draft_name, "options": option_name, "draft_length": length,
                                "identical": f"{same}/{len(prompts)}", "acceptance_rate": stats["acceptance_rate"],
                                "tokens_per_target_forward": stats["tokens_per_target_forward"],
                            })  # fmt: skip
        target.attach_draft(None)
    fp32 = [c for c in report["checks"] if c["dtype"] == "float32"]
    report["fp32_all_identical"] = all(c["identical"].split("/")[0] == c["identical"].split("/")[1] for c in fp32)
    print(json.dumps(report, indent=1))
    return 0 if report["fp32_all_identical"] else 1


_SELF: dict = {}


def _self_draft(bench, target, device, dtype):
    """A draft with the target's own LM weights (a second model object): it agrees with the target everywhere."""
    key = (id(target), dtype)
    if key not in _SELF:
        from vlm.api import VisionLanguageModel

        twin = VisionLanguageModel(target.config, target.module.vision, target.module.lm, target.tokenizer)
        twin.module.projector.load_state_dict(target.module.projector.state_dict())
        twin.module.to(device, dtype)
        twin.processor.stop_ids, twin.suppress_ids = [-1], [target.config.image_token_id]
        _SELF[key] = twin
    return _SELF[key]


if __name__ == "__main__":
    sys.exit(main())
