"""The miniature world: tokenizer layout, deterministic rendering and records, backbone checkpoints, caching."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from projector_training.toy.tokenizer import SPECIAL_TOKENS, build_tokenizer
from projector_training.toy.world import (
    ATTRIBUTES,
    CAPTION_INSTRUCTIONS,
    OBJECTS,
    QUESTIONS,
    build_world,
    load_records,
    parse_caption,
    question_attribute,
)

CORPUS = ["You are a helpful assistant.", "<|im_start|>user\nWhat colour is it?<|im_end|>", "a small red circle"] * 10


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_special_tokens_follow_the_learned_vocabulary() -> None:
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    learned = len(tokenizer) - len(SPECIAL_TOKENS)
    assert learned <= 300
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [learned, learned + 1, learned + 2]
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id == end
    assert tokenizer.chat_template is None
    # No `<image>` token: the adapter's image id is the first spare row.
    assert len(tokenizer("<image>", add_special_tokens=False)["input_ids"]) > 1


def test_tokenizer_round_trips_any_text_and_adds_nothing(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    text = "héllo wörld 🌍 \t\n\x00 ∑ <image> <|im_start|>user\nhi<|im_end|>\n"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids[-2:] == [tokenizer.convert_tokens_to_ids("<|im_end|>"), *tokenizer("\n")["input_ids"]]
    assert ids[0] != tokenizer.bos_token_id
    typed = tokenizer("<|im_end|>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") not in typed

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == len(tokenizer)
    assert reloaded(text)["input_ids"] == ids
    assert reloaded.eos_token == "<|endoftext|>"


# ---------------------------------------------------------------- world


def test_world_vocabulary() -> None:
    captions = {obj.caption for obj in OBJECTS}
    assert len(captions) == len(OBJECTS) >= 48
    for obj in OBJECTS:
        assert parse_caption(obj.caption) == {"size": obj.size, "colour": obj.colour, "shape": obj.shape}
    assert parse_caption("A Large, BLUE star.") == {"size": "large", "colour": "blue", "shape": "star"}
    assert parse_caption("no idea") == {"size": None, "colour": None, "shape": None}
    for attribute, questions in QUESTIONS.items():
        for question in questions:
            assert question_attribute(f"<image>\n{question}") == attribute
            # No question contains an answer word, so it cannot be answered by copying from it.
            assert not any(v in question.lower().split() for values in ATTRIBUTES.values() for v in values)
    with pytest.raises(ValueError, match="not a toy-world question"):
        question_attribute(CAPTION_INSTRUCTIONS[0])


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory):
    return build_world(tmp_path_factory.mktemp("world"), seed=3, n_train=80, n_eval=72, image_size=32)


def test_world_records(small_world) -> None:
    train = load_records(small_world.train_json)
    captions = load_records(small_world.eval_captions_json)
    vqa = load_records(small_world.eval_vqa_json)
    assert len(train) == 2 * 80 and len(captions) == len(vqa) == 72
    by_image = {}
    for record in train + captions + vqa:
        human, gpt = record["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        image = Image.open(small_world.root / record["image"])
        assert image.size == (32, 32) and image.mode == "RGB"
        if record["id"].endswith("-caption"):
            assert human["value"].removeprefix("<image>\n") in CAPTION_INSTRUCTIONS
            by_image[record["image"]] = parse_caption(gpt["value"])
    for record in train + vqa:
        if not record["id"].endswith("-caption"):
            question, answer = (turn["value"] for turn in record["conversations"])
            assert by_image[record["image"]][question_attribute(question)] == answer
    # The held-out set covers every caption once per 72 images, on images unseen in training.
    assert {r["conversations"][1]["value"] for r in captions} == {obj.caption for obj in OBJECTS}
    train_images = {r["image"] for r in train}
    assert not train_images & {r["image"] for r in captions + vqa}
    train_pixels = {_sha(small_world.root / p) for p in train_images}
    assert not train_pixels & {_sha(small_world.root / r["image"]) for r in captions}


def test_world_is_deterministic(small_world, tmp_path: Path) -> None:
    again = build_world(tmp_path, seed=3, n_train=80, n_eval=72, image_size=32)
    for name in (
        "train.json",
        "eval_captions.json",
        "eval_vqa.json",
        "images/train-00007.png",
        "images/eval-00005.png",
    ):
        assert _sha(small_world.root / name) == _sha(again.root / name)
    other = build_world(tmp_path / "other", seed=4, n_train=2, n_eval=0, image_size=32)
    assert _sha(other.images / "train-00000.png") != _sha(small_world.images / "train-00000.png")


def test_every_attribute_is_visible() -> None:
    """Small shapes span several patches of 8 px at 64 px, and colours stay apart from the grey."""
    from projector_training.toy.world import render

    for obj in OBJECTS[:: len(OBJECTS) // 12]:
        pixels = np.asarray(render(obj, random.Random(0), 64), dtype=np.float32)  # (S, S, 3)
        chroma = pixels.max(axis=-1) - pixels.min(axis=-1)  # grey background ~ 0
        area = int((chroma > 60).sum())
        assert (area > 250) if obj.size == "small" else (area > 1000), (obj, area)


# ---------------------------------------------------------------- backbones


@pytest.fixture(scope="module")
def micro_world(tmp_path_factory: pytest.TempPathFactory):
    from projector_training.toy import ToyConfig, ensure_toy_world

    return ensure_toy_world(tmp_path_factory.mktemp("toy"), config=ToyConfig.micro(), log=lambda _: None)


def test_micro_clip_reloads_through_local_dir(micro_world) -> None:
    import open_clip
    from safetensors.torch import load_file

    from projector_training.toy import ToyConfig

    config = ToyConfig.micro()
    saved = json.loads((micro_world.clip_dir / "open_clip_config.json").read_text())
    reference = open_clip.CLIP(**saved["model_cfg"])
    reference.load_state_dict(load_file(micro_world.clip_dir / "open_clip_model.safetensors"))
    model = open_clip.create_model(micro_world.vision_tower, device="cpu")
    assert list(model.visual.image_mean) == saved["preprocess_cfg"]["mean"]
    assert list(model.visual.image_std) == saved["preprocess_cfg"]["std"]

    torch.manual_seed(0)
    pixels = torch.randn(2, 3, config.image_size, config.image_size)  # (B, 3, S, S)
    texts = open_clip.get_tokenizer(micro_world.vision_tower)(["a small red circle", "a large blue star"])
    with torch.no_grad():
        assert torch.equal(model.eval().encode_image(pixels), reference.eval().encode_image(pixels))
        assert torch.equal(model.encode_text(texts), reference.encode_text(texts))
        blocks = len(model.visual.transformer.resblocks)
        out = model.visual.forward_intermediates(
            pixels, indices=[blocks - 2], output_fmt="NLC", intermediates_only=True, output_extra_tokens=True
        )
    patches = out["image_intermediates"][0]  # (B, N, D), CLS in the prefix
    assert patches.shape == (2, micro_world.num_image_tokens, config.clip_width)
    assert out["image_intermediates_prefix"][0].shape == (2, 1, config.clip_width)
    assert 0.0 <= micro_world.clip_metrics["accuracy"] <= 1.0


def test_micro_lm_layout(micro_world) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(micro_world.lm_dir)
    model = AutoModelForCausalLM.from_pretrained(micro_world.lm_dir)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows > len(tokenizer)  # spare rows: the image token is id len(tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert model.config.bos_token_id == model.config.eos_token_id == model.config.pad_token_id == end
    assert model.config.rms_norm_eps == 1e-6 and not model.config.tie_word_embeddings
    ids = torch.tensor([tokenizer("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], rows)


def test_lm_examples_tokenize_like_the_rendered_text(micro_world) -> None:
    from transformers import AutoTokenizer

    from projector_training.toy.backbones import IGNORE_INDEX, _Encoder, _example, _lm_batch

    tokenizer = AutoTokenizer.from_pretrained(micro_world.lm_dir)
    encoder = _Encoder(tokenizer)
    rng = random.Random(0)
    examples = [_example(rng, micro_world.num_image_tokens) for _ in range(20)]
    for example in examples:
        assert encoder.context(example.context) == tokenizer(" ".join(example.context))["input_ids"]
        prompt = tokenizer.decode(encoder.prompt(example))
        assert prompt.endswith(f"\n{example.instruction}<|im_end|>\n<|im_start|>assistant\n")
        assert prompt.startswith(f"<|im_start|>system\n{example.system}<|im_end|>\n<|im_start|>user\n")
    batch = _lm_batch(encoder, examples, tokenizer.pad_token_id)
    for row, example in enumerate(examples):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert tokenizer.decode(labelled) == f"{example.answer}<|im_end|>"
    # Answers are uniform given the question, so only the context can tell them.
    assert len({e.answer for e in examples if e.task == "colour"}) > 1


def test_cache_reuses_and_rebuilds_what_is_stale(micro_world) -> None:
    from projector_training.toy import ToyConfig, ensure_toy_world

    root, config = micro_world.root, ToyConfig.micro()
    markers = {name: (root / name / "done.json").stat().st_mtime_ns for name in ("world", "clip", "lm")}
    clip_weights = _sha(micro_world.clip_dir / "open_clip_model.safetensors")
    assert set(micro_world.built) == {"world", "clip", "lm"}

    again = ensure_toy_world(root, config=config, log=lambda _: None)
    assert again.built == ()
    assert again.clip_metrics == micro_world.clip_metrics and again.lm_metrics == micro_world.lm_metrics
    assert {n: (root / n / "done.json").stat().st_mtime_ns for n in markers} == markers

    # An interrupted build leaves no marker: that piece is redone, identically (CPU training is seeded).
    (root / "clip" / "done.json").unlink()
    rebuilt = ensure_toy_world(root, config=config, log=lambda _: None)
    assert rebuilt.built == ("clip",)
    assert _sha(rebuilt.clip_dir / "open_clip_model.safetensors") == clip_weights

    # A changed setting rebuilds its piece (and, for the world, everything trained on it).
    changed = ToyConfig.micro()
    changed = type(changed)(**{**changed.__dict__, "lm_steps": changed.lm_steps + 1})
    assert ensure_toy_world(root, config=changed, log=lambda _: None).built == ("lm",)
    changed = type(changed)(**{**changed.__dict__, "n_train": changed.n_train + 72})
    assert ensure_toy_world(root, config=changed, log=lambda _: None).built == ("world", "clip")
