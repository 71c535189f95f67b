"""The synthetic image world: one coloured shape on a grey background, and the words that describe it.

Every image shows one object with three attributes (size, colour, shape). It is talked about in the ways
LLaVA-1.5's data and evaluations talk about images:

- a caption, "a {size} {colour} {shape}";
- open questions whose answer is one attribute word ("What colour is it?" -> "red");
- yes/no questions ("Is there a red shape in the image?"), the negatives drawn the way POPE draws them:
  `random` (any other value), `popular` (the value most frequent in the training images) or `adversarial`
  (the value that looks most like the truth: the nearest colour, the shape whose silhouette overlaps most);
- multiple-choice questions in LLaVA-1.5's evaluation layout, answered with the option's letter;
- conversations of up to three such questions about one image (the image in the first turn, as in
  llava_v1_5_mix665k).

`build_world` renders seeded PNGs and writes LLaVA conversation records: alignment data (`train.json`:
per image one caption record and one conversation of `TRAIN_QUESTIONS` questions of the kinds in `TRAIN_KINDS`)
and held-out sets on images never used for training (captions, open questions, POPE-style yes/no, multiple choice,
3-question conversations). Held-out records carry a `turns` list saying what each question asks, for per-kind,
per-attribute scores.

Images are drawn at 4x and downsampled (anti-aliased), with jitter in position (on a grid of 1/8 of
the side: 9 places for a large shape, 25 for a small one), object size, colour and background shade,
plus pixel noise, so that no two images are alike and nothing can be memorised.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from projector_training.data import load_records

__all__ = [
    "ATTRIBUTES",
    "CAPTION_INSTRUCTIONS",
    "CHOICE_SUFFIX",
    "COLOURS",
    "KINDS",
    "NEGATIVE_SAMPLING",
    "OBJECTS",
    "QUESTIONS",
    "SHAPES",
    "SIZES",
    "TRAIN_KINDS",
    "TRAIN_QUESTIONS",
    "YESNO_QUESTIONS",
    "ToyObject",
    "Turn",
    "WorldFiles",
    "build_world",
    "caption_turn",
    "choice_turn",
    "describe",
    "load_records",
    "negative_value",
    "open_turn",
    "parse_caption",
    "popularity",
    "question_turn",
    "render",
    "similarity",
    "yesno_turn",
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

YESNO_QUESTIONS: dict[str, tuple[str, ...]] = {
    "size": ("Is it {}?", "Is the object {}?"),
    "colour": ("Is there a {} shape in the image?", "Is the object {}?"),
    "shape": ("Is there a {} in the image?", "Is it a {}?"),
}
"""Attribute -> yes/no question templates ({} is the value asked about), in POPE's "Is there a ... in the
image?" form where the attribute allows it."""
YES, NO = "Yes", "No"
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
"""LLaVA-1.5's multiple-choice instruction (ScienceQA, MMBench, SEED)."""
LETTERS = "ABCD"
KINDS: tuple[str, ...] = ("caption", "open", "yesno", "choice")
"""What a question asks for: the caption, one attribute word, Yes/No, or an option's letter."""
NEGATIVE_SAMPLING: tuple[str, ...] = ("random", "popular", "adversarial")
"""How the value of a yes/no question whose answer is No is drawn, as POPE draws its absent objects."""
TRAIN_KINDS: dict[str, float] = {"open": 0.2, "yesno": 0.2, "choice": 0.6}
"""How often a question of a training conversation is of each kind (`question_turn`). Multiple choice is the kind
the toy LM reads least well from a projector's output: at the same steps it scored 0.91, 0.92 and 0.97 with 0.25,
0.4 and 0.6 of the questions (docs/miniature-world.md)."""
TRAIN_QUESTIONS: tuple[int, int] = (3, 3)
"""The fewest and most questions of a training conversation (drawn uniformly; each about another attribute). Three
gives the alignment 50% more questions than 1-3 for about 12% more compute a sample: on the world of seed 1,
multiple choice 0.958 instead of 0.896 and POPE adversarial 0.965 instead of 0.951 (docs/miniature-world.md)."""
_TRAIN_WEIGHT = {value: 2 for value in (*COLOURS[:2], *SHAPES[:2])}
"""Training images of these colours and shapes are more frequent (weights add up per object, 1 to 3), so
that "popular" negatives mean something, as POPE's frequent COCO objects do."""


@dataclass(frozen=True)
class Turn:
    """One question about an image and its answer."""

    question: str
    answer: str
    kind: str
    """One of `KINDS`."""
    attribute: str | None
    """The attribute asked about; None for a caption."""
    negative: str | None = None
    """For a yes/no question answered No: how its value was drawn (one of `NEGATIVE_SAMPLING`)."""

    def meta(self) -> dict[str, str | None]:
        """What a held-out record says of each turn (the question and answer are in its conversation)."""
        return {k: v for k, v in asdict(self).items() if k not in ("question", "answer")}


def _object_weight(obj: ToyObject) -> int:
    return 1 + sum(_TRAIN_WEIGHT.get(value, 1) - 1 for value in (obj.colour, obj.shape))


def popularity(attribute: str) -> tuple[str, ...]:
    """The attribute's values, most frequent in the training images first (ties in vocabulary order)."""
    counts = {value: 0 for value in ATTRIBUTES[attribute]}
    for obj in OBJECTS:
        counts[obj.answer(attribute)] += _object_weight(obj)
    return tuple(sorted(counts, key=lambda value: -counts[value]))


@functools.cache
def _silhouette(shape: str, side: int = 128) -> np.ndarray:
    mask = Image.new("L", (side, side), 0)
    draw, centre, r = ImageDraw.Draw(mask), side / 2, side * 0.4
    if shape == "circle":
        draw.ellipse((centre - r, centre - r, centre + r, centre + r), fill=1)
    else:
        draw.polygon(_polygon(shape, centre, centre, r), fill=1)
    return np.asarray(mask, dtype=bool)


def similarity(attribute: str, a: str, b: str) -> float:
    """How alike two values look: silhouette IoU for shapes, minus the RGB distance for colours."""
    if attribute == "shape":
        x, y = _silhouette(a), _silhouette(b)
        return float((x & y).sum() / (x | y).sum())
    if attribute == "colour":
        return -float(np.linalg.norm(np.subtract(_RGB[a], _RGB[b])))
    return 0.0  # two sizes: the other one is the only negative


def negative_value(attribute: str, truth: str, sampling: str, rng: random.Random) -> str:
    """A value of `attribute` other than `truth`, drawn as POPE draws absent objects."""
    others = [v for v in ATTRIBUTES[attribute] if v != truth]
    if sampling == "random":
        return rng.choice(others)
    if sampling == "popular":
        return next(v for v in popularity(attribute) if v != truth)
    if sampling == "adversarial":
        return max(others, key=lambda v: similarity(attribute, truth, v))
    raise ValueError(f"unknown negative sampling {sampling!r}; use one of {NEGATIVE_SAMPLING}")


def caption_turn(obj: ToyObject, rng: random.Random) -> Turn:
    return Turn(rng.choice(CAPTION_INSTRUCTIONS), obj.caption, "caption", None)


def open_turn(obj: ToyObject, attribute: str, rng: random.Random) -> Turn:
    return Turn(rng.choice(QUESTIONS[attribute]), obj.answer(attribute), "open", attribute)


def yesno_turn(obj: ToyObject, attribute: str, rng: random.Random, negative: str | None) -> Turn:
    """A yes/no question: answered Yes when `negative` is None, else No about a value drawn that way."""
    value = (
        obj.answer(attribute) if negative is None else negative_value(attribute, obj.answer(attribute), negative, rng)
    )
    question = rng.choice(YESNO_QUESTIONS[attribute]).format(value)
    return Turn(question, YES if negative is None else NO, "yesno", attribute, negative)


def choice_turn(obj: ToyObject, attribute: str, rng: random.Random, options: int | None = None) -> Turn:
    """A multiple-choice question with the truth among `options` values (2-4; at most all of them)."""
    values = ATTRIBUTES[attribute]
    count = min(len(values), options or rng.randint(2, len(LETTERS)))
    truth = obj.answer(attribute)
    choices = [truth, *rng.sample([v for v in values if v != truth], count - 1)]
    rng.shuffle(choices)
    lines = "\n".join(f"{letter}. {value}" for letter, value in zip(LETTERS, choices, strict=False))
    question = f"{rng.choice(QUESTIONS[attribute])}\n{lines}\n{CHOICE_SUFFIX}"
    return Turn(question, LETTERS[choices.index(truth)], "choice", attribute)


def question_turn(obj: ToyObject, attribute: str, rng: random.Random, kinds: dict[str, float] = TRAIN_KINDS) -> Turn:
    """A question about `attribute` of a kind drawn with the weights `kinds` ("open", "yesno", "choice"); a yes/no
    question is answered Yes half the time, else No about a value drawn by one of POPE's samplings."""
    kind = rng.choices(list(kinds), weights=list(kinds.values()))[0]
    if kind == "open":
        return open_turn(obj, attribute, rng)
    if kind == "yesno":
        negative = None if rng.random() < 0.5 else rng.choice(NEGATIVE_SAMPLING)
        return yesno_turn(obj, attribute, rng, negative)
    if kind == "choice":
        return choice_turn(obj, attribute, rng)
    raise ValueError(f"unknown question kind {kind!r}; use open, yesno or choice")


def parse_caption(text: str) -> dict[str, str | None]:
    """Attribute -> the first value of it named in `text` (None if none is), for per-attribute scores.

    Tolerant on purpose: it reads generated text, which may be wrong in any way.
    """
    words = text.lower().replace(".", " ").replace(",", " ").split()
    return {name: next((w for w in words if w in values), None) for name, values in ATTRIBUTES.items()}


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
    """One caption record per held-out image."""
    eval_vqa_json: Path
    """One open question per held-out image, the attributes in turn."""
    eval_yesno_json: Path
    """Per held-out image and negative sampling (the record's `category`: POPE's random / popular / adversarial
    splits), a question answered Yes and one answered No, about the attributes in turn."""
    eval_choice_json: Path
    """One multiple-choice question per held-out image (all options for size, 4 of 6 otherwise)."""
    eval_conversations_json: Path
    """One conversation of three open questions per held-out image, each attribute once, in a random order."""

    @classmethod
    def at(cls, root: Path) -> WorldFiles:
        root = Path(root)
        names = ("train", "eval_captions", "eval_vqa", "eval_yesno", "eval_choice", "eval_conversations")
        return cls(root, root / "images", *(root / f"{name}.json" for name in names))

    @property
    def eval_sets(self) -> dict[str, Path]:
        """Held-out set name -> its records."""
        return {
            "captions": self.eval_captions_json,
            "vqa": self.eval_vqa_json,
            "yesno": self.eval_yesno_json,
            "choice": self.eval_choice_json,
            "conversations": self.eval_conversations_json,
        }


def _record(
    record_id: str, image: str, turns: list[Turn], meta: bool = False, category: str | None = None
) -> dict[str, Any]:
    """A LLaVA conversation record (mix665k layout: the image in the first human turn); held-out records
    (`meta`) also say what each turn asks, and POPE's questions their split (`category`)."""
    conversations = []
    for k, turn in enumerate(turns):
        question = f"<image>\n{turn.question}" if k == 0 else turn.question
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": turn.answer}]
    record: dict[str, Any] = {"id": record_id, "image": image, "conversations": conversations}
    if meta:
        record["turns"] = [turn.meta() for turn in turns]
    if category:
        record["category"] = category
    return record


def _render_split(
    files: WorldFiles, split: str, seed: int, count: int, image_size: int, weighted: bool
) -> list[tuple[str, ToyObject, random.Random]]:
    """Render `count` images; returns (relative image path, object, the image's rng for its prompts).

    Objects cycle through `OBJECTS` (each `_object_weight` times when `weighted`), each cycle in a seeded
    order, so every caption is equally frequent in the held-out sets.
    """
    order_rng = random.Random(f"{seed}/{split}/order")
    cycle = [obj for obj in OBJECTS for _ in range(_object_weight(obj) if weighted else 1)]
    objects: list[ToyObject] = []
    while len(objects) < count:
        objects += order_rng.sample(cycle, len(cycle))
    out = []
    for i, obj in enumerate(objects[:count]):
        # A per-image string seed (hashed by `random`) keeps each image independent of `count`.
        rng = random.Random(f"{seed}/{split}/{i}")
        name = f"{split}-{i:05d}.png"
        render(obj, rng, image_size).save(files.images / name)
        out.append((f"{files.images.name}/{name}", obj, rng))
    return out


def _held_out(images: list[tuple[str, ToyObject, random.Random]]) -> dict[str, list[dict[str, Any]]]:
    """The held-out records of every set, the attributes in turn so that each is asked equally often."""
    names = list(ATTRIBUTES)
    sets: dict[str, list[dict[str, Any]]] = {"captions": [], "vqa": [], "yesno": [], "choice": [], "conversations": []}
    for i, (image, obj, rng) in enumerate(images):
        attribute = names[i % len(names)]
        sets["captions"].append(_record(f"eval-{i:05d}-caption", image, [caption_turn(obj, rng)], meta=True))
        sets["vqa"].append(_record(f"eval-{i:05d}-{attribute}", image, [open_turn(obj, attribute, rng)], meta=True))
        for sampling in NEGATIVE_SAMPLING:
            for answer, negative in ((YES.lower(), None), (NO.lower(), sampling)):
                turn = yesno_turn(obj, attribute, rng, negative)
                record = _record(f"eval-{i:05d}-{sampling}-{answer}", image, [turn], meta=True, category=sampling)
                sets["yesno"].append(record)
        options = len(ATTRIBUTES[attribute]) if attribute == "size" else 4
        turn = choice_turn(obj, attribute, rng, options)
        sets["choice"].append(_record(f"eval-{i:05d}-choice", image, [turn], meta=True))
        turns = [open_turn(obj, a, rng) for a in rng.sample(names, len(names))]
        sets["conversations"].append(_record(f"eval-{i:05d}-conversation", image, turns, meta=True))
    return sets


def build_world(root: Path, *, seed: int, n_train: int, n_eval: int, image_size: int = 64) -> WorldFiles:
    """Render the world into `root` (images in `root/images/`) and write its LLaVA records.

    Train and eval images come from different seed streams, so the held-out images are never seen in
    training (they share the caption set). Same arguments, same bytes.
    """
    files = WorldFiles.at(root)
    files.images.mkdir(parents=True, exist_ok=True)

    train: list[dict[str, Any]] = []
    for i, (image, obj, rng) in enumerate(_render_split(files, "train", seed, n_train, image_size, weighted=True)):
        train.append(_record(f"train-{i:05d}-caption", image, [caption_turn(obj, rng)]))
        # Each attribute at most once per conversation: a second question would only repeat the first.
        attributes = rng.sample(list(ATTRIBUTES), rng.randint(*TRAIN_QUESTIONS))
        train.append(_record(f"train-{i:05d}-chat", image, [question_turn(obj, a, rng) for a in attributes]))

    held_out = _held_out(_render_split(files, "eval", seed, n_eval, image_size, weighted=False))
    for name, path in files.eval_sets.items():
        path.write_text(json.dumps(held_out[name], indent=1) + "\n")
    files.train_json.write_text(json.dumps(train, indent=1) + "\n")
    return files
