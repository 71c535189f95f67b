"""The synthetic image world: one coloured shape on a grey background, and the words that describe it.

Every image shows one object with three attributes (size, colour, shape); its caption is
"a {size} {colour} {shape}" and each attribute has a one-word answer to a fixed set of questions.
`build_world` renders seeded PNGs and writes LLaVA conversation records: alignment data
(`train.json`, one caption record and one question record per image) and two held-out sets
(`eval_captions.json`, `eval_vqa.json`) on images never used for training.

Images are drawn at 4x and downsampled (anti-aliased), with jitter in position (on a grid of 1/8 of
the side: 9 places for a large shape, 25 for a small one), object size, colour and background shade,
plus pixel noise, so that no two images are alike and nothing can be memorised.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from projector_training.data import load_records

__all__ = [
    "ATTRIBUTES",
    "CAPTION_INSTRUCTIONS",
    "COLOURS",
    "OBJECTS",
    "QUESTIONS",
    "SHAPES",
    "SIZES",
    "ToyObject",
    "WorldFiles",
    "build_world",
    "describe",
    "load_records",
    "parse_caption",
    "question_attribute",
    "render",
]

SIZES: tuple[str, ...] = ("small", "large")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
ATTRIBUTES: dict[str, tuple[str, ...]] = {"size": SIZES, "colour": COLOURS, "shape": SHAPES}
"""Attribute name -> its values, in caption order."""

_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 190),
    "orange": (250, 135, 20),
}
_RADIUS = {"small": (0.14, 0.17), "large": (0.30, 0.34)}
"""Object radius as a fraction of the image side (uniform range): small shapes stay several patches wide."""
_BACKGROUND = (70, 190)
"""Range of the grey level of the background."""
_SUPERSAMPLE = 4
_GRID = 8
"""Object centres lie on a grid of `_GRID` cells per side."""

CAPTION_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the image briefly.",
    "What is in the picture?",
    "Give a short caption for this image.",
    "What do you see?",
)
QUESTIONS: dict[str, tuple[str, ...]] = {
    "size": ("What size is it?", "How big is it?", "What is the size of the object?"),
    "colour": ("What colour is it?", "What color is the object?", "Which colour does it have?"),
    "shape": ("What shape is it?", "What shape is shown?", "Which shape is in the picture?"),
}
"""Attribute -> the question phrasings whose one-word answer is that attribute's value. Each names its
attribute by one word (size/big, colour/color, shape) and no other, and none holds an answer word, so a
tiny LM can tell them apart."""


@dataclass(frozen=True)
class ToyObject:
    """The content of one image."""

    size: str
    colour: str
    shape: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    def answer(self, attribute: str) -> str:
        """The one-word answer to a question about `attribute` ("size", "colour" or "shape")."""
        return getattr(self, attribute)


OBJECTS: tuple[ToyObject, ...] = tuple(
    ToyObject(size, colour, shape) for size, colour, shape in itertools.product(SIZES, COLOURS, SHAPES)
)
"""Every distinct object, hence every distinct caption (2 x 6 x 6 = 72)."""

_QUESTION_ATTRIBUTE = {q: attribute for attribute, qs in QUESTIONS.items() for q in qs}


def parse_caption(text: str) -> dict[str, str | None]:
    """Attribute -> the first value of it named in `text` (None if none is), for per-attribute scores.

    Tolerant on purpose: it reads generated text, which may be wrong in any way.
    """
    words = text.lower().replace(".", " ").replace(",", " ").split()
    return {name: next((w for w in words if w in values), None) for name, values in ATTRIBUTES.items()}


def question_attribute(question: str) -> str:
    """The attribute a question from `QUESTIONS` asks about (an `<image>` line before it is ignored)."""
    text = question.replace("<image>", "").strip()
    if text not in _QUESTION_ATTRIBUTE:
        raise ValueError(f"not a toy-world question: {question!r}")
    return _QUESTION_ATTRIBUTE[text]


def describe(obj: ToyObject, rng: random.Random) -> str:
    """A textual description of `obj` in one of several wordings and orders (text stand-in for an image)."""
    size, colour, shape = obj.size, obj.colour, obj.shape
    style = rng.randrange(6)
    if style == 0:
        return obj.caption
    if style == 1:
        fields = [f"colour: {colour}", f"shape: {shape}", f"size: {size}"]
        rng.shuffle(fields)
        return ", ".join(fields)
    if style == 2:
        return f"the {shape} is {colour} and {size}"
    if style == 3:
        return f"there is a {size} {colour} {shape} on a grey background"
    # Bags of (possibly repeated) attribute words: what per-patch image features most resemble.
    words = [w for w in (size, colour, shape) for _ in range(rng.randint(1, 3))]
    rng.shuffle(words)
    return " ".join(words)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of circumradius about `r` centred on (cx, cy)."""
    if shape == "square":
        h = 0.82 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "triangle":
        # Equilateral, pointing up, centred on its bounding box.
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)]
    if shape == "star":
        points = []
        for k in range(10):
            angle = -np.pi / 2 + k * np.pi / 5
            radius = r if k % 2 == 0 else 0.42 * r
            points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
        return points
    if shape == "cross":
        a, w = r, 0.33 * r
        return [
            (cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w),
            (cx + a, cy + w), (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a),
            (cx - w, cy + w), (cx - a, cy + w), (cx - a, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def render(obj: ToyObject, rng: random.Random, image_size: int) -> Image.Image:
    """Draw `obj` at a random position on a random grey background with pixel noise; RGB, square."""
    big = image_size * _SUPERSAMPLE
    grey = rng.randint(*_BACKGROUND)
    canvas = Image.new("RGB", (big, big), (grey, grey, grey))
    draw = ImageDraw.Draw(canvas)
    r = rng.uniform(*_RADIUS[obj.size]) * big
    # Centres snap to a grid of 1/8 of the side (the patch grid of a patch-8 tower at 64 px), so a shape
    # looks the same to the tower wherever it lands: a from-scratch ViT then learns shape quickly.
    cell = big / _GRID
    centres = [k * cell for k in range(1, _GRID) if r + 0.02 * big <= k * cell <= big - r - 0.02 * big]
    cx, cy = rng.choice(centres), rng.choice(centres)
    colour = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in _RGB[obj.colour])
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon(_polygon(obj.shape, cx, cy, r), fill=colour)
    small = np.asarray(canvas.resize((image_size, image_size), Image.Resampling.BOX), dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 4.0, small.shape)  # (S, S, 3)
    return Image.fromarray(np.clip(small + noise, 0, 255).round().astype(np.uint8), "RGB")


@dataclass(frozen=True)
class WorldFiles:
    """Where `build_world` put things; record image paths are relative to `root`."""

    root: Path
    images: Path
    train_json: Path
    eval_captions_json: Path
    eval_vqa_json: Path

    @classmethod
    def at(cls, root: Path) -> WorldFiles:
        root = Path(root)
        return cls(root, root / "images", root / "train.json", root / "eval_captions.json", root / "eval_vqa.json")


def _record(record_id: str, image: str, instruction: str, answer: str) -> dict[str, Any]:
    return {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{instruction}"},
            {"from": "gpt", "value": answer},
        ],
    }


def _render_split(
    files: WorldFiles, split: str, seed: int, count: int, image_size: int
) -> list[tuple[str, ToyObject, random.Random]]:
    """Render `count` images; returns (relative image path, object, the image's rng for its prompts).

    Objects cycle through `OBJECTS`, each cycle in a seeded order, so every caption is equally frequent.
    """
    order_rng = random.Random(f"{seed}/{split}/order")
    objects: list[ToyObject] = []
    while len(objects) < count:
        objects += order_rng.sample(OBJECTS, len(OBJECTS))
    out = []
    for i, obj in enumerate(objects[:count]):
        # A per-image string seed (hashed by `random`) keeps each image independent of `count`.
        rng = random.Random(f"{seed}/{split}/{i}")
        name = f"{split}-{i:05d}.png"
        render(obj, rng, image_size).save(files.images / name)
        out.append((f"{files.images.name}/{name}", obj, rng))
    return out


def build_world(root: Path, *, seed: int, n_train: int, n_eval: int, image_size: int = 64) -> WorldFiles:
    """Render the world into `root` (images in `root/images/`) and write its LLaVA records.

    Train and eval images come from different seed streams, so the held-out images are never seen in
    training (they share the caption set). Same arguments, same bytes.
    """
    files = WorldFiles.at(root)
    files.images.mkdir(parents=True, exist_ok=True)

    train: list[dict[str, Any]] = []
    for i, (image, obj, rng) in enumerate(_render_split(files, "train", seed, n_train, image_size)):
        train.append(_record(f"train-{i:05d}-caption", image, rng.choice(CAPTION_INSTRUCTIONS), obj.caption))
        attribute = rng.choice(list(ATTRIBUTES))
        question = rng.choice(QUESTIONS[attribute])
        train.append(_record(f"train-{i:05d}-{attribute}", image, question, obj.answer(attribute)))

    captions: list[dict[str, Any]] = []
    vqa: list[dict[str, Any]] = []
    for i, (image, obj, rng) in enumerate(_render_split(files, "eval", seed, n_eval, image_size)):
        captions.append(_record(f"eval-{i:05d}-caption", image, rng.choice(CAPTION_INSTRUCTIONS), obj.caption))
        attribute = list(ATTRIBUTES)[i % len(ATTRIBUTES)]
        vqa.append(_record(f"eval-{i:05d}-{attribute}", image, rng.choice(QUESTIONS[attribute]), obj.answer(attribute)))

    for path, records in ((files.train_json, train), (files.eval_captions_json, captions), (files.eval_vqa_json, vqa)):
        path.write_text(json.dumps(records, indent=1) + "\n")
    return files
