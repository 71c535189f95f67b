"""Exports to transformers LLaVA and llama.cpp GGUF, and import from original LLaVA projector files.

Tiny random backbones, CPU, fp32. The llama.cpp tests run only when `llama_cpp` (llama-cpp-python) is
installed; the miniature-world checks use its trained adapter (the `toy_adapter` fixture trains it once per
session; VLM_TOY_ADAPTER=DIR uses one already trained).
"""

from __future__ import annotations

import base64
import ctypes
import itertools
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import vlm
from tests.conftest import make_adapter
from vlm.errors import ConfigError
from vlm.export import (
    FEATURE_LAYER_KEY,
    chatml_template,
    export_gguf_mmproj,
    export_llava_hf,
    import_llava,
    open_clip_to_hf,
    to_llava_hf,
)
from vlm.processing.chat import normalize_messages, render_text

gguf = pytest.importorskip("gguf")


def _square_images(directory: Path, size: int, count: int) -> list[Path]:
    """Random RGB PNGs of exactly the tower's size (so every preprocessing pipeline agrees)."""
    rng = np.random.default_rng(7)
    paths = []
    for i in range(count):
        path = directory / f"square{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _greedy_ours(model: vlm.VisionLanguageModel, messages: list[dict[str, Any]], max_new_tokens: int) -> list[int]:
    """Our greedy continuation, up to and including the first stop token."""
    batch = model.generation_batch([model.encode_messages(messages)], max_new_tokens)
    tokens = []
    for step in model.generate_tokens(**batch, options=vlm.GenerationOptions(max_new_tokens=max_new_tokens)):
        tokens.append(int(step[0]))
        if tokens[-1] in model.stop_ids:
            break
    return tokens


def _greedy_llava(llava: Any, processor: Any, messages: list[dict[str, Any]], images: list, max_new_tokens: int):
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[Image.open(p) for p in images] or None, return_tensors="pt")
    out = llava.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _image_part(path: Path) -> dict[str, Any]:
    return {"type": "image", "image": str(path)}


# --------------------------------------------------------------------------------------------------
# transformers LLaVA


@pytest.fixture(scope="module")
def hf_export(text_adapter: Path, tmp_path_factory) -> tuple[vlm.VisionLanguageModel, Path]:
    """An export on each vocabulary (the tiny BPE, CausalLM's real one)."""
    model = vlm.load(text_adapter, device="cpu", dtype=torch.float32)
    with torch.no_grad():  # the random LM never stops, so greedy runs compare max_new_tokens tokens
        for token_id in model.stop_ids:
            model.module.lm.get_output_embeddings().weight[token_id] = 0.0
    model.decode_mode = "static"  # which fuses q/k/v and gate/up into shared matrices: each must still be saved
    model.caption(Image.new("RGB", (32, 32), (200, 30, 30)), max_new_tokens=2)
    with pytest.warns(UserWarning, match=r"Images of exactly 32x32 pixels are preprocessed identically"):
        out = export_llava_hf(model, tmp_path_factory.mktemp("export") / "llava")
    return model, out


def test_llava_hf_export_loads_with_transformers(hf_export):
    from transformers import AutoProcessor, GenerationConfig, LlavaForConditionalGeneration

    model, out = hf_export
    llava = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    image_id = model.config.image_token_id
    assert config["image_token_id"] == config["image_token_index"] == image_id == len(model.tokenizer)
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (-2, "default")
    assert config["image_seq_length"] == model.num_image_tokens == 16
    assert llava.config.image_token_id == image_id
    assert type(processor).__name__ == "LlavaProcessor"
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == image_id
    assert processor.tokenizer.decode([image_id]) == "<image>"
    assert (processor.patch_size, processor.num_additional_image_tokens) == (8, 1)
    image_processor = processor.image_processor
    assert image_processor.do_pad and not image_processor.do_center_crop
    assert image_processor.size == {"height": 32, "width": 32}
    assert list(image_processor.image_mean) == list(model.module.vision.mean)
    generation = GenerationConfig.from_pretrained(out)
    stop_ids = sorted(model.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    assert sorted(generation.eos_token_id) == stop_ids
    assert image_id in generation.suppress_tokens
    assert generation.max_new_tokens == 256  # vlm's default, not transformers' 20 new tokens
    readme = (out / "README.md").read_text()
    assert "32x32 pixels are preprocessed identically" in readme and model.config.system_prompt in readme
    with torch.no_grad():  # the weights are ours
        assert torch.equal(llava.model.multi_modal_projector.linear_2.weight, model.module.projector[2].weight)
        assert torch.equal(llava.lm_head.weight, model.module.lm.get_output_embeddings().weight)
        for name, weight in model.module.lm.get_decoder().named_parameters():
            assert torch.equal(llava.model.language_model.get_parameter(name), weight), name


CONVERSATIONS = {
    "no system": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
    "blank system": [
        {"role": "system", "content": "  "},
        {"role": "user", "content": "Plain text, no image <image> typed."},
    ],
    "multi-turn": [
        {"role": "system", "content": [{"type": "text", "text": "You look at "}, {"type": "text", "text": "images."}]},
        {"role": "user", "content": [{"type": "text", "text": "First: "}, {"type": "image"}, {"type": "image"}]},
        {"role": "assistant", "content": "Two squares."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": 'And this one?\nSay "why".'}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]},
    ],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_exported_chat_template_renders_like_render_text(hf_export, name, add_generation_prompt, tmp_path):
    from transformers import AutoProcessor

    model, out = hf_export
    processor = AutoProcessor.from_pretrained(out)
    hf_messages = CONVERSATIONS[name]
    ours = [  # the same conversation in vlm's format (image parts carry the image)
        {**m, "content": [_image_part(tmp_path) if p == {"type": "image"} else p for p in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in hf_messages
    ]
    expected = render_text(normalize_messages(ours, model.config.system_prompt), "<image>", add_generation_prompt)
    kwargs = {"add_generation_prompt": add_generation_prompt, "tokenize": False}
    assert processor.apply_chat_template(hf_messages, **kwargs) == expected
    assert processor.tokenizer.apply_chat_template(hf_messages, **kwargs) == expected


def test_chat_template_escapes_the_default_system_prompt():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    system = 'Say "hi" \\ then\nstop.'
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(chatml_template(system))
    text = template.render(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert text == f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_chat_template_loops_over_each_messages_content():
    """Servers such as vLLM decide whether a template takes OpenAI-style lists of parts (images where the user put
    them) or flattened strings by looking for a loop over `message['content']` inside the loop over `messages`."""
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tree = ImmutableSandboxedEnvironment().parse(chatml_template("sys"))
    loops = list(tree.find_all(jinja2.nodes.For))
    over_messages = [loop.target.name for loop in loops if getattr(loop.iter, "name", None) == "messages"]
    over_content = [
        loop
        for loop in loops
        if isinstance(loop.iter, jinja2.nodes.Getitem)
        and getattr(loop.iter.node, "name", None) in over_messages
        and getattr(loop.iter.arg, "value", None) == "content"
    ]
    assert over_messages == ["message"] and len(over_content) == 1


def test_processor_inputs_equal_ours_for_tower_sized_images(hf_export, tmp_path):
    from transformers import AutoProcessor

    model, out = hf_export
    processor = AutoProcessor.from_pretrained(out)
    images = _square_images(tmp_path, 32, 2)
    messages = [
        {"role": "user", "content": [_image_part(images[0]), {"type": "text", "text": "Compare "}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [{"type": "text", "text": "with: "}, _image_part(images[1])]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[Image.open(p) for p in images], return_tensors="pt")
    encoded = model.encode_messages(messages)
    assert inputs["input_ids"][0].tolist() == encoded.input_ids
    assert encoded.input_ids.count(model.config.image_token_id) == 2 * 16
    assert (inputs["pixel_values"] - model.pixel_values(encoded.images)).abs().max().item() <= 1e-6


def test_processor_pads_non_square_images_with_our_colour(hf_export, tmp_path):
    """Images whose long side is the tower's size are only padded: same pad colour, same pixels."""
    from transformers import AutoProcessor

    model, out = hf_export
    processor = AutoProcessor.from_pretrained(out)
    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(32, 19), (14, 32)]]
    theirs = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    ours = model.pixel_values(images)
    assert (theirs[:, :, 0, 0] - ours[:, :, 0, 0]).abs().max().item() <= 1e-6  # a padded corner
    assert (theirs - ours).abs().max().item() <= 1e-6


def test_processor_resizes_within_a_grey_level_or_two_of_ours(hf_export):
    """What the export's README and warning say of images that need resizing (torchvision vs PIL bicubic)."""
    from transformers import AutoProcessor

    model, out = hf_export
    processor = AutoProcessor.from_pretrained(out)
    rng = np.random.default_rng(6)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(45, 45), (100, 37)]]
    theirs = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    std = torch.tensor(model.module.vision.std)[None, :, None, None]
    grey_levels = ((theirs - model.pixel_values(images)) * std * 255).abs()
    assert 0 < grey_levels.max().item() <= 2


@pytest.mark.parametrize("aspect", ["pad", "crop", "resize"])
def test_exported_processor_preprocesses_as_vlm_in_every_aspect_mode(aspect, tiny_dir, tiny_lm_path, tiny_clip_path):
    """Images that need no resize come out identical, with sizes that hit the pad and crop rounding (margins of
    1, 2, 3 and 15 pixels); images that need resizing differ by a grey level or two (torchvision's antialiased bicubic
    against PIL's), never by a pixel's shift."""
    from transformers import AutoProcessor

    adapter = make_adapter(tiny_dir / f"adapter-{aspect}", tiny_lm_path, tiny_clip_path, image_aspect=aspect)
    model = vlm.load(adapter, device="cpu", dtype=torch.float32)
    with pytest.warns(UserWarning, match="preprocessed identically"):
        out = export_llava_hf(model, tiny_dir / f"llava-{aspect}")
    processor = AutoProcessor.from_pretrained(out).image_processor
    rng = np.random.default_rng(7)
    exact = {
        "pad": [(32, 32), (32, 19), (14, 32), (32, 31), (32, 1)],
        "crop": [(32, 32), (47, 32), (35, 32), (32, 47), (33, 32), (32, 34)],
        "resize": [(32, 32)],
    }[aspect]
    resized = [(45, 45), (100, 37), (37, 100), (64, 33)]
    std = torch.tensor(model.module.vision.std)[None, :, None, None]
    for sizes, bound in ((exact, 1e-6), (resized, 2.5 / 255)):
        images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
        for image, (w, h) in zip(images, sizes, strict=True):
            theirs = processor(images=[image], return_tensors="pt")["pixel_values"]
            difference = ((theirs - model.pixel_values([image])) * std).abs().max().item()
            assert difference <= bound, f"{aspect} {w}x{h}: {difference * 255:.1f} grey levels apart"


def test_loaded_llava_generates_our_greedy_tokens(hf_export, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, out = hf_export
    llava = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(out)
    images = _square_images(tmp_path, 32, 2)
    for image in images:
        messages = [{"role": "user", "content": [_image_part(image), {"type": "text", "text": "Describe it."}]}]
        ours = _greedy_ours(model, messages, 12)
        assert len(ours) == 12
        assert _greedy_llava(llava, processor, messages, [image], 12) == ours


def test_llava_hf_export_refuses_a_non_empty_directory_and_other_projectors(tiny_model, tiny_adapter, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(ConfigError, match="not an empty directory"):
        export_llava_hf(tiny_model, tmp_path / "taken")
    linear = vlm.load(
        make_adapter(
            tmp_path / "linear",
            Path(tiny_model.config.lm),
            Path(tiny_model.config.vision_tower),
            projector_type="linear",
        ),
        device="cpu",
    )
    with pytest.raises(ConfigError, match="'linear' projector"):
        to_llava_hf(linear)
    with pytest.raises(ConfigError, match="'linear' projector"):
        export_gguf_mmproj(tmp_path / "linear", tmp_path / "linear.gguf")


# --------------------------------------------------------------------------------------------------
# open_clip towers


def _open_clip_vit(**overrides: Any) -> Any:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(4)
    settings = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "heads": 4, "mlp_ratio": 2.0}
    return VisionTransformer(**{**settings, "output_dim": 16, **overrides}).eval()


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_open_clip_vit_converts_to_clip_vision_model(act):
    from open_clip.transformer import QuickGELU

    visual = _open_clip_vit(act_layer=QuickGELU if act == "quick_gelu" else torch.nn.GELU, pool_type="avg")
    hf = open_clip_to_hf(visual)
    assert hf.config.hidden_act == act and hf.config.intermediate_size == 64
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = visual.forward_intermediates(
            pixels, intermediates_only=True, output_fmt="NLC", output_extra_tokens=True
        )
        hidden = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
    for block in range(3):  # hidden state k is the output of block k-1
        cls, patches = theirs["image_intermediates_prefix"][block], theirs["image_intermediates"][block]
        assert (torch.cat([cls, patches], 1) - hidden[block + 1]).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"ls_init_value": 0.1}, "layer scale"), ({"attentional_pool": True}, "attentional pooler")],
)
def test_unconvertible_open_clip_towers_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=f"{message}; supported: open_clip ViT towers laid out like OpenAI"):
        open_clip_to_hf(_open_clip_vit(**overrides))


@pytest.fixture(scope="module")
def open_clip_adapter(tiny_dir: Path, tiny_lm_path: Path, tiny_open_clip_path: Path) -> Path:
    return make_adapter(tiny_dir / "open_clip_adapter", tiny_lm_path, tiny_open_clip_path, backend="open_clip")


def test_open_clip_adapter_exports_to_llava_hf(open_clip_adapter, tmp_path, rgb_images):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = vlm.load(open_clip_adapter, device="cpu", dtype=torch.float32)
    pixels = model.pixel_values(rgb_images)
    with torch.no_grad():
        converted = to_llava_hf(model).model.get_image_features(pixel_values=pixels)
        converted = torch.stack(list(getattr(converted, "pooler_output", converted)))
        assert (converted - model.module.encode_images(pixels)).abs().max().item() <= 1e-5
    with pytest.warns(UserWarning, match="torchvision"):
        out = export_llava_hf(model, tmp_path / "llava")
    llava = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(out)
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]
    messages = [{"role": "user", "content": [_image_part(rgb_images[0]), {"type": "text", "text": "Describe it."}]}]
    chat = model.encode_messages(messages)
    ids = torch.tensor([chat.input_ids])
    with torch.no_grad():
        ours = model.module(ids, pixel_values=model.pixel_values(chat.images)).logits
        theirs = llava(input_ids=ids, pixel_values=model.pixel_values(chat.images)).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------------------------------
# Import from original LLaVA


def _llava_projector_file(path: Path, dims: list[int], seed: int = 5) -> dict[str, torch.Tensor]:
    """An original-LLaVA projector file: `model.mm_projector.{0,2,...}.*`, Linear layers with GELU between."""
    torch.manual_seed(seed)
    state = {}
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        state[f"model.mm_projector.{2 * i}.weight"] = torch.randn(d_out, d_in) * 0.2
        state[f"model.mm_projector.{2 * i}.bias"] = torch.randn(d_out) * 0.2
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


def test_import_llava_round_trips_through_llava_hf(tiny_lm_path, tiny_clip_path, tmp_path, rgb_images):
    from transformers import LlavaForConditionalGeneration

    original = _llava_projector_file(tmp_path / "mm_projector.bin", [32, 64, 64])
    adapter = import_llava(
        tmp_path / "mm_projector.bin", vision_tower=str(tiny_clip_path), lm=str(tiny_lm_path), out=tmp_path / "adapter"
    )
    config = vlm.adapter.read_config(adapter)
    assert (config.projector_type, config.vision_hidden_size, config.lm_hidden_size) == ("mlp2x_gelu", 32, 64)
    assert (config.select_layer, config.select_feature, config.image_aspect) == (-2, "patch", "pad")
    model = vlm.load(adapter, device="cpu", dtype=torch.float32)
    assert torch.equal(model.module.projector[2].weight, original["model.mm_projector.2.weight"])
    with pytest.warns(UserWarning):
        out = export_llava_hf(model, tmp_path / "llava")
    llava = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    messages = [
        {"role": "user", "content": [_image_part(rgb_images[1]), {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A red circle."},
    ]
    chat = model.encode_messages(messages, add_generation_prompt=False)
    ids, pixels = torch.tensor([chat.input_ids]), model.pixel_values(chat.images)
    with torch.no_grad():
        diff = (model.module(ids, pixel_values=pixels).logits - llava(input_ids=ids, pixel_values=pixels).logits).abs()
    assert diff.max().item() <= 1e-4


@pytest.mark.parametrize(
    ("file", "dims", "expected"),
    [("linear.safetensors", [32, 64], "linear"), ("mm_projector.bin", [32, 64, 64, 64], "mlp3x_gelu")],
)
def test_import_llava_infers_linear_and_deeper_projectors(tiny_lm_path, tiny_clip_path, tmp_path, file, dims, expected):
    _llava_projector_file(tmp_path / file, dims)
    adapter = import_llava(tmp_path / file, vision_tower=str(tiny_clip_path), lm=str(tiny_lm_path), out=tmp_path / "a")
    assert vlm.adapter.read_config(adapter).projector_type == expected
    assert vlm.load(adapter, device="cpu").module.projector[0].weight.shape == (64, 32)


@pytest.mark.parametrize(
    ("dims", "message"),
    [
        ([48, 64, 64], r"the projector expects 48-d vision features but '.*clip' gives 32-d"),
        ([32, 80, 80], r"the projector outputs 80-d embeddings but '.*lm' has 64-d hidden states"),
        ([32, 64, 72], r"weight 2.weight has shape \(72, 64\), expected \(64, 64\)"),
    ],
)
def test_import_llava_checks_shapes_against_the_backbones(tiny_lm_path, tiny_clip_path, tmp_path, dims, message):
    _llava_projector_file(tmp_path / "mm_projector.bin", dims)
    with pytest.raises(ConfigError, match=message):
        import_llava(
            tmp_path / "mm_projector.bin", vision_tower=str(tiny_clip_path), lm=str(tiny_lm_path), out=tmp_path / "a"
        )
    assert not (tmp_path / "a").exists()


def test_import_llava_rejects_gaps_in_the_layer_indices(tiny_lm_path, tiny_clip_path, tmp_path):
    torch.save({"model.mm_projector.0.weight": torch.zeros(64, 32), "model.mm_projector.0.bias": torch.zeros(64),
                "model.mm_projector.4.weight": torch.zeros(64, 64), "model.mm_projector.4.bias": torch.zeros(64)},
               tmp_path / "gap.bin")  # fmt: skip
    with pytest.raises(ConfigError, match=r"layers \[0, 4\] are not LLaVA's linear layers 0, 2, 4"):
        import_llava(tmp_path / "gap.bin", vision_tower=str(tiny_clip_path), lm=str(tiny_lm_path), out=tmp_path / "a")


# --------------------------------------------------------------------------------------------------
# llama.cpp mmproj GGUF


def _gguf_fields(reader: Any) -> dict[str, Any]:
    """Scalar, string and array metadata of a GGUF file as Python values."""
    return {name: field.contents() for name, field in reader.fields.items()}


def test_gguf_mmproj_has_llama_cpp_names_and_metadata(tiny_model, tiny_adapter, tmp_path):
    path = export_gguf_mmproj(tiny_adapter, tmp_path / "mmproj.gguf")
    reader = gguf.GGUFReader(path)
    fields = _gguf_fields(reader)
    expected = {
        "general.architecture": "clip",
        "general.type": "mmproj",
        "general.file_type": 1,
        "clip.projector_type": "mlp",
        "clip.has_text_encoder": False,
        "clip.has_vision_encoder": True,
        "clip.has_llava_projector": True,
        "clip.use_gelu": False,  # the tiny HF CLIP uses quick_gelu
        "clip.vision.image_size": 32,
        "clip.vision.patch_size": 8,
        "clip.vision.embedding_length": 32,
        "clip.vision.feed_forward_length": 64,
        "clip.vision.projection_dim": 64,
        "clip.vision.attention.head_count": 4,
        "clip.vision.block_count": 2,  # layer -2 of 3 = hidden state 2: two blocks run
        FEATURE_LAYER_KEY: [2],
    }
    assert {k: fields[k] for k in expected} == expected
    assert fields["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert fields["clip.vision.image_mean"] == pytest.approx(list(tiny_model.module.vision.mean))
    assert fields["clip.vision.image_std"] == pytest.approx(list(tiny_model.module.vision.std))

    tensors = {t.name: t for t in reader.tensors}
    block = [f"{p}.{s}" for p in ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down")
             for s in ("weight", "bias")]  # fmt: skip
    assert set(tensors) == {
        "v.class_embd", "v.patch_embd.weight", "v.position_embd.weight", "v.pre_ln.weight", "v.pre_ln.bias",
        *(f"v.blk.{i}.{name}" for i in range(2) for name in block),
        "mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias",
    }  # fmt: skip
    shapes = {name: tuple(int(n) for n in t.shape) for name, t in tensors.items()}  # ggml order: fastest dim first
    assert shapes["v.patch_embd.weight"] == (8, 8, 3, 32)
    assert shapes["v.position_embd.weight"] == (32, 17)
    assert shapes["v.class_embd"] == (32,)
    assert shapes["v.blk.0.ffn_down.weight"] == (32, 64)  # fc1 in the LLaVA-1.5 layout clip.cpp swaps back
    assert shapes["v.blk.0.ffn_up.weight"] == (64, 32)
    assert shapes["mm.0.weight"] == (32, 64) and shapes["mm.2.weight"] == (64, 64)
    assert tensors["mm.2.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["mm.2.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    fc1 = tiny_model.module.vision.model.state_dict()["encoder.layers.1.mlp.fc1.weight"]
    assert np.allclose(np.asarray(tensors["v.blk.1.ffn_down.weight"].data), fc1.numpy(), atol=1e-3)
    assert np.allclose(np.asarray(tensors["mm.2.bias"].data), tiny_model.module.projector[2].bias.detach().numpy())


def test_gguf_mmproj_converts_open_clip_towers(open_clip_adapter, tmp_path):
    # this tower's mean (0.5) pads with grey in vlm; llama.cpp pads with OpenAI CLIP's mean whatever the GGUF says
    with pytest.warns(UserWarning, match=r"pads non-square images with the tower's mean colour \(127, 127, 127\)"):
        path = export_gguf_mmproj(open_clip_adapter, tmp_path / "mmproj.gguf", ftype="f32")
    reader = gguf.GGUFReader(path)
    fields = _gguf_fields(reader)
    assert fields["clip.use_gelu"] is True  # open_clip's default nn.GELU
    assert fields["clip.vision.image_mean"] == pytest.approx([0.5, 0.5, 0.5])
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}


# --------------------------------------------------------------------------------------------------
# llama.cpp end to end (needs llama-cpp-python)


def write_lm_gguf(lm_dir: Path, path: Path, default_system: str) -> Path:
    """A Llama-architecture LM with a GPT-2-style byte-level BPE tokenizer as an f32 GGUF for llama.cpp."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    config = lm.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    rope_theta = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name(lm_dir.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    special = set(tokenizer.all_special_tokens) | {"<|im_start|>", "<|im_end|>"}
    tokens = [f"[PAD{i}]" for i in range(config.vocab_size)]  # rows past the tokenizer
    types = [gguf.TokenType.UNUSED] * config.vocab_size
    for token, i in tokenizer.get_vocab().items():
        tokens[i] = token
        types[i] = gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_eot_token_id(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chatml_template(default_system))

    def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
        # HF's rotate-half q/k layout -> llama.cpp's interleaved RoPE layout (as convert_hf_to_gguf.py does)
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {
        "self_attn.o_proj": "attn_output", "self_attn.v_proj": "attn_v", "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    state = lm.state_dict()
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    writer.add_tensor("output.weight", lm.get_output_embeddings().weight.detach().numpy())
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        q, k = state[prefix + "self_attn.q_proj.weight"], state[prefix + "self_attn.k_proj.weight"]
        writer.add_tensor(f"blk.{i}.attn_q.weight", permute(q, heads).numpy())
        writer.add_tensor(f"blk.{i}.attn_k.weight", permute(k, kv_heads).numpy())
        for hf_name, name in names.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", state[prefix + hf_name + ".weight"].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def chatml_llava_handler(default_system: str) -> type:
    """llama-cpp-python's Llava15ChatHandler speaking ChatML the way vlm renders it (its own is Vicuna)."""
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    class ChatMLLlavaHandler(Llava15ChatHandler):
        DEFAULT_SYSTEM_MESSAGE = default_system
        CHAT_FORMAT = (
            "{% for message in messages %}"
            "{% if message.role == 'system' %}"
            "{% if loop.first %}{{ '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' }}{% endif %}"
            "{% else %}"
            "{{ '<|im_start|>' + message.role + '\\n' }}"
            "{% if message.content is string %}{{ message.content }}"
            "{% else %}"
            "{% for part in message.content if part.type == 'image_url' %}"  # images first, as LLaVA-1.5
            "{{ (part.image_url if part.image_url is string else part.image_url.url) + '\\n' }}"
            "{% endfor %}"
            "{% for part in message.content if part.type == 'text' %}{{ part.text }}{% endfor %}"
            "{% endif %}"
            "{{ '<|im_end|>\\n' }}"
            "{% endif %}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        )

    return ChatMLLlavaHandler


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@contextmanager
def _llama_cpp(adapter_dir: Path, tmp_path: Path, model: vlm.VisionLanguageModel, ftype: str = "f32") -> Iterator[Any]:
    """llama_cpp.Llama on the adapter's LM (converted here) with the exported mmproj."""
    llama_cpp = pytest.importorskip("llama_cpp")
    lm_gguf = write_lm_gguf(Path(model.config.lm), tmp_path / "lm.gguf", model.config.system_prompt)
    mmproj = export_gguf_mmproj(adapter_dir, tmp_path / f"mmproj-{ftype}.gguf", ftype=ftype)
    handler = chatml_llava_handler(model.config.system_prompt)(clip_model_path=str(mmproj), verbose=False)
    llm = llama_cpp.Llama(model_path=str(lm_gguf), chat_handler=handler, n_ctx=512, n_threads=2, verbose=False)
    try:
        yield llm
    finally:
        llm.close()


def _ask_llama_cpp(llm: Any, image: Path | None, text: str, max_tokens: int) -> str:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": _data_url(image)}})
    reply = llm.create_chat_completion(
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0.0,
        top_k=1,
        repeat_penalty=1.0,
        stop=["<|im_end|>", "<|endoftext|>"],
    )
    return reply["choices"][0]["message"]["content"]


def _llama_cpp_image_embeddings(llm: Any, image: Path, width: int) -> np.ndarray:
    """The image embeddings llama.cpp computes with the mmproj: (image tokens, LM width)."""
    import llama_cpp.mtmd_cpp as mtmd

    handler = llm.chat_handler
    handler._init_mtmd_context(llm)
    bitmap = handler._create_bitmap_from_bytes(image.read_bytes())
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        text = mtmd.mtmd_input_text()
        text.text = mtmd.mtmd_default_marker()
        text.text_len, text.add_special, text.parse_special = len(text.text), False, True
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert mtmd.mtmd_tokenize(handler.mtmd_ctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
        chunk = next(
            c
            for c in (mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks)))
            if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE
        )
        n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        assert mtmd.mtmd_encode_chunk(handler.mtmd_ctx, chunk) == 0
        embeddings = mtmd.mtmd_get_output_embd(handler.mtmd_ctx)
        return np.ctypeslib.as_array(embeddings, shape=(n_tokens * width,)).reshape(n_tokens, width).copy()
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)


@torch.no_grad()
def _our_image_embeddings(model: vlm.VisionLanguageModel, image: Path, cls_last: bool) -> np.ndarray:
    """Our image embeddings (N, H) as llama.cpp computes them: the projector's GELU tanh-approximated (ggml's),
    and with `cls_last` in the token layout of llama.cpp's LLaVA graph at the time of writing, which appends
    the class token after the patches but still numbers positions from the first token and reads rows 1..N
    (ggml-org/llama.cpp#25814; the open PR #25844 fixes it)."""
    pixels = model.pixel_values([image])
    embeddings = model.module.vision.model.embeddings
    positions = embeddings.position_embedding.weight  # (1 + N, D)

    def relayout(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        raw = output - positions  # (B, 1 + N, D): [cls, patches] before position embeddings
        return torch.cat([raw[:, 1:], raw[:, :1]], dim=1) + positions

    handle = embeddings.register_forward_hook(relayout) if cls_last else None
    model.module.projector[1].approximate = "tanh"
    try:
        return model.module.encode_images(pixels)[0].numpy()
    finally:
        model.module.projector[1].approximate = "none"
        if handle is not None:
            handle.remove()


def test_llama_cpp_runs_the_exported_gguf_files(tiny_adapter, tmp_path):
    model = vlm.load(tiny_adapter, device="cpu", dtype=torch.float32)
    with _llama_cpp(tiny_adapter, tmp_path, model) as llm:
        # The LM GGUF: same prompt tokens, same greedy continuation.
        messages = [{"role": "user", "content": "What colour is the shape?"}]
        prompt = render_text(normalize_messages(messages, model.config.system_prompt))
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        assert tokens == model.encode_messages(messages).input_ids
        theirs = []
        for token in llm.generate(tokens, top_k=1, temp=0.0, repeat_penalty=1.0):
            theirs.append(token)
            if token in model.stop_ids or len(theirs) == 8:
                break
        assert theirs == _greedy_ours(model, messages, 8)

        # The mmproj: llama.cpp's image embeddings are ours, in the correct token layout or in the one of
        # the llama.cpp CLS-ordering bug.
        image = _square_images(tmp_path, 32, 1)[0]
        llama = _llama_cpp_image_embeddings(llm, image, model.config.lm_hidden_size)
        assert llama.shape == (16, 64)
        scale = float(np.abs(llama).max())
        errors = {  # relative to the largest embedding value
            layout: float(np.abs(llama - _our_image_embeddings(model, image, cls_last)).max()) / scale
            for layout, cls_last in (("cls first", False), ("cls last (llama.cpp#25814)", True))
        }
        print(f"llama.cpp image embeddings vs ours, max relative error by token layout: {errors}")
        assert min(errors.values()) <= 1e-3 and max(errors.values()) > 0.1

        # The chat handler with the ChatML template runs end to end (the random LM's words mean nothing; what it
        # answers is checked on the trained toy adapter, test_toy_adapter_in_llama_cpp_names_the_right_attributes).
        assert isinstance(_ask_llama_cpp(llm, image, "Describe it.", 8), str)

    with _llama_cpp(tiny_adapter, tmp_path, model, ftype="f16") as llm:  # the default, half-size mmproj
        half = _llama_cpp_image_embeddings(llm, image, model.config.lm_hidden_size)
        assert float(np.abs(half - llama).max()) / scale <= 1e-2


# --------------------------------------------------------------------------------------------------
# The miniature world's trained adapter (the `toy_adapter` fixture trains it once per session)


def _toy_eval_records(world: Any, count: int) -> tuple[Path, list[dict[str, Any]]]:
    """The world directory and its first `count` held-out caption records."""
    from projector_training.data import load_records

    return world.root, load_records(world.eval_captions_json)[:count]


def _toy_prompt(record: dict[str, Any]) -> str:
    return record["conversations"][0]["value"].removeprefix("<image>\n")


@pytest.mark.slow
def test_toy_adapter_llava_hf_export_generates_our_greedy_tokens(toy_adapter, toy_world, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = vlm.load(toy_adapter, device="cpu", dtype=torch.float32)
    with pytest.warns(UserWarning):
        out = export_llava_hf(model, tmp_path / "llava")
    llava = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(out)
    root, records = _toy_eval_records(toy_world, 20)
    agree = 0
    for record in records:
        image = root / record["image"]
        messages = [{"role": "user", "content": [_image_part(image), {"type": "text", "text": _toy_prompt(record)}]}]
        agree += _greedy_llava(llava, processor, messages, [image], 16) == _greedy_ours(model, messages, 16)
    print(f"llava-hf export: greedy tokens equal to vlm's on {agree}/{len(records)} held-out images")
    assert agree == len(records) == 20


@pytest.mark.slow
def test_toy_adapter_in_llama_cpp_names_the_right_attributes(toy_adapter, toy_world, tmp_path):
    from projector_training.toy.world import parse_caption

    model = vlm.load(toy_adapter, device="cpu", dtype=torch.float32)
    root, records = _toy_eval_records(toy_world, 50)
    correct, ours, per_attribute = 0, 0, dict.fromkeys(("size", "colour", "shape"), 0)
    with _llama_cpp(toy_adapter, tmp_path, model) as llm:
        for record in records:
            image, prompt = root / record["image"], _toy_prompt(record)
            truth = parse_caption(record["conversations"][1]["value"])
            found = parse_caption(_ask_llama_cpp(llm, image, prompt, 16))
            correct += found == truth
            per_attribute = {k: n + (found[k] == truth[k]) for k, n in per_attribute.items()}
            ours += parse_caption(model.ask(image, prompt, max_new_tokens=16)) == truth
    print(
        f"llama.cpp GGUF: all attributes right on {correct}/{len(records)} held-out images "
        f"(per attribute {per_attribute}); vlm itself: {ours}/{len(records)}"
    )
    assert correct / len(records) >= 0.9


# --------------------------------------------------------------------------------------------------
# Nothing written over, nothing half-written


def test_exports_and_imports_never_write_over_existing_work(tiny_adapter, tiny_lm_path, tiny_clip_path, tmp_path):
    lm_gguf = tmp_path / "lm.Q5_K_M.gguf"
    lm_gguf.write_bytes(b"GGUF the language model")
    with pytest.raises(ConfigError, match="already exists"):
        export_gguf_mmproj(tiny_adapter, lm_gguf)  # a slip of the output name
    assert lm_gguf.read_bytes() == b"GGUF the language model"
    with pytest.raises(ConfigError, match="already exists"):
        export_gguf_mmproj(tiny_adapter, tmp_path)  # a directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.Q5_K_M.gguf"]

    _llava_projector_file(tmp_path / "mm_projector.bin", [32, 64, 64])
    trained = tmp_path / "trained"
    shutil.copytree(tiny_adapter, trained)
    before = {p.name: p.read_bytes() for p in trained.iterdir()}
    with pytest.raises(ConfigError, match="not an empty directory"):
        import_llava(tmp_path / "mm_projector.bin", vision_tower=str(tiny_clip_path), lm=str(tiny_lm_path), out=trained)
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == before


def test_import_llava_makes_a_movable_adapter_and_refuses_what_it_cannot_use(
    tiny_lm_path, tiny_open_clip_path, tiny_dir, tmp_path, monkeypatch
):
    _llava_projector_file(tmp_path / "mm_projector.bin", [32, 64, 64])
    monkeypatch.chdir(tiny_dir)  # backbones given by relative paths
    adapter = import_llava(
        tmp_path / "mm_projector.bin",
        vision_tower=f"local-dir:{tiny_open_clip_path.name}",
        vision_backend="open_clip",
        lm=tiny_lm_path.name,
        out=tmp_path / "imported",
    )
    monkeypatch.chdir(tmp_path)
    config = vlm.adapter.read_config(adapter)
    assert config.vision_tower == f"local-dir:{tiny_open_clip_path.resolve()}" and config.lm == str(tiny_lm_path)
    assert vlm.load(adapter, device="cpu").module.vision.hidden_size == 32  # loads from another working directory

    # a bare open_clip architecture name would be a randomly initialised tower
    with pytest.raises(ConfigError, match=r"bare architecture name.*--vision-pretrained"):
        import_llava(
            tmp_path / "mm_projector.bin", vision_tower="ViT-B-32", vision_backend="open_clip",
            lm=str(tiny_lm_path), out=tmp_path / "random-tower",
        )  # fmt: skip
    # a LLaVA (or other composite) checkpoint where the LM belongs
    llava = tmp_path / "llava-config"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {"model_type": "llama"}}))
    with pytest.raises(ConfigError, match="is a LlavaConfig, not a plain causal LM"):
        import_llava(
            tmp_path / "mm_projector.bin", vision_tower=f"local-dir:{tiny_open_clip_path}", vision_backend="open_clip",
            lm=str(llava), out=tmp_path / "composite",
        )  # fmt: skip
    assert not (tmp_path / "random-tower").exists() and not (tmp_path / "composite").exists()


def test_cli_exports_llava_hf_in_the_lm_checkpoints_dtype(tiny_lm_path, tiny_clip_path, tmp_path, capsys):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlm.cli import main

    lm = tmp_path / "lm-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_lm_path, dtype=torch.bfloat16).save_pretrained(lm)
    AutoTokenizer.from_pretrained(tiny_lm_path).save_pretrained(lm)
    adapter = make_adapter(tmp_path / "adapter", lm, tiny_clip_path)
    with pytest.warns(UserWarning, match="preprocessed identically"):
        assert main(["export", str(adapter), "--to", "llava-hf", str(tmp_path / "out")]) == 0
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    assert dtypes == {"BF16"}


def test_exports_and_adapters_are_readable_by_other_accounts_and_carry_no_load_settings(
    hf_export, tiny_model, tiny_adapter, tmp_path
):
    """safetensors writes owner-only files; what vlm hands on (a service may run as another user) gets the usual
    permissions of a new file, and the exported tokenizer config holds none of the settings of the load that
    made it (an export made offline would otherwise tell every later load to stay offline)."""
    import os
    import stat

    from vlm.adapter import _umask
    from vlm.export import LOAD_TIME_SETTINGS

    expected_file, expected_dir = 0o666 & ~_umask(), 0o777 & ~_umask()
    _, out = hf_export
    adapter = tiny_model.save_adapter(tmp_path / "adapter")
    gguf_path = export_gguf_mmproj(tiny_adapter, tmp_path / "mmproj.gguf")
    for root in (out, adapter):
        assert stat.S_IMODE(os.stat(root).st_mode) == expected_dir
        for path in root.rglob("*"):
            assert stat.S_IMODE(path.stat().st_mode) == (expected_dir if path.is_dir() else expected_file), path
    assert (out / "model.safetensors").is_file() or list(out.glob("model-*.safetensors"))
    assert stat.S_IMODE(gguf_path.stat().st_mode) == expected_file
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert not set(LOAD_TIME_SETTINGS) & set(tokenizer_config), tokenizer_config
