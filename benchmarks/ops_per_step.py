"""Operators a static-cache prefill and decode step dispatch per decoder layer, counted on the CPU. Prints JSON.

Inside a CUDA graph every kernel costs a few microseconds however small it is, so in the uncompiled fast path
(`decode_mode="auto"` on a GPU) the number of non-view operators per layer is most of what a step costs
besides reading the weights. This counts them on a small random Llama in bf16 (the counts do not depend on
the sizes), no GPU needed:

    python benchmarks/ops_per_step.py
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.generation.static import StaticEngine

# Operators that only reinterpret memory: no kernel runs for them.
VIEWS = {
    "_reshape_alias", "_unsafe_view", "alias", "as_strided", "chunk", "detach", "expand", "permute", "reshape",
    "select", "slice", "split", "split_with_sizes", "squeeze", "t", "transpose", "unbind", "unsqueeze", "view",
}  # fmt: skip


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(layers: int, prompt: int = 20) -> dict[str, collections.Counter[str]]:
    """Non-view operators of one prefill and one decode step on a random `layers`-layer Llama."""
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4
    )
    lm = LlamaForCausalLM(config).eval().to(torch.bfloat16).requires_grad_(False)  # frozen, as in the adapter
    static = StaticEngine(lm, 1, 256, use_cuda_graph=False)
    embeds = torch.randn(1, prompt, config.hidden_size, dtype=torch.bfloat16)
    mask = torch.ones(1, prompt, dtype=torch.long)
    positions = torch.arange(prompt)[None]
    runs = {
        "prefill": lambda: static.prefill(embeds, mask, positions),
        "step": lambda: static.step(torch.tensor([3]), torch.tensor([prompt])),
    }
    counts = {}
    for name, run in runs.items():
        with _Count() as counter:
            run()
        counts[name] = collections.Counter({k: v for k, v in counter.ops.items() if k not in VIEWS})
    return counts


def report() -> dict[str, Any]:
    """Per layer (the difference between a 4- and a 2-layer LM, halved) and once per call (the rest)."""
    two, four = count_ops(2), count_ops(4)
    result: dict[str, Any] = {}
    for name in two:
        per_layer = {k: (four[name][k] - two[name][k]) / 2 for k in four[name] | two[name]}
        per_layer = {k: v for k, v in sorted(per_layer.items(), key=lambda kv: (-kv[1], kv[0])) if v}
        result[name] = {
            "ops_per_layer": sum(per_layer.values()),
            "ops_once": sum(two[name].values()) - 2 * sum(per_layer.values()),
            "per_layer_by_op": per_layer,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    print(json.dumps(report(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
