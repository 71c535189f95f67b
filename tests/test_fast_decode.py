"""The static-cache decoder against transformers on a Llama LM with grouped-query attention and projection
biases (which the tiny test LM elsewhere lacks), and the fused projections it reads."""

from __future__ import annotations

import pytest
import torch

from vlm.generation.static import StaticEngine, fuse_projections


def _lm(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
        max_position_embeddings=256,
    )
    lm = LlamaForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith(".bias"):  # initialised to zero: give them something to get wrong
                p.normal_(std=0.5)
    return lm


@pytest.mark.parametrize("compile_layers", [False, True], ids=["eager", "compiled"])
def test_prefill_and_steps_match_transformers_with_gqa_and_biases(compile_layers):
    import inspect

    from torch._dynamo.utils import counters
    from transformers import DynamicCache

    torch._dynamo.reset()
    counters.clear()
    lm = _lm()
    cache_kwarg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    batch, length, steps = 2, 7, 5
    embeds = torch.randn(batch, length, 64)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        static = StaticEngine(lm, batch, 256, use_cuda_graph=False, compile_layers=compile_layers)
        ours = static.prefill(embeds, mask, positions)
        cache = DynamicCache(config=lm.config)
        theirs = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **{cache_kwarg: cache}).logits[
            :, -1
        ]
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        for _ in range(steps):
            ids = theirs.argmax(-1)
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            ours = static.step(ids, positions)
            theirs = lm(
                input_ids=ids[:, None], attention_mask=mask, position_ids=positions, **{cache_kwarg: cache}
            ).logits[:, -1]
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # three layers, two boundaries: one graph for the prompt and one for steps, whichever layers they join
    assert counters["stats"]["unique_graphs"] == (2 if compile_layers else 0)
    assert torch.equal(static.valid[:, : length + steps], mask.bool())
    assert not static.valid[:, length + steps :].any()


def test_fused_attention_inputs_are_bit_identical_to_the_modules_in_bf16():
    """q and k rotated as one tensor (half the kernels) give exactly transformers' numbers, not merely close
    ones: grouped-query heads, biases, bf16, a batch at different positions."""
    from vlm.generation.static import FusedWeights, _attention_inputs

    lm = _lm().to(torch.bfloat16)
    layer, heads = lm.model.layers[1], (4, 2)
    hidden = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    positions = torch.stack([torch.arange(5), torch.arange(40, 45)])
    with torch.inference_mode():
        cos, sin = lm.model.rotary_emb(hidden, positions)
        q_plain, kv_plain = _attention_inputs(layer, FusedWeights(None, None, None, None), hidden, cos, sin, *heads)
        weights = fuse_projections(lm)[1]
        assert weights[0] is not None
        q_fused, kv_fused = _attention_inputs(layer, weights, hidden, cos, sin, *heads)
    assert q_fused.shape == q_plain.shape == (2, 4, 5, 16) and kv_fused.shape == kv_plain.shape == (2, 2, 2, 5, 16)
    assert torch.equal(q_fused, q_plain) and torch.equal(kv_fused, kv_plain)


def test_fused_projections_are_the_modules_own_weights():
    lm = _lm()
    before = {name: (p, p.detach().clone()) for name, p in lm.named_parameters()}
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        expected = lm(input_ids=ids).logits
    fused = fuse_projections(lm)
    for name, p in lm.named_parameters():  # the same Parameter objects, holding the same numbers
        assert p is before[name][0] and torch.equal(p, before[name][1]), name
    attn, mlp = lm.model.layers[1].self_attn, lm.model.layers[1].mlp
    qkv, qkv_bias, gate_up, gate_up_bias = fused[1]
    assert qkv.shape == (64 + 2 * 32, 64) and gate_up.shape == (2 * 96, 64) and gate_up_bias.shape == (192,)
    element = qkv.element_size()
    assert attn.q_proj.weight.data_ptr() == qkv.data_ptr()  # views: no memory added
    assert attn.v_proj.weight.data_ptr() == qkv.data_ptr() + 96 * 64 * element
    assert attn.k_proj.bias.data_ptr() == qkv_bias.data_ptr() + 64 * element
    assert mlp.up_proj.weight.data_ptr() == gate_up.data_ptr() + 96 * 64 * element
    assert fuse_projections(lm)[1] is fused[1]  # already fused: nothing is copied again
    embeds = torch.randn(1, 5, 64, requires_grad=True)  # not inference tensors: autograd still works
    lm(inputs_embeds=embeds).logits.sum().backward()
    assert embeds.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids).logits, expected)

    static = StaticEngine(lm, 1, 256, use_cuda_graph=False)
    assert static.is_current()
    lm.to(torch.float64)  # new storage for every parameter: the decoder (and its graph) is out of date
    assert not static.is_current()
    fused_again = fuse_projections(lm)[1]
    assert fused_again is not fused[1] and attn.q_proj.weight.data_ptr() == fused_again[0].data_ptr()


def test_trainable_or_unusual_projections_are_left_alone():
    lm = _lm()
    lm.model.layers[0].self_attn.k_proj.weight.requires_grad_(True)
    lm.model.layers[2].mlp.up_proj = torch.nn.Sequential(lm.model.layers[2].mlp.up_proj)  # e.g. an adapter
    fused = fuse_projections(lm)
    assert fused[0][:2] == (None, None) and fused[0][2] is not None
    assert fused[2][0] is not None and fused[2][2:] == (None, None)
    batch, length = 1, 6
    embeds = torch.randn(batch, length, 64)
    mask = torch.ones(batch, length, dtype=torch.long)
    with torch.inference_mode():
        ours = StaticEngine(lm, batch, 256, use_cuda_graph=False).prefill(embeds, mask, mask.cumsum(-1) - 1)
        theirs = lm(inputs_embeds=embeds).logits[:, -1]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_a_failed_compilation_decodes_eagerly_with_a_warning(tmp_path, monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # nothing compiled before can be reused
    torch._dynamo.reset()
    lm = _lm()
    batch, length = 1, 6
    embeds = torch.randn(batch, length, 64)
    mask = torch.ones(batch, length, dtype=torch.long)
    with torch.inference_mode():
        expected = StaticEngine(lm, batch, 256, use_cuda_graph=False).prefill(embeds, mask, mask.cumsum(-1) - 1)
        static = StaticEngine(lm, batch, 256, use_cuda_graph=False, compile_layers=True)
        with (
            inductor.patch({"cpp.cxx": (None, "no-such-c++-compiler"), "fx_graph_cache": False}),
            pytest.warns(UserWarning, match="decoding without torch.compile: compiling the decoder layers failed"),
        ):
            ours = static.prefill(embeds, mask, mask.cumsum(-1) - 1)
    torch.testing.assert_close(ours, expected)
    torch._dynamo.reset()
