"""Decoding over a static KV cache, captured once in a CUDA graph on GPUs.

Single-stream decoding of a 14B LM is bound by reading the weights (about 5.8 ms a token on an H200),
but eager PyTorch spends longer than that launching the ~600 kernels of one step from Python. Here the
step runs over preallocated cache tensors with no data-dependent control flow, so the whole step can be
recorded as one CUDA graph and replayed for every token. The step reuses the LM's own modules
(norms, projections with their biases, MLP, rotary embedding), so it computes what transformers
computes; on the CPU it runs eagerly and tests compare its tokens with the plain path.

With `compile_layers`, the two halves of a decoder layer around the cache write and attention (norm,
projections, rotary; output projection, residuals, norm, MLP) go through `torch.compile`, which fuses
their small elementwise kernels. Every layer has the same shapes, so one compiled function serves all of
them; the cache write and attention stay eager, so no compiled graph mutates the cache.

Prefill runs the same halves over the whole prompt (compiled with a dynamic length) and writes keys and
values straight into the static cache, with no transformers cache in between. Rows are left-padded
together, so every row writes the same cache slot at each step while keeping its own rotary position.

`GraphedForward` does the same for the vision tower ahead of prefill: a CLIP ViT-L/14-336 pass is about a
millisecond of GPU work but takes longer to launch from Python (~360 kernels), all on the way to the first
token. Its input shape is fixed per image count, so each count seen gets one captured graph.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GraphedForward", "StaticDecoder", "supports_static_decode"]


def supports_static_decode(lm: nn.Module) -> bool:
    """Llama-architecture decoders only (CausalLM is one); other LMs use the plain path."""
    return getattr(lm.config, "model_type", None) == "llama" and not getattr(lm.config, "pretraining_tp", 1) > 1


def _attention_inputs(
    layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First half of a decoder layer: (B, T, H) -> q (B, Hq, T, D), k (after rotary) and v (B, Hk, T, D)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn, (batch, length) = layer.self_attn, hidden.shape[:2]
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(batch, length, heads, -1).transpose(1, 2)
    k = attn.k_proj(x).view(batch, length, kv_heads, -1).transpose(1, 2)
    v = attn.v_proj(x).view(batch, length, kv_heads, -1).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def _attention_output_and_mlp(layer: nn.Module, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """Second half: attention output (B, Hq, T, D) -> residual, norm, MLP, residual -> (B, T, H)."""
    batch, length = hidden.shape[:2]
    hidden = hidden + layer.self_attn.o_proj(attended.transpose(1, 2).reshape(batch, length, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _prompt_attention_inputs(*args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first half for prompts (its own code object, so its compiled graph has its own cache)."""
    return _attention_inputs(*args)


def _prompt_attention_output_and_mlp(*args: Any) -> torch.Tensor:
    return _attention_output_and_mlp(*args)


def _capture_graph(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
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


class StaticDecoder:
    """One-token decode steps for `batch_size` rows over a cache of `max_len` slots."""

    def __init__(
        self, lm: nn.Module, batch_size: int, max_len: int, use_cuda_graph: bool, compile_layers: bool = False
    ):
        self.lm = lm
        self.decoder = lm.get_decoder()
        compile_step = torch.compile(fullgraph=True, dynamic=False) if compile_layers else (lambda f: f)
        compile_prompt = torch.compile(fullgraph=True, dynamic=True) if compile_layers else (lambda f: f)
        self._first_half = compile_step(_attention_inputs)
        self._second_half = compile_step(_attention_output_and_mlp)
        self._prompt_first_half = compile_prompt(_prompt_attention_inputs)  # any prompt length: one graph
        self._prompt_second_half = compile_prompt(_prompt_attention_output_and_mlp)
        config = lm.config
        self.batch_size, self.max_len = batch_size, max_len
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.gqa = self.heads != self.kv_heads
        weight = lm.get_input_embeddings().weight
        device, dtype = weight.device, weight.dtype
        shape = (config.num_hidden_layers, batch_size, self.kv_heads, max_len, self.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros((batch_size, max_len), device=device, dtype=torch.bool)
        # Static inputs and output of the step (what a CUDA graph reads and writes).
        self.ids = torch.zeros((batch_size, 1), device=device, dtype=torch.long)
        self.positions = torch.zeros((batch_size, 1), device=device, dtype=torch.long)
        self.slot = torch.zeros((1,), device=device, dtype=torch.long)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.use_cuda_graph = use_cuda_graph and device.type == "cuda"

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Run left-padded prompts (B, T, H) through the LM, writing keys (after rotary) and values straight
        into the static slots [0, T) -> the last position's logits (B, V)."""
        length = attention_mask.shape[1]
        if length >= self.max_len:
            raise ValueError(f"prompt of {length} tokens does not fit a static cache of {self.max_len}")
        valid = attention_mask.bool()
        self.valid.zero_()
        self.valid[:, :length] = valid
        mask = None  # no padding: plain causal attention (flash kernels)
        if not bool(valid.all()):
            causal = torch.ones((length, length), dtype=torch.bool, device=valid.device).tril()
            mask = causal[None, None] & valid[:, None, None, :]  # (B, 1, T, T)
            mask |= ~valid[:, None, :, None]  # pad queries see everything: finite values nobody reads
        hidden = embeds
        cos, sin = self.decoder.rotary_emb(hidden, position_ids)
        for i, layer in enumerate(self.decoder.layers):
            q, k, v = self._prompt_first_half(layer, hidden, cos, sin, self.heads, self.kv_heads)
            self.keys[i, :, :, :length].copy_(k)
            self.values[i, :, :, :length].copy_(v)
            attended = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=layer.self_attn.scaling, enable_gqa=self.gqa
            )
            hidden = self._prompt_second_half(layer, hidden, attended)
        return self.lm.get_output_embeddings()(self.decoder.norm(hidden[:, -1:]))[:, -1]  # (B, V)

    @torch.inference_mode()
    def _step(self) -> torch.Tensor:
        """ids (B, 1) at rotary `positions` (B, 1), written to cache `slot` -> last logits (B, V)."""
        hidden = self.decoder.embed_tokens(self.ids)  # (B, 1, H)
        cos, sin = self.decoder.rotary_emb(hidden, self.positions)
        self.valid.index_fill_(1, self.slot, True)
        mask = self.valid[:, None, None, :]  # (B, 1, 1, L)
        for i, layer in enumerate(self.decoder.layers):
            q, k, v = self._first_half(layer, hidden, cos, sin, self.heads, self.kv_heads)
            self.keys[i].index_copy_(2, self.slot, k)
            self.values[i].index_copy_(2, self.slot, v)
            attended = F.scaled_dot_product_attention(
                q, self.keys[i], self.values[i], attn_mask=mask, scale=layer.self_attn.scaling, enable_gqa=self.gqa
            )  # (B, Hq, 1, D)
            hidden = self._second_half(layer, hidden, attended)
        hidden = self.decoder.norm(hidden)
        return self.lm.get_output_embeddings()(hidden[:, -1])  # (B, V)

    def _capture(self) -> None:
        """Record the step as a CUDA graph. The warm-up steps write only this step's own cache slot, with the
        values the replay then writes again, so there is nothing to restore (a copy of the cache would
        double its memory: 20 GB at 14B for 32 rows)."""
        self.graph, self.logits = _capture_graph(self._step)

    def step(self, ids: torch.Tensor, positions: torch.Tensor, slot: int) -> torch.Tensor:
        """Decode one token per row: ids (B,), positions (B,), the common cache slot -> logits (B, V)."""
        if slot >= self.max_len:
            raise ValueError(f"cache slot {slot} is past the static cache of {self.max_len}")
        self.ids.copy_(ids.view(-1, 1))
        self.positions.copy_(positions.view(-1, 1))
        self.slot.fill_(slot)
        if not self.use_cuda_graph:
            return self._step()
        if self.graph is None:
            try:
                self._capture()
            except RuntimeError as error:  # something in the step cannot be captured: decode without a graph
                warnings.warn(f"decoding without a CUDA graph: capture failed ({error})", stacklevel=2)
                self.use_cuda_graph = False
                return self._step()
        self.graph.replay()
        return self.logits


class GraphedForward:
    """Inference of a frozen module through CUDA graphs, one per input shape (the `max_shapes` most recently
    used are kept; each holds its activations' memory). The output is the graph's own buffer: read it
    before the next call."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], max_shapes: int = 4):
        self.fn = fn
        self.max_shapes = max_shapes
        self.graphs: OrderedDict[tuple, tuple[torch.Tensor, torch.cuda.CUDAGraph, torch.Tensor]] = OrderedDict()
        self.failed = False

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return self.fn(x)
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
        graph, static_out = _capture_graph(lambda: self.fn(static_in))
        return static_in, graph, static_out
