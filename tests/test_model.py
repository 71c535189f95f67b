"""The composed model: loading, splicing, generation options, streaming, batching and errors."""

from __future__ import annotations

import json
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

import vlm
from vlm.adapter import load_llava_projector
from vlm.config import PRESETS, AdapterConfig
from vlm.errors import ConfigError, InsufficientMemoryError, PromptError, VLMError
from vlm.modeling.loading import check_memory
from vlm.modeling.projector import build_projector
from vlm.modeling.towers import OpenCLIPTower
from vlm.processing.image_processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess_image

from .conftest import make_adapter


def padded_conversations(images):
    """Three conversations of different lengths, turns and image counts: batched, two rows are left-padded."""
    return [
        [{"role": "user", "content": [{"type": "image", "image": images[0]}, "What is it?"]}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": images[1]},
                    {"type": "image", "image": images[2]},
                    "Describe both pictures in a few words, please, and say which one is larger.",
                ],
            }
        ],
        [
            {"role": "user", "content": [{"type": "image", "image": images[2]}, "Hi"]},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "And the colour?"},
        ],
    ]


def test_load_defaults_and_round_trip(tiny_model, tiny_adapter, tmp_path):
    assert tiny_model.device.type == "cpu" and tiny_model.dtype == torch.float32
    assert tiny_model.num_image_tokens == 16
    assert tiny_model.config.image_token_id == len(tiny_model.tokenizer)
    saved = tiny_model.save_adapter(tmp_path / "copy")
    again = vlm.load(saved, device="cpu")
    for a, b in zip(tiny_model.module.projector.parameters(), again.module.projector.parameters(), strict=True):
        assert torch.equal(a, b)
    assert json.loads((saved / "adapter_config.json").read_text())["format_version"] == 1


def test_only_the_projector_is_trainable(tiny_model):
    trainable = {n.split(".")[0] for n, p in tiny_model.module.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}
    tiny_model.module.train()
    assert not tiny_model.module.vision.training and not tiny_model.module.lm.training
    tiny_model.module.eval()


def test_image_slot_count_mismatch_is_a_clear_error(tiny_model, rgb_images):
    chat = tiny_model.encode_messages([{"role": "user", "content": [{"type": "image", "image": rgb_images[0]}]}])
    ids = torch.tensor([chat.input_ids])
    two = tiny_model.pixel_values(rgb_images[:2])
    with pytest.raises(PromptError, match="16 image-token slots but 2 image"):
        tiny_model.module(ids, pixel_values=two)


def test_stream_equals_plain_and_batch_equals_single(text_model, rgb_images):
    question = "What is it?"
    plain = text_model.ask(rgb_images[0], question, max_new_tokens=12)
    streamed = list(
        text_model.chat(
            [{"role": "user", "content": [{"type": "image", "image": rgb_images[0]}, question]}],
            stream=True,
            max_new_tokens=12,
        )
    )
    assert isinstance(plain, str) and plain
    assert len(streamed) > 1 and "".join(streamed) == plain
    singles = [text_model.caption(p, max_new_tokens=8) for p in rgb_images]
    assert text_model.caption_batch(rgb_images, batch_size=2, max_new_tokens=8) == singles
    conversations = padded_conversations(rgb_images)
    singles = [text_model.chat(c, max_new_tokens=8) for c in conversations]
    assert text_model.chat_batch(conversations, batch_size=3, max_new_tokens=8) == singles


def test_the_repetition_penalty_sees_each_row_as_it_would_alone(tiny_model, rgb_images, monkeypatch):
    """Left padding is <|endoftext|>, a stop id: counted as text, it would be penalised in padded rows only and
    move where they stop. The penalty must see, per row, the ids that row has when run alone."""
    from transformers import RepetitionPenaltyLogitsProcessor

    seen = []
    penalise = RepetitionPenaltyLogitsProcessor.__call__

    def record(self, input_ids, scores):
        seen.append([set(row.tolist()) for row in input_ids])
        return penalise(self, input_ids, scores)

    monkeypatch.setattr(RepetitionPenaltyLogitsProcessor, "__call__", record)
    questions = ["Hi", "What is it? " * 4]  # different lengths: the first row is padded
    tiny_model.ask_batch(rgb_images[:2], questions, batch_size=2, repetition_penalty=1.3, max_new_tokens=1)
    batched = seen.pop()
    for row, (image, question) in enumerate(zip(rgb_images[:2], questions, strict=True)):
        tiny_model.ask(image, question, repetition_penalty=1.3, max_new_tokens=1)
        assert batched[row] == seen.pop()[0]


def test_an_unfinished_stream_is_an_error_in_its_thread_and_a_wait_in_others(tiny_model, rgb_images, monkeypatch):
    """A stream the caller stopped reading (but still holds) keeps the model; the same thread would wait for itself
    forever, so it gets an error saying what to do (once the stream made no progress for a while), while another
    thread waits for the stream to be closed."""
    import threading

    monkeypatch.setattr("vlm.api.SAME_THREAD_WAIT_S", 0.5)

    messages = [{"role": "user", "content": [{"type": "image", "image": rgb_images[0]}, "What is it?"]}]
    expected = tiny_model.chat(messages, max_new_tokens=6)
    stream = tiny_model.chat(messages, stream=True, max_new_tokens=6)
    next(stream)
    with pytest.raises(VLMError, match="Read that stream to the end or call its close"):
        tiny_model.chat(messages, max_new_tokens=6)
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(tiny_model.chat(messages, max_new_tokens=6)))
    waiting.start()
    waiting.join(timeout=1.0)
    assert waiting.is_alive() and not answers  # its turn has not come
    stream.close()
    waiting.join(timeout=60)
    assert answers == [expected]
    assert tiny_model.chat(messages, max_new_tokens=6) == expected  # and this thread may generate again


def test_stop_strings_cut_the_output(text_model, rgb_images):
    full = text_model.caption(rgb_images[1], max_new_tokens=16)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert len(stop) == 2
    cut = text_model.caption(rgb_images[1], max_new_tokens=16, stop=[stop])
    assert cut == full[: full.index(stop)]


def test_blocked_words_never_appear(text_model, rgb_images):
    """A word the model would write at every step (its spaced token made the most likely one) is banned at sampling
    time: the model writes something else there, so neither the word nor the text filter's marker shows."""
    import re

    from vlm.generation import FILTERED

    model, tokenizer = text_model, text_model.tokenizer
    word = next(w for w in ("circle", "image", "colour", "red") if len(tokenizer.encode(f" {w}")) == 1)
    spaced = tokenizer.encode(f" {word}")[0]

    def favour(module, inputs, logits):  # (B, T, V): the spaced word 100 logits ahead of anything else
        return logits.index_add(-1, torch.tensor([spaced]), torch.full((*logits.shape[:-1], 1), 100.0))

    hook = model.module.lm.get_output_embeddings().register_forward_hook(favour)
    try:
        full = model.caption(rgb_images[2], max_new_tokens=12)
        filtered = model.caption(rgb_images[2], max_new_tokens=12, blocked_words=[word])
    finally:
        hook.remove()
    assert full.split().count(word) >= 10, full  # the word wins every step but perhaps the first
    assert filtered.strip() and FILTERED not in filtered, filtered
    assert not re.search(rf"(?<![A-Za-z0-9]){word}(?![A-Za-z0-9])", filtered, re.IGNORECASE), filtered


def test_sampling_is_seeded(tiny_model, rgb_images):
    kwargs = {"max_new_tokens": 10, "temperature": 1.5, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.1}
    a = tiny_model.caption(rgb_images[0], seed=7, **kwargs)
    b = tiny_model.caption(rgb_images[0], seed=7, **kwargs)
    others = {tiny_model.caption(rgb_images[0], seed=s, **kwargs) for s in range(8, 12)}
    assert a == b
    assert len(others | {a}) > 1


@pytest.mark.parametrize("row", ["image", "spare"])
def test_generation_never_emits_image_or_spare_rows(text_model, rgb_images, row):
    """The image row and every spare row past the tokenizer (CausalLM: 151646-152063) are never generated, even as
    the most likely token: the fixtures zero the spare rows, so each case makes its row win on purpose."""
    chat = text_model.encode_messages([{"role": "user", "content": [{"type": "image", "image": rgb_images[0]}]}])
    batch = text_model.generation_batch([chat], 20)
    head = text_model.module.lm.get_output_embeddings().weight
    rows = head.shape[0]
    target = text_model.config.image_token_id if row == "image" else rows - 1
    assert target >= len(text_model.tokenizer) and (row == "image" or target != text_model.config.image_token_id)
    with torch.no_grad():  # make the row the most likely token: it must still be suppressed
        saved = head[target].clone()
        head[target] = head.abs().max() * 100
    try:
        options = vlm.GenerationOptions(max_new_tokens=20)
        ids = torch.cat(list(text_model.generate_tokens(**batch, options=options)))
        sampled = torch.cat(list(text_model.generate_tokens(**batch, options=vlm.GenerationOptions(
            max_new_tokens=20, temperature=1.0, seed=0))))  # fmt: skip
    finally:
        with torch.no_grad():
            head[target] = saved
    assert int(ids.max()) < len(text_model.tokenizer) and int(sampled.max()) < len(text_model.tokenizer)


def test_the_limit_is_never_past_the_lms_positions(tiny_model, rgb_images):
    """The adapter says 4096 but this LM knows 512 positions: a longer conversation is refused, not answered
    with whatever the LM makes of positions it never saw."""
    assert vlm.AdapterConfig(lm="x", vision_tower="y").max_length == 4096
    assert tiny_model.module.lm.config.max_position_embeddings == 512
    assert tiny_model.config.max_length == 512
    with pytest.raises(PromptError, match="over the limit of 512"):
        tiny_model.ask(rgb_images[0], "hello " * 200, max_new_tokens=64)


def test_over_long_input_is_refused_before_compute(tiny_adapter, rgb_images):
    model = vlm.load(tiny_adapter, device="cpu")
    model.processor.max_length = 40
    with pytest.raises(PromptError, match="over the limit of 40"):
        model.ask(rgb_images[0], "hello " * 30)


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": -1}, {"top_p": 0}, {"max_new_tokens": 0}, {"top_k": -2}, {"colour": "red"},
        {"max_new_tokens": 2.5}, {"temperature": "0.7"}, {"stop": 5}, {"blocked_words": [None]}, {"seed": "1"},
        {"temperature": float("inf")}, {"temperature": float("nan")}, {"repetition_penalty": float("nan")},
        {"seed": 2**64}, {"seed": -(2**63) - 1},
    ],
)  # fmt: skip
def test_bad_generation_options(tiny_model, rgb_images, options):
    with pytest.raises(VLMError, match=next(iter(options))):  # a VLMError that names the option
        tiny_model.caption(rgb_images[0], **options)


def test_batch_calls_want_lists(tiny_model, rgb_images):
    with pytest.raises(VLMError, match=r"images must be a list .* use caption\(\) or ask\(\)"):
        tiny_model.caption_batch(str(rgb_images[0]))  # not a list of its characters


def test_whole_numbers_are_fine_where_floats_are_meant(tiny_model, rgb_images):
    """transformers' processors refuse an int temperature or penalty; the options turn them into floats."""
    assert tiny_model.caption(rgb_images[0], temperature=1, seed=0, repetition_penalty=2, max_new_tokens=3) == (
        tiny_model.caption(rgb_images[0], temperature=1.0, seed=0, repetition_penalty=2.0, max_new_tokens=3)
    )


def test_open_clip_tower_selects_the_right_block(tiny_dir, tiny_lm_path, tiny_open_clip_path, rgb_images):
    adapter = make_adapter(tiny_dir / "oc_adapter", tiny_lm_path, tiny_open_clip_path, backend="open_clip")
    model = vlm.load(adapter, device="cpu")
    assert isinstance(model.module.vision, OpenCLIPTower)
    assert model.module.vision.mean == (0.5, 0.5, 0.5) and model.num_image_tokens == 16
    pixels = model.pixel_values(rgb_images)
    visual = model.module.vision.visual
    with torch.no_grad():
        x = visual.ln_pre(visual.patch_dropout(visual._embeds(pixels)))
        for block in visual.transformer.resblocks[:-1]:  # select_layer -2: output of the second-to-last block
            x = block(x)
        diff = (model.module.vision(pixels) - x[:, 1:]).abs().max().item()
        assert diff < 1e-3, diff
    assert isinstance(model.caption(rgb_images[0], max_new_tokens=4), str)


def test_cls_patch_keeps_the_cls_token(tiny_dir, tiny_lm_path, tiny_clip_path, rgb_images):
    """`cls_patch` keeps the CLS state of the selected layer as the first of 17 rows; `patch` drops it. Checked against
    transformers' CLIP hidden states."""
    from transformers import CLIPVisionModel

    adapter = make_adapter(tiny_dir / "cls_adapter", tiny_lm_path, tiny_clip_path, select_feature="cls_patch")
    model = vlm.load(adapter, device="cpu")
    assert model.num_image_tokens == 17
    pixels = model.pixel_values(rgb_images[:2])
    clip = CLIPVisionModel.from_pretrained(tiny_clip_path).eval()
    with torch.no_grad():
        hidden = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # (B, 1 + 16, D)
        assert torch.allclose(model.module.vision(pixels), hidden, atol=1e-5)
        patches = vlm.load(make_adapter(tiny_dir / "patch_adapter", tiny_lm_path, tiny_clip_path), device="cpu")
        assert torch.allclose(patches.module.vision(pixels), hidden[:, 1:], atol=1e-5)
    assert isinstance(model.caption(rgb_images[0], max_new_tokens=3), str)


def test_preprocess_modes():
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.5, 0.5)
    wide = Image.new("RGB", (40, 20), (255, 255, 255))
    padded = preprocess_image(wide, 20, mean, std, "pad")
    assert padded.shape == (3, 20, 20)
    # top and bottom rows are the mean colour, which normalises to 0; the middle is white
    assert padded[:, 0, :].abs().max() < 0.02 and padded[:, -1, :].abs().max() < 0.02
    assert torch.allclose(padded[:, 10, 10], (1 - torch.tensor(mean)) / torch.tensor(std), atol=1e-3)
    assert preprocess_image(wide, 20, mean, std, "resize")[:, 0, :].min() > 0.9
    assert preprocess_image(wide, 16, mean, std, "crop").shape == (3, 16, 16)
    with pytest.raises(ConfigError):
        preprocess_image(wide, 16, mean, std, "stretch")


@pytest.mark.parametrize(
    "width, height, size",
    [(47, 30, 32), (30, 47, 32), (33, 100, 32), (100, 33, 32), (64, 35, 32), (214, 107, 224), (227, 224, 224)],
)
def test_crop_mode_equals_clips_own_transform_with_transformers_crop_offsets(width, height, size):
    """`crop` is CLIP's torchvision transform with sizes truncated (100 x 32 / 33 -> 96, not 97; but 224 x 214 / 107
    is 448 however the float division rounds) and the crop offsets truncated as transformers (and so the llava-hf
    export, LLaVA and vLLM) cut them: 227 - 224 -> 1, where torchvision's CenterCrop rounds to 2."""
    from torchvision import transforms
    from torchvision.transforms import functional

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def crop(image):
        return functional.crop(image, (image.height - size) // 2, (image.width - size) // 2, size, size)

    clip = transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.Lambda(crop),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    assert torch.equal(preprocess_image(image, size, mean, std, "crop"), clip(image))


@pytest.mark.parametrize("aspect", ["pad", "crop", "resize"])
def test_extreme_aspect_ratios_take_little_memory(aspect):
    """A 60000 x 1 PNG is 256 bytes and passes the pixel limit; padding it to a square would take 10 GB, and
    resizing its short side to the tower's size 6.7 billion pixels. Both are shrunk first."""
    import resource

    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    line = Image.new("RGB", (60000, 1), (200, 30, 30))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for image in (line, line.transpose(Image.Transpose.ROTATE_90)):
        pixels = preprocess_image(image, 336, mean, std, aspect)
        assert pixels.shape == (3, 336, 336) and torch.isfinite(pixels).all()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1_000_000  # KiB: under 1 GB more


def test_loading_errors_are_clear(tmp_path, tiny_lm_path, tiny_clip_path):
    with pytest.raises(ConfigError, match="neither an adapter directory"):
        vlm.load(tmp_path / "missing")
    with pytest.raises(ConfigError, match="could not load the LM"):
        vlm.load("causallm-7b", device="cpu")  # offline: the hub id cannot be fetched
    make_adapter(tmp_path / "a", tiny_lm_path, tiny_clip_path)
    (tmp_path / "a" / "projector.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"no projector\.safetensors"):
        vlm.load(tmp_path / "a")
    with pytest.raises(ConfigError, match="spare row"):
        make_adapter(tmp_path / "b", tiny_lm_path, tiny_clip_path, image_token_id=10_000)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vision_backend", "timm"),
        ("select_feature", "cls"),
        ("image_aspect", "fit"),
        ("projector_type", "mlp0x_gelu"),
        ("system_prompt", "  "),
        ("format_version", 99),
        ("template", "llama2"),
        ("select_layer", "-2"),  # hand-edited files: text where a number belongs, null where text does
        ("system_prompt", None),
        ("image_token_id", "515"),
        ("max_length", True),
        ("extra", None),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(ConfigError):
        AdapterConfig(lm="x", vision_tower="y", **{field: value})
    with pytest.raises(ConfigError, match="unknown fields"):
        AdapterConfig.from_dict({"lm": "x", "vision_tower": "y", "colour": 1})


def test_memory_check_recommends_the_7b():
    fourteen = types.SimpleNamespace(
        hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, intermediate_size=13696, vocab_size=152064
    )
    with pytest.raises(InsufficientMemoryError, match="causallm-7b") as err:
        check_memory("CausalLM/14B", fourteen, torch.bfloat16, free_bytes=24 << 30)
    assert "28." in str(err.value) or "29." in str(err.value) or "30." in str(err.value)  # ~14.2B params in bf16
    check_memory("CausalLM/14B", fourteen, torch.bfloat16, free_bytes=80 << 30)
    assert PRESETS["causallm-14b"].lm_hidden_size == 5120 and PRESETS["causallm-7b"].lm_hidden_size == 4096


@pytest.mark.parametrize("kind", ["mlp2x_gelu", "linear"])
def test_llava_projector_files_load(tmp_path, kind):
    projector = build_projector(kind, 8, 12)
    if kind == "linear":  # LLaVA saves its linear projector as a bare nn.Linear
        state = {f"model.mm_projector.{k.split('.', 1)[1]}": v for k, v in projector.state_dict().items()}
    else:
        state = {f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}
    torch.save(state, tmp_path / "mm_projector.bin")
    loaded = load_llava_projector(tmp_path / "mm_projector.bin")
    other = build_projector(kind, 8, 12)
    other.load_state_dict(loaded)
    x = torch.randn(2, 3, 8)
    assert torch.equal(other(x), projector(x))
    torch.save({"model.vision_tower.w": torch.zeros(1)}, tmp_path / "bad.bin")
    with pytest.raises(ConfigError, match="unexpected key"):
        load_llava_projector(tmp_path / "bad.bin")


def test_static_cache_decoding_gives_the_same_tokens_as_the_plain_path(tiny_adapter, rgb_images):
    model = vlm.load(tiny_adapter, device="cpu")
    model.decode_mode = "dynamic"
    conversations = padded_conversations(rgb_images)
    plain = model.chat_batch(conversations, batch_size=3, max_new_tokens=24)  # left-padded batch
    sampled = model.caption(rgb_images[0], max_new_tokens=24, temperature=1.0, seed=3)
    model.decode_mode = "static"
    assert model.chat_batch(conversations, batch_size=3, max_new_tokens=24) == plain
    assert model.caption(rgb_images[0], max_new_tokens=24, temperature=1.0, seed=3) == sampled
    assert model.engines.static is not None and model.engines.static.max_len % 256 == 0
    decoder = model.engines.static
    assert model.caption(rgb_images[0], max_new_tokens=24, temperature=1.0, seed=3) == sampled
    assert model.engines.static is decoder  # reused while the weights stay where they are
    embeddings = model.module.lm.get_input_embeddings().weight
    embeddings.data = embeddings.data.clone()  # new storage, as moving or recasting the model gives every weight
    assert model.caption(rgb_images[0], max_new_tokens=24, temperature=1.0, seed=3) == sampled
    assert model.engines.static is not decoder  # its graph would read the old storage: rebuilt


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_overlapped_steps_give_the_same_tokens_with_at_most_one_step_to_spare(tiny_adapter, rgb_images, mode):
    """Queuing each step before its input token is handed out (as on a GPU) changes no token; when every row
    has stopped, only the one step already queued is wasted, and none when max_new_tokens ends the answer."""
    model = vlm.load(tiny_adapter, device="cpu")
    model.decode_mode = mode
    chats = [model.encode_messages(c) for c in padded_conversations(rgb_images)]
    batch = model.generation_batch(chats, max_new_tokens=12)
    assert not bool(batch["attention_mask"].all())  # left-padded rows
    passes = []
    model.module.lm.get_decoder().norm.register_forward_hook(lambda *_: passes.append(1))  # the prompt, then each step

    def run(overlap):
        model.overlap_steps = overlap
        passes.clear()
        options = vlm.GenerationOptions(max_new_tokens=12)
        tokens = torch.stack(list(model.generate_tokens(**batch, options=options)), 1)
        assert tokens.device.type == "cpu"
        return tokens, len(passes)

    model.decode_mode = "dynamic"  # transformers' own decoding, the reference
    reference, _ = run(False)
    model.decode_mode = mode
    full, passes_plain = run(False)
    assert full.shape == (3, 12) and passes_plain == 12 and torch.equal(full, reference)
    overlapped, passes_overlapped = run(True)
    assert torch.equal(overlapped, full) and passes_overlapped == 12
    early = {int(full[row, 3 + row]) for row in range(3)}
    model.processor.stop_ids = sorted({*model.stop_ids, *early})  # all stop early
    stopped, passes_plain = run(False)
    assert stopped.shape[1] < 12 and passes_plain == stopped.shape[1]
    overlapped, passes_overlapped = run(True)
    assert torch.equal(overlapped, stopped) and passes_overlapped == passes_plain + 1
    for row in stopped.tolist():  # a row that has stopped is padded from then on
        end = next(k for k, token in enumerate(row) if token in model.stop_ids)
        assert all(token == model.pad_id for token in row[end + 1 :])


def test_static_prefill_matches_transformers_logits_and_cache_on_a_left_padded_batch(tiny_model, rgb_images):
    from transformers import DynamicCache

    from vlm.generation.plain import cache_kwarg
    from vlm.generation.static import StaticEngine

    questions = ["What is it?", "What colour is the shape in this picture, and how big is it?"]
    chats = [tiny_model.encode_messages([{"role": "user", "content": [{"type": "image", "image": im}, q]}])
             for im, q in zip(rgb_images, questions, strict=False)]  # fmt: skip
    batch = tiny_model.generation_batch(chats, max_new_tokens=4)
    mask = batch["attention_mask"]
    assert not bool(mask.all())  # real left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        embeds = tiny_model.module.embed(batch["input_ids"], batch["pixel_values"])
        static = StaticEngine(tiny_model.module.lm, 2, 256, use_cuda_graph=False)
        ours = static.prefill(embeds, mask, positions)
        cache = DynamicCache(config=tiny_model.module.lm.config)
        theirs = tiny_model.module.lm(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
            **{cache_kwarg(type(tiny_model.module.lm)): cache},
        ).logits[:, -1]  # fmt: skip
    assert torch.allclose(ours, theirs, atol=1e-5)
    real = mask.bool()[:, None, :, None]  # (B, 1, T, 1): pad slots hold values nobody reads
    length = mask.shape[1]
    for i, layer in enumerate(cache.layers):
        assert torch.allclose(static.keys[i, :, :, :length] * real, layer.keys * real, atol=1e-5)
        assert torch.allclose(static.values[i, :, :, :length] * real, layer.values * real, atol=1e-5)
    assert torch.equal(static.valid[:, :length], mask.bool()) and not static.valid[:, length:].any()


def test_a_decode_step_that_cannot_be_captured_falls_back_with_the_same_tokens(tiny_adapter, rgb_images, monkeypatch):
    from vlm.generation.static import StaticEngine

    model = vlm.load(tiny_adapter, device="cpu")
    model.decode_mode = "static"
    plain = model.caption(rgb_images[0], max_new_tokens=12)

    def uncapturable(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    original_init = StaticEngine.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.use_cuda_graph = True  # as on a GPU

    monkeypatch.setattr(StaticEngine, "__init__", init)
    monkeypatch.setattr(StaticEngine, "_capture", uncapturable)
    model.engines.static = None
    with pytest.warns(UserWarning, match="decoding without a CUDA graph"):
        assert model.caption(rgb_images[0], max_new_tokens=12) == plain
    assert model.engines.static.use_cuda_graph is False


def test_compiled_decode_layers_give_the_same_tokens_and_compile_once(tiny_adapter, rgb_images):
    from torch._dynamo.utils import counters

    model = vlm.load(tiny_adapter, device="cpu")
    model.decode_mode = "dynamic"  # transformers' own decoding, the reference
    conversations = padded_conversations(rgb_images)
    plain = model.chat_batch(conversations, batch_size=3, max_new_tokens=12)  # left-padded
    torch._dynamo.reset()
    counters.clear()
    model.decode_mode = "compiled"  # a new mode: a new decoder
    assert model.chat_batch(conversations, batch_size=3, max_new_tokens=12) == plain
    # one graph for the stretch between two attentions in decode steps and one for prompts (dynamic length),
    # shared by every layer boundary, every step and every prompt length
    assert counters["stats"]["unique_graphs"] == 2
    longer = "Describe the picture in a few words, please."
    model.caption_batch(rgb_images, prompt=longer, batch_size=3, max_new_tokens=12)
    assert counters["stats"]["unique_graphs"] == 2


def test_graphed_tower_bookkeeping_replays_on_fresh_inputs_and_keeps_recent_shapes(tiny_model, rgb_images):
    """The CUDA capture itself needs a GPU (bench_gpu runs it); here a stand-in graph recomputes the
    function on the static buffers at replay, which is what a captured graph does."""
    from vlm.modeling.cuda_graphs import GraphedForward

    class ReplayGraph:
        def __init__(self, fn, static_in, static_out):
            self.fn, self.static_in, self.static_out = fn, static_in, static_out

        def replay(self):
            self.static_out.copy_(self.fn(self.static_in))

    captured = []

    class OnCPU(GraphedForward):
        def _capture(self, x):
            captured.append(tuple(x.shape))
            static_in = x.clone()
            static_out = self.fn(static_in)
            return static_in, ReplayGraph(self.fn, static_in, static_out), static_out

    pixels = tiny_model.pixel_values(rgb_images)  # (3, 3, S, S)
    singles = [tiny_model.module.encode_images(pixels[i : i + 1]) for i in range(3)]
    pair, plain = tiny_model.module.encode_images(pixels[:2]), tiny_model.module.encode_images(pixels)
    tiny_model.module._graphed_vision = OnCPU(tiny_model.module.vision, max_shapes=2)
    try:
        for i in range(3):  # one image at a time: one capture, then replays on new pixels
            assert torch.equal(tiny_model.module.encode_images(pixels[i : i + 1], graphed=True), singles[i])
        assert torch.equal(tiny_model.module.encode_images(pixels[:2], graphed=True), pair)
        assert torch.equal(
            tiny_model.module.encode_images(pixels, graphed=True), plain
        )  # a third shape evicts the first
        assert tiny_model.module.encode_images(pixels[1:2], graphed=True).shape[0] == 1
        assert captured == [(1, 3, 32, 32), (2, 3, 32, 32), (3, 3, 32, 32), (1, 3, 32, 32)]
        weight = next(tiny_model.module.vision.parameters())
        weight.data = weight.data.clone()  # new storage, as moving the tower gives it: the graphs read the old
        assert torch.equal(tiny_model.module.encode_images(pixels[1:2], graphed=True), singles[1])
        assert len(captured) == 5  # captured again

        class Uncapturable(GraphedForward):
            def _capture(self, x):
                raise RuntimeError("operation not permitted when stream is capturing")

        tiny_model.module._graphed_vision = Uncapturable(tiny_model.module.vision)
        with pytest.warns(UserWarning, match="without a CUDA graph"):
            assert torch.equal(tiny_model.module.encode_images(pixels, graphed=True), plain)
        assert torch.equal(tiny_model.module.encode_images(pixels, graphed=True), plain)  # eager from now on
    finally:
        tiny_model.module._graphed_vision = None


@pytest.mark.parametrize(
    ("name", "pretrained", "quick_gelu"),
    [("ViT-L-14-336", "openai", True), ("ViT-B-32", "laion2b_s34b_b79k", False), ("ViT-L-14-336", __file__, False)],
)
def test_open_clip_openai_weights_get_quickgelu(monkeypatch, name, pretrained, quick_gelu):
    """open_clip builds `ViT-L-14-336` with GELU and only warns when OpenAI's QuickGELU weights are loaded into it."""
    import open_clip

    seen = {}

    def create_model(model_name, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here: no weights offline")

    monkeypatch.setattr(open_clip, "create_model", create_model)
    with pytest.raises(ConfigError, match="could not load open_clip model"):
        OpenCLIPTower(name, pretrained=pretrained)
    assert seen["force_quick_gelu"] is quick_gelu


def test_a_stream_driven_from_a_thread_pool_makes_a_new_one_wait_not_fail(tiny_model, rgb_images):
    """Gradio and Starlette advance a stream with whichever pooled thread is free, so a new stream may start on the
    thread that just advanced another: that is a wait (the other stream moves on), not the same-thread error."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    messages = [{"role": "user", "content": [{"type": "image", "image": rgb_images[0]}, "What is it?"]}]
    expected = tiny_model.chat(messages, max_new_tokens=6)
    first = tiny_model.chat(messages, stream=True, max_new_tokens=6)
    next(first)  # this thread took the model
    with ThreadPoolExecutor(1) as other:
        done = threading.Event()

        def drive():  # another thread reads the first stream to its end, slowly, starting after this one waits
            time.sleep(0.3)
            for _ in first:
                time.sleep(0.3)
            done.set()

        other.submit(drive)
        assert tiny_model.chat(messages, max_new_tokens=6) == expected  # waits for `first`, then answers
        assert done.is_set()


def test_sampling_options_at_temperature_zero_warn_that_they_do_nothing(tiny_model, rgb_images):
    with pytest.warns(UserWarning, match="top_p and top_k do nothing at temperature 0"):
        tiny_model.caption(rgb_images[0], max_new_tokens=2, top_p=0.5)
