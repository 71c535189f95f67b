"""CUDA-graph capture, and `GraphedForward`: a frozen module's inference replayed from captured graphs.

A frozen vision tower runs ahead of prefill: a CLIP ViT-L/14-336 pass is about a
millisecond of GPU work but takes longer to launch from Python (~360 kernels), all on the way to the first
token. Its input shape is fixed per image count, so each count seen gets one captured graph.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["GraphedForward", "capture_graph"]


def capture_graph(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Record `fn` as a CUDA graph after two warm-up calls on a side stream (kernels picked, allocator
    settled outside the graph) -> (graph, what the recorded call returned: buffers each replay refills)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class GraphedForward:
    """Inference of a frozen module through CUDA graphs, one per input shape (the `max_shapes` most recently
    used are kept; each holds its activations' memory). The output is the graph's own buffer: read it
    before the next call."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], max_shapes: int = 4):
        self.fn = fn
        self.max_shapes = max_shapes
        self.graphs: OrderedDict[tuple, tuple[torch.Tensor, torch.cuda.CUDAGraph, torch.Tensor]] = OrderedDict()
        self.failed = False
        self.weights_at = self._weights_at()

    def _weights_at(self) -> int:
        """Where the module's first weight lives: moving or recasting the module gives every weight new storage,
        which graphs captured before would not read."""
        first = next(self.fn.parameters(), None) if isinstance(self.fn, nn.Module) else None
        return 0 if first is None else first.data_ptr()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return self.fn(x)
        if (at := self._weights_at()) != self.weights_at:
            self.graphs.clear()
            self.weights_at = at
        key = (tuple(x.shape), x.dtype, x.device)
        entry = self.graphs.get(key)
        if entry is None:
            while len(self.graphs) >= self.max_shapes:
                self.graphs.popitem(last=False)
            try:
                entry = self.graphs[key] = self._capture(x)
            except RuntimeError as error:  # something in `fn` cannot be captured: run it as it is from now on
                name = type(self.fn).__name__
                warnings.warn(f"running {name} without a CUDA graph: capture failed ({error})", stacklevel=2)
                self.failed = True
                return self.fn(x)
        self.graphs.move_to_end(key)
        static_in, graph, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out

    def _capture(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.CUDAGraph, torch.Tensor]:
        static_in = x.clone()
        graph, static_out = capture_graph(lambda: self.fn(static_in))
        return static_in, graph, static_out
