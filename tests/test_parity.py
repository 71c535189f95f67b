"""Parity with transformers' own LlavaForConditionalGeneration given the same weights (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

import vlm
from vlm.export import to_llava_hf
from vlm.processing.chat import IGNORE_INDEX


def _conversations(images):
    multi_turn = [
        {"role": "system", "content": "You look at pictures."},
        {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": [{"type": "text", "text": "And this? "}, {"type": "image", "image": images[1]}]},
        {"role": "assistant", "content": "Blue 0123 square, quick fox."},
    ]
    short = [
        {"role": "user", "content": [{"type": "image", "image": images[2]}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": "Lazy dog."},
    ]
    return [multi_turn, short]


def _right_padded(model, conversations):
    chats = [model.encode_messages(c, add_generation_prompt=False) for c in conversations]
    width = max(len(c) for c in chats)
    ids = torch.full((len(chats), width), model.pad_id)
    labels = torch.full((len(chats), width), IGNORE_INDEX)
    mask = torch.zeros((len(chats), width), dtype=torch.long)
    for row, chat in enumerate(chats):
        ids[row, : len(chat)] = torch.tensor(chat.input_ids)
        labels[row, : len(chat)] = torch.tensor(chat.labels)
        mask[row, : len(chat)] = 1
    pixels = model.pixel_values([im for c in chats for im in c.images])
    return ids, mask, labels, pixels


@pytest.fixture(scope="module")
def pair(tiny_adapter):
    model = vlm.load(tiny_adapter, device="cpu", dtype=torch.float32)
    return model, to_llava_hf(model)


def test_logits_match_transformers_llava_on_padded_multi_image_batch(pair, rgb_images):
    model, llava = pair
    ids, mask, _labels, pixels = _right_padded(model, _conversations(rgb_images))
    assert pixels.shape[0] == 3 and int(mask.sum(1).min()) < ids.shape[1]  # three images, real padding
    with torch.no_grad():
        ours = model.module(ids, mask, pixels).logits
        theirs = llava(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4


def test_loss_matches_transformers_and_head_runs_on_label_rows_only(pair, rgb_images):
    model, llava = pair
    ids, mask, labels, pixels = _right_padded(model, _conversations(rgb_images))
    with torch.no_grad():
        ours = model.module(ids, mask, pixels, labels=labels)
        theirs = llava(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    assert abs(ours.loss.item() - theirs.loss.item()) <= 1e-5
    num_labels = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert ours.logits.shape == (num_labels, model.module.lm.config.vocab_size)
    assert ours.num_label_tokens == num_labels < ids.numel() // 4


def test_compiled_lm_layers_give_the_same_loss_and_projector_gradients(tiny_adapter, rgb_images):
    from torch._dynamo.utils import counters

    model = vlm.load(tiny_adapter, device="cpu", dtype=torch.float32)
    ids, mask, labels, pixels = _right_padded(model, _conversations(rgb_images))

    def loss_and_grads() -> tuple[float, list[torch.Tensor]]:
        model.module.projector.zero_grad(set_to_none=True)
        loss = model.module(ids, mask, pixels, labels=labels).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.module.projector.parameters()]

    plain_loss, plain_grads = loss_and_grads()
    torch._dynamo.reset()
    counters.clear()
    model.module.compile_lm_layers()
    try:
        for _ in range(2):
            loss, grads = loss_and_grads()
            assert abs(loss - plain_loss) <= 1e-5
            assert all(torch.allclose(g, h, rtol=1e-4, atol=1e-6) for g, h in zip(grads, plain_grads, strict=True))
        assert counters["stats"]["unique_graphs"] == 1  # one graph serves both layers and both calls
    finally:
        model.module.compile_lm_layers(False)
    assert all(layer._compiled_call_impl is None for layer in model.module.lm.get_decoder().layers)


def test_gradient_checkpointing_recomputes_the_frozen_layers_and_gives_the_same_gradients(tiny_adapter, rgb_images):
    model = vlm.load(tiny_adapter, device="cpu", dtype=torch.float32)
    model.module.train()
    ids, mask, labels, pixels = _right_padded(model, _conversations(rgb_images))
    mlp_calls = []  # the recompute stops early, after the last op whose saved tensors backward needs
    model.module.lm.get_decoder().layers[0].mlp.gate_proj.register_forward_hook(lambda *_: mlp_calls.append(1))

    def step() -> tuple[int, float, list[torch.Tensor]]:
        mlp_calls.clear()
        model.module.projector.zero_grad(set_to_none=True)
        loss = model.module(ids, mask, pixels, labels=labels).loss
        loss.backward()
        return len(mlp_calls), loss.item(), [p.grad.clone() for p in model.module.projector.parameters()]

    calls, plain_loss, plain_grads = step()
    assert calls == 1
    model.module.enable_gradient_checkpointing()
    calls, loss, grads = step()
    assert calls == 2  # the layer ran again in backward: its activations were not kept
    assert abs(loss - plain_loss) <= 1e-6
    assert all(torch.allclose(g, h, rtol=1e-5, atol=1e-7) for g, h in zip(grads, plain_grads, strict=True))
    assert not model.module.lm.get_decoder().layers[0].mlp.training  # dropout stays off in the frozen parts
    model.module.enable_gradient_checkpointing(False)
    assert step()[0] == 1
    model.module.eval()
    with torch.no_grad():
        mlp_calls.clear()
        model.module(ids, mask, pixels)
    assert len(mlp_calls) == 1


def test_greedy_generation_matches_transformers(tiny_adapter, rgb_images):
    model = vlm.load(tiny_adapter, device="cpu", dtype=torch.float32)
    with torch.no_grad():  # no early stop: both sides must produce 16 tokens to compare
        for token_id in model.stop_ids:
            model.module.lm.get_output_embeddings().weight[token_id] = 0.0
    llava = to_llava_hf(model)
    chats = [model.encode_messages(c[:2] if i == 0 else c[:1]) for i, c in enumerate(_conversations(rgb_images))]
    batch = model.generation_batch(chats, max_new_tokens=16)  # left-padded, two prompts of different lengths
    ours = torch.stack(list(model.generate_tokens(**batch, options=vlm.GenerationOptions(max_new_tokens=16))), 1)
    theirs = llava.generate(**batch, max_new_tokens=16, do_sample=False, pad_token_id=model.pad_id)
    theirs = theirs[:, batch["input_ids"].shape[1] :]
    assert ours.shape == (2, 16)
    assert torch.equal(ours, theirs)
