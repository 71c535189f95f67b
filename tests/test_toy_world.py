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
    CHOICE_SUFFIX,
    COLOURS,
    NEGATIVE_SAMPLING,
    OBJECTS,
    QUESTIONS,
    SHAPES,
    TRAIN_QUESTIONS,
    YESNO_QUESTIONS,
    ToyObject,
    build_world,
    choice_turn,
    load_records,
    negative_value,
    parse_caption,
    popularity,
    yesno_turn,
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
    values = {v for vs in ATTRIBUTES.values() for v in vs}
    for questions in QUESTIONS.values():
        # No open question contains an answer word, so it cannot be answered by copying from it.
        assert not any(v in question.lower().split() for question in questions for v in values)
    for attribute, templates in YESNO_QUESTIONS.items():
        assert all(template.count("{}") == 1 for template in templates), attribute


def test_negatives_are_drawn_as_pope_draws_them() -> None:
    rng = random.Random(0)
    # Popular: the training images favour the first two colours and shapes.
    assert popularity("colour")[:2] == COLOURS[:2] and popularity("shape")[:2] == SHAPES[:2]
    assert negative_value("colour", "blue", "popular", rng) == COLOURS[0]
    assert negative_value("colour", COLOURS[0], "popular", rng) == COLOURS[1]
    # Adversarial: the most alike value (the cross's silhouette overlaps the circle's most; orange is nearest
    # yellow), the one the adapter confuses most.
    assert negative_value("shape", "cross", "adversarial", rng) == "circle"
    assert negative_value("shape", "circle", "adversarial", rng) == "square"
    assert negative_value("colour", "yellow", "adversarial", rng) == "orange"
    assert negative_value("size", "small", "adversarial", rng) == "large"
    drawn = {negative_value("shape", "star", "random", rng) for _ in range(200)}
    assert drawn == set(SHAPES) - {"star"}
    with pytest.raises(ValueError, match="unknown negative sampling"):
        negative_value("shape", "star", "frequent", rng)


def test_yes_no_and_choice_turns_answer_right() -> None:
    rng = random.Random(1)
    obj = ToyObject("small", "red", "star")
    yes = yesno_turn(obj, "shape", rng, None)
    assert (yes.answer, yes.kind, yes.negative) == ("Yes", "yesno", None) and "star" in yes.question
    for sampling in NEGATIVE_SAMPLING:
        no = yesno_turn(obj, "colour", rng, sampling)
        assert no.answer == "No" and no.negative == sampling and "red" not in no.question
    for _ in range(50):
        turn = choice_turn(obj, "shape", rng)
        question, *options, suffix = turn.question.split("\n")
        assert question in QUESTIONS["shape"] and suffix == CHOICE_SUFFIX and 2 <= len(options) <= 4
        assert options[[o[0] for o in options].index(turn.answer)] == f"{turn.answer}. star"
        assert sorted(o[:3] for o in options) == [f"{letter}. " for letter in "ABCD"[: len(options)]]
    assert {choice_turn(obj, "shape", rng).answer for _ in range(100)} == set("ABCD")


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory):
    return build_world(tmp_path_factory.mktemp("world"), seed=3, n_train=80, n_eval=72, image_size=32)


def _truth(record: dict) -> ToyObject:
    """The object of a record's image, read back from the world's own files (its caption record)."""
    return _CAPTIONS[record["image"]]


_CAPTIONS: dict[str, ToyObject] = {}


def _answer(obj: ToyObject, turn: dict, question: str) -> str:
    """What a question about `obj` should be answered, worked out from its text alone."""
    if turn["kind"] == "caption":
        return obj.caption
    if turn["kind"] == "open":
        return obj.answer(turn["attribute"])
    if turn["kind"] == "yesno":
        asked = [v for v in ATTRIBUTES[turn["attribute"]] if v in question.rstrip("?").split()]
        return "Yes" if asked == [obj.answer(turn["attribute"])] else "No"
    options = dict(line.split(". ") for line in question.split("\n")[1:-1])
    return next(letter for letter, value in options.items() if value == obj.answer(turn["attribute"]))


def test_world_records(small_world) -> None:
    by_caption = {obj.caption: obj for obj in OBJECTS}
    train = load_records(small_world.train_json)
    sets = {name: load_records(path) for name, path in small_world.eval_sets.items()}
    assert len(train) == 2 * 80
    for record in train + sets["captions"]:
        if record["id"].endswith("-caption"):
            _CAPTIONS[record["image"]] = by_caption[record["conversations"][1]["value"]]
    chats = [r for r in train if r["id"].endswith("-chat")]
    fewest, most = TRAIN_QUESTIONS
    assert len(chats) == 80 and {len(r["conversations"]) for r in chats} == set(range(2 * fewest, 2 * most + 1, 2))
    # The alignment conversations ask every kind of question the held-out sets ask (TRAIN_KINDS).
    questions = [t["value"].removeprefix("<image>\n") for r in chats for t in r["conversations"][::2]]
    assert any(CHOICE_SUFFIX in q for q in questions) and any(q.startswith("Is ") for q in questions)
    assert any(q.split("\n")[0] in sum(QUESTIONS.values(), ()) and "\n" not in q for q in questions)
    for record in train + [r for records in sets.values() for r in records]:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n") and sum(t["value"].count("<image>") for t in turns) == 1
        image = Image.open(small_world.root / record["image"])
        assert image.size == (32, 32) and image.mode == "RGB"
    for records in sets.values():
        for record in records:
            turns = record["conversations"]
            for k, meta in enumerate(record["turns"]):
                question = turns[2 * k]["value"].removeprefix("<image>\n")
                assert turns[2 * k + 1]["value"] == _answer(_truth(record), meta, question), record["id"]
    assert all(
        r["conversations"][0]["value"].removeprefix("<image>\n") in CAPTION_INSTRUCTIONS for r in sets["captions"]
    )
    # The held-out sets cover every caption once per 72 images, on images unseen in training.
    assert {r["conversations"][1]["value"] for r in sets["captions"]} == {obj.caption for obj in OBJECTS}
    assert len(sets["yesno"]) == 6 * 72 and len(sets["choice"]) == len(sets["conversations"]) == 72
    for sampling in NEGATIVE_SAMPLING:
        split = [r for r in sets["yesno"] if r["category"] == sampling]
        assert sorted(r["conversations"][1]["value"] for r in split) == ["No"] * 72 + ["Yes"] * 72
    for record in sets["conversations"]:
        assert sorted(t["attribute"] for t in record["turns"]) == sorted(ATTRIBUTES)
    train_images = {r["image"] for r in train}
    assert not train_images & {r["image"] for records in sets.values() for r in records}
    train_pixels = {_sha(small_world.root / p) for p in train_images}
    assert not train_pixels & {_sha(small_world.root / r["image"]) for r in sets["captions"]}


def test_world_is_deterministic(small_world, tmp_path: Path) -> None:
    again = build_world(tmp_path, seed=3, n_train=80, n_eval=72, image_size=32)
    for name in (
        "train.json",
        *(path.name for path in small_world.eval_sets.values()),
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

    from projector_training.toy import ToyConfig
    from projector_training.toy.backbones import IGNORE_INDEX, _Encoder, _example, _lm_batch, _render

    tokenizer = AutoTokenizer.from_pretrained(micro_world.lm_dir)
    encoder = _Encoder(tokenizer)
    rng = random.Random(0)
    config = ToyConfig.micro()
    examples = [_example(rng, micro_world.num_image_tokens, config) for _ in range(60)]
    for example in examples:
        assert encoder.context(example.context) == tokenizer(" ".join(example.context))["input_ids"]
        whole = encoder.prompt(example) + encoder.answer(example)
        assert tokenizer.decode(whole) == _render(example).removesuffix("\n")
        prompt = tokenizer.decode(encoder.prompt(example))
        assert prompt.endswith(f"{example.turns[-1].question}<|im_end|>\n<|im_start|>assistant\n")
        assert prompt.startswith(f"<|im_start|>system\n{example.system}<|im_end|>\n<|im_start|>user\n")
    batch = _lm_batch(encoder, examples, tokenizer.pad_token_id)
    for row, example in enumerate(examples):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert tokenizer.decode(labelled) == "".join(f"{turn.answer}<|im_end|>" for turn in example.turns)
    assert {len(e.turns) for e in examples} == set(config.lm_turns)
    assert {t.kind for e in examples for t in e.turns} == {"caption", "open", "yesno", "choice"}
    assert {t.negative for e in examples for t in e.turns if t.kind == "yesno"} == {None, *NEGATIVE_SAMPLING}
    # Answers are uniform given the question, so only the context can tell them.
    for kind in ("open", "yesno", "choice"):
        assert len({t.answer for e in examples for t in e.turns if t.kind == kind}) > 1, kind


@pytest.mark.parametrize(
    ("piece", "setting", "weights"),
    [("clip", "clip_steps", "open_clip_model.compact.safetensors"), ("lm", "lm_steps", "model.safetensors"),
     ("draft_lm", "draft_steps", "model.safetensors")],
)  # fmt: skip
def test_the_bundled_backbones_are_the_ones_toy_config_describes(
    tmp_path: Path, piece: str, setting: str, weights: str
) -> None:
    """Each shipped backbone was trained by the shipped command with `ToyConfig`'s settings; with any other setting
    the world refuses it and says how to get one with those settings, before copying anything."""
    import dataclasses

    from projector_training.toy import ToyConfig
    from projector_training.toy.backbones import BUNDLED, PRETRAINING, _copy_bundled, piece_settings

    made = json.loads((BUNDLED / piece / PRETRAINING).read_text())
    assert made["settings"] == piece_settings(ToyConfig(), piece) and made["seed"] == 0
    assert made["command"].startswith("python -m projector_training.toy.pretrain") and made["commit"]
    assert (BUNDLED / piece / weights).is_file()
    changed = dataclasses.replace(ToyConfig(), **{setting: 1})
    with pytest.raises(
        ValueError, match=rf"other settings than these \({setting}\).*pretrain --pieces {piece}.*'train'"
    ):
        _copy_bundled(changed, piece, tmp_path / piece)
    assert not (tmp_path / piece).exists()


def test_the_draft_is_refused_when_the_lm_it_was_distilled_from_changes(tmp_path: Path) -> None:
    import dataclasses

    from projector_training.toy import ToyConfig
    from projector_training.toy.backbones import _copy_bundled

    with pytest.raises(ValueError, match=r"bundled toy draft_lm .*\(lm\)"):
        _copy_bundled(dataclasses.replace(ToyConfig(), lm_heads=4), "draft_lm", tmp_path / "draft")
    with pytest.raises(ValueError, match="backbones must be 'bundled' or 'train'"):
        ToyConfig(backbones="download")


def test_cache_reuses_and_rebuilds_what_is_stale(micro_world) -> None:
    from projector_training.toy import ToyConfig, ensure_toy_world

    root, config = micro_world.root, ToyConfig.micro()
    markers = {name: (root / name / "done.json").stat().st_mtime_ns for name in ("world", "clip", "lm", "draft_lm")}
    clip_weights = _sha(micro_world.clip_dir / "open_clip_model.safetensors")
    assert set(micro_world.built) == {"world", "clip", "lm", "draft_lm"}

    again = ensure_toy_world(root, config=config, log=lambda _: None)
    assert again.built == ()
    assert again.clip_metrics == micro_world.clip_metrics and again.lm_metrics == micro_world.lm_metrics
    assert {n: (root / n / "done.json").stat().st_mtime_ns for n in markers} == markers

    # An interrupted build leaves no marker: that piece is redone, identically (CPU training is seeded).
    (root / "clip" / "done.json").unlink()
    rebuilt = ensure_toy_world(root, config=config, log=lambda _: None)
    assert rebuilt.built == ("clip",)
    assert _sha(rebuilt.clip_dir / "open_clip_model.safetensors") == clip_weights

    # A changed setting rebuilds its piece and the pieces learned from it (the draft from the LM, the CLIP from the
    # world).
    changed = ToyConfig.micro()
    changed = type(changed)(**{**changed.__dict__, "lm_steps": changed.lm_steps + 1})
    assert ensure_toy_world(root, config=changed, log=lambda _: None).built == ("lm", "draft_lm")
    changed = type(changed)(**{**changed.__dict__, "n_train": changed.n_train + 72})
    assert ensure_toy_world(root, config=changed, log=lambda _: None).built == ("world", "clip")


# ---------------------------------------------------------------- scoring


def test_pope_reads_yes_and_no_as_pope_does() -> None:
    from projector_training.toy.evaluate import pope_answer

    assert pope_answer("Yes") == pope_answer("Yes, there is.") == pope_answer("yes") == "yes"
    assert pope_answer("No") == pope_answer("no") == pope_answer("There is not a star.") == "no"
    # POPE's rule reads the first sentence only and anything without a negation as yes.
    assert pope_answer("Yes. No.") == "yes" and pope_answer("a red star") == "yes"
    assert pope_answer("No, it is not") == "no" and pope_answer("Nope") == "yes"


def test_pope_scores_by_hand() -> None:
    from projector_training.toy.evaluate import pope_scores

    # gold:      yes  yes  yes  no   no   no   no   yes
    # predicted: yes  no   yes  yes  no   no   no   yes  -> tp 3, fn 1, fp 1, tn 3
    predicted = ["Yes", "No", "Yes", "Yes", "No", "no", "No", "yes"]
    gold = ["Yes", "Yes", "Yes", "No", "No", "No", "No", "Yes"]
    scores = pope_scores(predicted, gold)
    assert scores == {"accuracy": 0.75, "precision": 0.75, "recall": 0.75, "f1": 0.75, "yes_ratio": 0.5}
    scores = pope_scores(["yes"] * 4, ["Yes", "No", "No", "No"])
    assert scores["precision"] == 0.25 and scores["recall"] == 1.0 and scores["f1"] == 0.4
    assert scores["yes_ratio"] == 1.0 and scores["accuracy"] == 0.25


class _Oracle:
    """Answers every question right from the world's own files (or always `fixed`), recording what it was asked."""

    def __init__(self, fixed: str | None = None) -> None:
        self.fixed, self.asked = fixed, []

    def chat_batch(self, conversations, batch_size, **generation):
        answers = []
        for messages in conversations:
            self.asked.append(messages)
            image = next(p["image"] for p in messages[0]["content"] if p["type"] == "image")
            obj = _CAPTIONS[f"images/{Path(image).name}"]
            question = messages[-1]["content"][-1]["text"]
            kind = "caption" if question in CAPTION_INSTRUCTIONS else None
            for turn_kind, probe in (("choice", CHOICE_SUFFIX), ("yesno", "Is ")):
                kind = kind or (turn_kind if probe in question else None)
            attribute = next((a for a, qs in QUESTIONS.items() if question.split("\n")[0] in qs), None)
            attribute = attribute or next((a for a, vs in ATTRIBUTES.items() if any(v in question for v in vs)), None)
            answers.append(self.fixed or _answer(obj, {"kind": kind or "open", "attribute": attribute}, question))
        return answers


def test_evaluate_scores_each_set_turn_and_split(small_world) -> None:
    from projector_training.toy.evaluate import evaluate, headline

    test_world_records(small_world)  # fills _CAPTIONS
    oracle = _Oracle()
    report = evaluate(oracle, small_world.root)
    assert set(headline(report).values()) == {1.0}
    assert report["n"] == {"captions": 72, "vqa": 72, "yesno": 432, "choice": 72, "conversations": 216}
    # A later turn is asked after the earlier questions with their right answers, the image in the first.
    third = [m for m in oracle.asked if len(m) == 5]
    assert len(third) == 72 and all(m[1]["role"] == "assistant" and m[1]["content"][0]["text"] for m in third)
    assert report["pope"]["adversarial"]["f1"] == 1.0 and report["pope"]["random"]["yes_ratio"] == 0.5

    always_yes = evaluate(_Oracle("Yes"), small_world.root)
    for split in always_yes["pope"].values():
        assert split == {"accuracy": 0.5, "precision": 0.5, "recall": 1.0, "f1": 0.6667, "yes_ratio": 1.0}
    assert always_yes["caption_exact_match"] == 0.0 and always_yes["choice_accuracy"] == 0.0


def test_seeds_get_their_own_world_and_the_spread_is_min_mean_max(monkeypatch, tmp_path: Path) -> None:
    from projector_training.recipes import RECIPES, toy_world_dir
    from projector_training.toy.spread import summarise

    monkeypatch.setenv("VLM_TOY_CACHE", str(tmp_path))
    assert toy_world_dir(RECIPES["toy"]) == tmp_path / "default"
    assert toy_world_dir(RECIPES["toy"].replace(seed=2)) == tmp_path / "default-seed2"
    assert toy_world_dir(RECIPES["toy"].replace(seed=2, toy_world="micro")) == tmp_path / "micro-seed2"
    runs = {
        "seed0": {"caption_exact_match": 0.9, "vqa_accuracy": 1.0, "seed": 0, "before": {}},
        "seed1": {"caption_exact_match": 0.96, "vqa_accuracy": 0.98, "seed": 1, "before": {}},
    }
    assert summarise(runs) == {
        "caption_exact_match": {"min": 0.9, "mean": 0.93, "max": 0.96},
        "vqa_accuracy": {"min": 0.98, "mean": 0.99, "max": 1.0},
    }
