"""Decoding over a static KV cache, captured once in a CUDA graph on GPUs.

Single-stream decoding of a 14B LM is bound by reading the weights (about 5.8 ms a token on an H200),
but eager PyTorch spends longer than that launching the ~600 kernels of one step from Python. Here the
step runs over preallocated cache tensors with no data-dependent control flow, so the whole step can be
recorded as one CUDA graph and replayed for every token. The step reuses the LM's own modules (norms,
output and down projections, rotary embedding, activation), so it computes what transformers computes; on
the CPU it runs eagerly and tests compare its tokens with the plain path.

Inside a graph every kernel still costs a few microseconds however small it is, so the step keeps their
number down:
- the q/k/v projections read one fused matrix, and so do gate/up (`fuse_projections`): one large GEMV
  streams the weights closer to full bandwidth than three small ones;
- q and k, side by side in that fused output, are rotated as one tensor (5 kernels a layer, not 10);
- keys and values sit in one cache tensor and are written with one kernel per layer;
- the attention mask is additive and kept up to date with one kernel per step, not rebuilt per layer.

With `compile_layers`, the work between two attentions (output projection, residual, norm, MLP, residual,
the next layer's norm, q/k/v and rotary) goes through `torch.compile`, which fuses its elementwise kernels
across the layer boundary. Every boundary has the same shapes, so one compiled function serves all of them
(the first layer's inputs and the last layer's MLP run eagerly, once per step); the cache write and
attention stay eager, so no compiled graph mutates the cache.

Prefill runs the same pieces over the whole prompt (compiled with a dynamic length) and writes keys and
values straight into the static cache, with no transformers cache in between. Rows are left-padded
together, so every row writes the same cache slot at each step while keeping its own rotary position.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vlm.modeling.cuda_graphs import capture_graph

__all__ = ["StaticEngine", "fuse_projections", "supports_static_decode"]


class FusedWeights(NamedTuple):
    """One decoder layer's fused projections; a None weight means "run the layer's own modules"."""

    qkv: torch.Tensor | None
    qkv_bias: torch.Tensor | None
    gate_up: torch.Tensor | None
    gate_up_bias: torch.Tensor | None


_FUSED: weakref.WeakKeyDictionary[nn.Module, FusedWeights] = weakref.WeakKeyDictionary()
"""Each fused layer's matrices, kept beside the layer (not a parameter, buffer or state-dict entry of it)."""


def supports_static_decode(lm: nn.Module) -> bool:
    """Llama-architecture decoders only (CausalLM is one); other LMs use the plain path."""
    return getattr(lm.config, "model_type", None) == "llama" and not getattr(lm.config, "pretraining_tp", 1) > 1


# --------------------------------------------------------------------------------------------------
# Fused projections


def _aliased(modules: Sequence[nn.Linear], fused: torch.Tensor | None, name: str) -> bool:
    """Whether each module's `name` parameter is still its row block of `fused`, in order."""
    if fused is None:
        return all(getattr(m, name) is None for m in modules)
    offset = fused.data_ptr()
    for m in modules:
        p = getattr(m, name)
        if p is None or p.device != fused.device or p.data_ptr() != offset:
            return False
        offset += p.numel() * p.element_size()
    return offset == fused.data_ptr() + fused.numel() * fused.element_size()


def _fuse(modules: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One (weight, bias) whose row blocks become the modules' own parameters, or None when the modules are
    not plain frozen Linears sharing a dtype and device (quantised layers, adapters, trainable weights)."""
    if any(type(m) is not nn.Linear for m in modules):
        return None
    weights = [m.weight for m in modules]
    biases = [m.bias for m in modules]
    present = [b for b in biases if b is not None]
    first = weights[0]
    if first.is_meta or len(present) not in (0, len(biases)):
        return None
    if any(p.requires_grad or p.device != first.device or p.dtype != first.dtype for p in weights + present):
        return None
    fused = torch.cat([w.detach() for w in weights])
    fused_bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    rows = 0
    for m, w in zip(modules, weights, strict=True):
        n = w.shape[0]
        m.weight.data = fused[rows : rows + n]  # the same Parameter object, now a view: no memory added
        if fused_bias is not None:
            m.bias.data = fused_bias[rows : rows + n]
        rows += n
    return fused, fused_bias


def _groups(layer: nn.Module) -> tuple[list[Any], list[Any]]:
    """A layer's q/k/v modules and its gate/up modules."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    return qkv, [getattr(mlp, n, None) for n in ("gate_proj", "up_proj")] if hasattr(mlp, "act_fn") else [None]


def _still_fused(layer: nn.Module, weights: FusedWeights | None) -> bool:
    """Whether the layer's projections are still the row blocks of `weights` (not moved or replaced since)."""
    if weights is None:
        return False
    return all(
        fused is None or (_aliased(group, fused, "weight") and _aliased(group, bias, "bias"))
        for group, fused, bias in zip(
            _groups(layer), (weights.qkv, weights.gate_up), (weights.qkv_bias, weights.gate_up_bias), strict=True
        )
    )


def fuse_projections(lm: nn.Module) -> list[FusedWeights]:
    """Per decoder layer, the q/k/v projections as one matrix and gate/up as another, so a decode step reads
    each group with one GEMV. The modules' parameters are re-pointed at row blocks of the fused matrices:
    no memory is added and every other path (training, stock transformers) computes with the same weights.
    Idempotent; a layer whose parameters were moved or replaced since is fused again."""
    out, fused_any = [], False
    with torch.inference_mode(False), torch.no_grad():  # normal tensors: training may use these weights later
        for layer in lm.get_decoder().layers:
            weights = _FUSED.get(layer)
            if not _still_fused(layer, weights):
                qkv, gate_up = (_fuse(group) if all(group) else None for group in _groups(layer))
                weights = _FUSED[layer] = FusedWeights(*(qkv or (None, None)), *(gate_up or (None, None)))
                fused_any = fused_any or any(w is not None for w in weights)
            out.append(weights)
    if fused_any and any(w is not None and w.is_cuda for w in out[0]):
        # A large weight moved to the GPU on its own gets an allocator segment of its own; the replaced ones are
        # wholly free now, so hand them back rather than keep the projections reserved twice.
        torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------------------
# The pieces of a decoder layer


def _attention_inputs(
    layer: nn.Module,
    w: FusedWeights,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm, q/k/v, rotary: (B, T, H) -> q (B, Hq, T, D) and keys (after rotary) stacked on values
    (2, B, Hk, T, D), the layout of one layer's cache."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

    attn, (batch, length) = layer.self_attn, hidden.shape[:2]
    x = layer.input_layernorm(hidden)
    if w.qkv is None:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q = q.view(batch, length, heads, -1).transpose(1, 2)
        k = k.view(batch, length, kv_heads, -1).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    else:
        # q and k are side by side in the fused output: rotate them as one tensor of Hq + Hk heads, with
        # transformers' rotary formula, elementwise the very same numbers in half the kernels
        qkv = F.linear(x, w.qkv, w.qkv_bias)
        width = attn.q_proj.out_features + attn.k_proj.out_features
        qk = qkv[..., :width].view(batch, length, heads + kv_heads, -1).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = ((qk * cos) + (rotate_half(qk) * sin)).split([heads, kv_heads], 1)
        v = qkv[..., width:]
    v = v.view(batch, length, kv_heads, -1).transpose(1, 2)
    return q, torch.stack((k, v))


def _attention_output_and_mlp(
    layer: nn.Module, w: FusedWeights, hidden: torch.Tensor, attended: torch.Tensor
) -> torch.Tensor:
    """Attention output (B, Hq, T, D) -> output projection, residual, norm, MLP, residual -> (B, T, H)."""
    batch, length = hidden.shape[:2]
    hidden = hidden + layer.self_attn.o_proj(attended.transpose(1, 2).reshape(batch, length, -1))
    x, mlp = layer.post_attention_layernorm(hidden), layer.mlp
    if w.gate_up is None:
        return hidden + mlp(x)
    gate, up = F.linear(x, w.gate_up, w.gate_up_bias).chunk(2, dim=-1)
    return hidden + mlp.down_proj(mlp.act_fn(gate) * up)


def _between_attentions(
    layer: nn.Module,
    w: FusedWeights,
    following: nn.Module,
    w_following: FusedWeights,
    hidden: torch.Tensor,
    attended: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything from one layer's attention output to the following layer's attention inputs
    -> (hidden, q, keys and values): the residual add and the next norm fuse when compiled."""
    hidden = _attention_output_and_mlp(layer, w, hidden, attended)
    return hidden, *_attention_inputs(following, w_following, hidden, cos, sin, heads, kv_heads)


def _prompt_between_attentions(*args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same for prompts (its own code object, so its compiled graph, dynamic in length, has its own cache)."""
    return _between_attentions(*args)


def _any_length(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """A compiled `_prompt_between_attentions` whose inputs have their sequence length marked dynamic: one graph
    serves every prompt length while the other sizes (batch, width, heads) stay fixed and specialise the
    kernels, and it compiles faster than a graph with every size dynamic."""

    def call(
        layer: nn.Module, w: FusedWeights, following: nn.Module, w_following: FusedWeights, hidden: torch.Tensor,
        attended: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        for tensor, dim in ((hidden, 1), (attended, 2), (cos, 1), (sin, 1)):
            torch._dynamo.mark_dynamic(tensor, dim)
        return compiled(layer, w, following, w_following, hidden, attended, cos, sin, heads, kv_heads)

    return call


def _or_eager(compiled: Callable[..., Any], eager: Callable[..., Any]) -> Callable[..., Any]:
    """`compiled`, or `eager` from the first call on if compiling fails (no C++ compiler for the CPU backend,
    no Triton for the GPU one): decoding goes on, slower, with a warning instead of a compiler traceback."""
    chosen: list[Callable[..., Any]] = []

    def call(*args: Any) -> Any:
        if chosen:
            return chosen[0](*args)
        try:
            out = compiled(*args)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            warnings.warn(
                f"decoding without torch.compile: compiling the decoder layers failed ({reason})", stacklevel=2
            )
            chosen.append(eager)
            return eager(*args)
        chosen.append(compiled)
        return out

    return call


class StaticEngine:
    """The static-cache decode engine: prefill, then one-token steps for `batch_size` rows over a cache of `max_len`
    slots, captured as a CUDA graph with `use_cuda_graph` (see `vlm.generation.engine.DecodeEngine`)."""

    def __init__(
        self, lm: nn.Module, batch_size: int, max_len: int, use_cuda_graph: bool, compile_layers: bool = False
    ):
        self.lm = lm
        self.decoder = lm.get_decoder()
        self.layers = list(self.decoder.layers)
        self.weights = fuse_projections(lm)
        self._between, self._prompt_between = _between_attentions, _prompt_between_attentions
        if compile_layers:
            compiled = torch.compile(_between_attentions, fullgraph=True, dynamic=False)
            self._between = _or_eager(compiled, _between_attentions)
            compiled = _any_length(torch.compile(_prompt_between_attentions, fullgraph=True))
            self._prompt_between = _or_eager(compiled, _prompt_between_attentions)
        config = lm.config
        self.batch_size, self.max_len = batch_size, max_len
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.gqa = self.heads != self.kv_heads
        weight = lm.get_input_embeddings().weight
        device, dtype = weight.device, weight.dtype
        # keys and values of a layer side by side: (layers, 2, B, Hk, L, D), one write per layer and step
        self.cache = torch.zeros(
            (config.num_hidden_layers, 2, batch_size, self.kv_heads, max_len, self.head_dim), device=device, dtype=dtype
        )
        # additive attention mask over the slots: 0 where a row may attend, -inf elsewhere
        self.mask = torch.full((batch_size, max_len), float("-inf"), device=device, dtype=dtype)
        # Static inputs and output of the step (what a CUDA graph reads and writes).
        self.ids = torch.zeros((batch_size, 1), device=device, dtype=torch.long)
        self.positions = torch.zeros((batch_size, 1), device=device, dtype=torch.long)
        self.slot = torch.zeros((1,), device=device, dtype=torch.long)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        # width K -> (graph, logits, (ids, positions, slots) buffers) of `extend`
        self._offsets = torch.arange(64, device=device)  # slot offsets of an extension (at most 64 wide)
        self._extend_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        self.use_cuda_graph = use_cuda_graph and device.type == "cuda"
        self.length = 0  # slots [0, length) hold the sequence so far
        self._embeddings_at = weight.data_ptr()  # moving or recasting the LM gives every weight new storage

    @property
    def keys(self) -> torch.Tensor:
        """(layers, B, Hk, L, D) keys after rotary."""
        return self.cache[:, 0]

    @property
    def values(self) -> torch.Tensor:
        return self.cache[:, 1]

    @property
    def valid(self) -> torch.Tensor:
        """(B, L): the slots each row attends to."""
        return self.mask == 0

    def is_current(self) -> bool:
        """Whether the LM's weights are still the ones this decoder (and its captured graph) reads: not moved
        or recast (`.to`, `.half`: new storage for every weight, the embeddings' tells) and the first and last
        layers' projections still fused. Weights loaded in place (`load_state_dict`) need no new decoder."""
        return self.lm.get_input_embeddings().weight.data_ptr() == self._embeddings_at and all(
            _FUSED.get(self.layers[i]) is self.weights[i] and _still_fused(self.layers[i], self.weights[i])
            for i in (0, -1)
        )

    def _layer_loop(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        between: Callable[..., Any],
        attend: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The decoder layers around `attend(layer index, q, keys and values) -> attention output`."""
        layers, weights, heads = self.layers, self.weights, (self.heads, self.kv_heads)
        q, kv = _attention_inputs(layers[0], weights[0], hidden, cos, sin, *heads)
        for i in range(len(layers) - 1):
            attended = attend(i, q, kv)
            hidden, q, kv = between(
                layers[i], weights[i], layers[i + 1], weights[i + 1], hidden, attended, cos, sin, *heads
            )
        attended = attend(len(layers) - 1, q, kv)
        return _attention_output_and_mlp(layers[-1], weights[-1], hidden, attended)

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Run left-padded prompts (B, T, H) through the LM, writing keys (after rotary) and values straight
        into the static slots [0, T) -> the last position's logits (B, V)."""
        length = attention_mask.shape[1]
        if length >= self.max_len:
            raise ValueError(f"prompt of {length} tokens does not fit a static cache of {self.max_len}")
        valid = attention_mask.bool()
        self.mask.fill_(float("-inf"))
        self.mask[:, :length].masked_fill_(valid, 0.0)
        mask = None  # no padding: plain causal attention (flash kernels)
        if not bool(valid.all()):
            causal = torch.ones((length, length), dtype=torch.bool, device=valid.device).tril()
            allowed = causal[None, None] & valid[:, None, None, :]  # (B, 1, T, T)
            allowed |= ~valid[:, None, :, None]  # pad queries see everything: finite values nobody reads
            mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=embeds.device)
            mask.masked_fill_(~allowed, float("-inf"))  # additive once here, not converted in every layer

        def attend(i: int, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            self.cache[i, :, :, :, :length].copy_(kv)
            return F.scaled_dot_product_attention(
                q, kv[0], kv[1], attn_mask=mask, is_causal=mask is None, scale=self.layers[i].self_attn.scaling,
                enable_gqa=self.gqa,
            )  # fmt: skip

        if not embeds.is_inference():  # as every later layer's input is: one compiled graph serves them all
            embeds = embeds.clone()
        cos, sin = self.decoder.rotary_emb(embeds, position_ids)
        hidden = self._layer_loop(embeds, cos, sin, self._prompt_between, attend)
        self.length = length
        return self.lm.get_output_embeddings()(self.decoder.norm(hidden[:, -1:]))[:, -1]  # (B, V)

    @torch.inference_mode()
    def _step(self) -> torch.Tensor:
        """ids (B, 1) at rotary `positions` (B, 1), written to cache `slot` -> last logits (B, V)."""
        hidden = self.decoder.embed_tokens(self.ids)  # (B, 1, H)
        cos, sin = self.decoder.rotary_emb(hidden, self.positions)
        self.mask.index_fill_(1, self.slot, 0.0)
        mask = self.mask[:, None, None, :]  # (B, 1, 1, L)

        def attend(i: int, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            cache = self.cache[i]
            cache.index_copy_(3, self.slot, kv)
            return F.scaled_dot_product_attention(
                q, cache[0], cache[1], attn_mask=mask, scale=self.layers[i].self_attn.scaling, enable_gqa=self.gqa
            )  # (B, Hq, 1, D)

        hidden = self._layer_loop(hidden, cos, sin, self._between, attend)
        return self.lm.get_output_embeddings()(self.decoder.norm(hidden)[:, -1])  # (B, V)

    @torch.inference_mode()
    def _extend(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """ids (B, K) at rotary `positions` (B, K), written to cache `slots` (K,) -> logits (B, K, V); each id
        attends to the slots before it and to itself."""
        hidden = self.decoder.embed_tokens(ids)  # (B, K, H)
        cos, sin = self.decoder.rotary_emb(hidden, positions)
        self.mask.index_fill_(1, slots, 0.0)
        later = torch.arange(self.max_len, device=slots.device)[None, :] > slots[:, None]  # (K, L)
        mask = self.mask[:, None, None, :].masked_fill(later, float("-inf"))  # (B, 1, K, L)

        def attend(i: int, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            cache = self.cache[i]
            cache.index_copy_(3, slots, kv)
            return F.scaled_dot_product_attention(
                q, cache[0], cache[1], attn_mask=mask, scale=self.layers[i].self_attn.scaling, enable_gqa=self.gqa
            )  # (B, Hq, K, D)

        hidden = self._layer_loop(hidden, cos, sin, self._between, attend)
        return self.lm.get_output_embeddings()(self.decoder.norm(hidden))  # (B, K, V)

    def extend(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Decode K ids per row into the next K slots in one forward: ids (B, K), positions (B, K) -> logits
        (B, K, V). With `use_cuda_graph`, each K gets its own captured graph."""
        start, width = self.length, ids.shape[1]
        if width > len(self._offsets):
            raise ValueError(f"an extension of {width} ids is over the {len(self._offsets)} one forward takes")
        if start + width > self.max_len:
            raise ValueError(f"cache slots {start}..{start + width - 1} are past the static cache of {self.max_len}")
        self.length += width
        if not self.use_cuda_graph:
            return self._extend(ids, positions, self._offsets[:width] + start)
        graphed = self._extend_graphs.get(width)
        if graphed is None:
            buffers = (torch.zeros_like(ids), torch.zeros_like(positions), torch.zeros((width,), dtype=torch.long,
                       device=ids.device))  # fmt: skip
            buffers[0].copy_(ids), buffers[1].copy_(positions), torch.add(self._offsets[:width], start, out=buffers[2])
            try:
                graph, logits = capture_graph(lambda: self._extend(*buffers))
            except RuntimeError as error:
                warnings.warn(f"checking drafts without a CUDA graph: capture failed ({error})", stacklevel=2)
                self.use_cuda_graph = False
                return self._extend(*buffers)
            graphed = self._extend_graphs[width] = (graph, logits, buffers)
        graph, logits, (ids_in, positions_in, slots_in) = graphed
        ids_in.copy_(ids)
        positions_in.copy_(positions)
        torch.add(self._offsets[:width], start, out=slots_in)  # on the device: no wait for the host
        graph.replay()
        return logits

    @torch.inference_mode()
    def rollback(self, length: int) -> None:
        """Forget every slot from `length` on: the next step writes slot `length`."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: the cache holds {self.length} slots")
        self.mask[:, length:] = float("-inf")
        self.length = length

    def _capture(self) -> None:
        """Record the step as a CUDA graph. The warm-up steps write only this step's own cache slot, with the
        values the replay then writes again, so there is nothing to restore (a copy of the cache would
        double its memory: 20 GB at 14B for 32 rows)."""
        self.graph, self.logits = capture_graph(self._step)

    def step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Decode one token per row into the next slot: ids (B,), rotary positions (B,) -> logits (B, V)."""
        slot = self.length
        if slot >= self.max_len:
            raise ValueError(f"cache slot {slot} is past the static cache of {self.max_len}")
        self.length += 1
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
