"""Train and cache the miniature world's frozen backbones: a tiny open_clip ViT, a tiny Llama LM and its draft.

`ensure_toy_world(root)` builds, under `root`:

    world/     images + LLaVA records (`world.build_world`)
    clip/      open_clip local-dir checkpoint, trained contrastively on the world's training captions
    lm/        `LlamaForCausalLM` + tokenizer, trained on ChatML text whose answers must be read from context
    draft_lm/  a half-depth `LlamaForCausalLM` distilled from lm/, same tokenizer and rows: the speculative draft
By default (`ToyConfig.backbones="bundled"`) clip/, lm/ and draft_lm/ are copies of the ones trained once with these
settings and shipped in `bundled/` (see `projector_training.toy.pretrain`), measured again on this world: they stand
for the pretrained CLIP and CausalLM weights, which are downloaded, not trained, by the real recipes.

Each piece ends with a `done.json` (its metrics and a hash of the settings it depends on) written
last, so an interrupted build is redone and a changed setting rebuilds that piece and those after it.

The LM is what makes alignment possible. It is trained on conversations laid out exactly as the
adapter will prompt it, except that the image slots hold text about the object (a description, a
description amid filler words, or a bag of repeated attribute words), so that the answer (a caption,
one attribute word, Yes or No, or an option's letter) is only knowable from what stands in the slots:

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n{text in place of the image slots}\\n{instruction}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

An LM that reads its context this way gives the projector a job it can do: write the image's attributes
into the slots. (One trained on answers alone ignores context, and no projector can steer it.) As in
the adapter's training, the loss covers the answers only; with the loss on every token a tiny LM
spends its steps on the template and learns the question -> attribute lookup many times slower.

The draft LM stands to the LM as CausalLM's 7B to its 14B: a cheaper model for speculative decoding, whose
proposals the LM accepts as often as their greedy next tokens agree. It starts as the LM with every other layer
dropped (DistilBERT's start) and is distilled on the LM's kind of conversations: KL to the LM's next-token
distribution at the answer tokens, where a draft proposes, plus some cross-entropy on the right answers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from projector_training.toy.tokenizer import build_tokenizer
from projector_training.toy.world import (
    ATTRIBUTES,
    OBJECTS,
    ToyObject,
    Turn,
    WorldFiles,
    build_world,
    caption_turn,
    describe,
    load_records,
    question_turn,
)
from vlm.config import DEFAULT_SYSTEM_PROMPT
from vlm.processing.chat import IGNORE_INDEX, encode_text

__all__ = ["BUNDLED", "PIECES", "PRETRAINING", "ToyConfig", "ToyWorld", "ensure_toy_world", "piece_settings"]

Log = Callable[[str], None]

BUILD_VERSION = 6
"""Part of every cache fingerprint: bump it when a code change alters what a piece builds."""
DONE = "done.json"
SHORT_CONTEXT = 12
"""Typical context length, in words, in the first (short-context) part of the LM's training."""
SYSTEM_PROMPTS = (DEFAULT_SYSTEM_PROMPT, "You are a concise assistant.", "Answer briefly.")
FILLER_WORDS = (
    "image", "picture", "photo", "background", "plain", "pixels", "the", "of", "with", "shows", "here",
    "scene", "centre", "left", "right", "top", "bottom", "light", "dark", "noise", "thing", "view", "simple",
)  # fmt: skip
"""Neutral words around the description in the LM's image slots: the LM learns to look past them."""


@dataclass(frozen=True)
class ToyConfig:
    """Every setting of the miniature world. With the bundled backbones (the default) it builds in under a minute;
    training them here (`backbones="train"`) takes about 50 minutes on 2 quiet CPU cores, the LM most of it."""

    seed: int = 0
    """Seeds the world, both trainings and all sampling."""
    n_train: int = 10000
    """Training images (two alignment records each: a caption and a conversation). The alignment sees each twice:
    more images seen fewer times generalise better than 4,000 seen five times at the same cost (multiple choice
    0.962 against 0.955, POPE adversarial 0.962 against 0.946 on the world of seed 0)."""
    n_eval: int = 288
    """Held-out images (4 per distinct caption); one caption and one question record each."""
    image_size: int = 64
    """Side of the images and of the CLIP input, in pixels."""

    patch_size: int = 8
    """CLIP patch side: (image_size / patch_size)^2 patch tokens per image. The world's shapes sit on a
    grid of 1/8 of the side, so patch 8 at 64 px sees each shape the same wherever it is."""
    clip_width: int = 96
    """Vision width: the adapter's feature size D."""
    clip_layers: int = 6
    """The adapter reads block 5's output (layer -2): deep enough that a patch inside a large shape knows the
    shape's outline (with 4 blocks, large crosses read as circles and stars as crosses)."""
    clip_head_width: int = 32
    clip_embed_dim: int = 128
    clip_text_width: int = 128
    clip_text_layers: int = 2
    clip_context_length: int = 16
    clip_steps: int = 350
    """Contrastive steps; each batch holds every distinct caption once (no false negatives)."""
    clip_lr: float = 1e-3
    clip_images: int = 4000
    """The CLIP learns from the first `clip_images` training images (the bundled one: seed 0's first 4,000)."""

    vocab_size: int = 512
    """Learned BPE vocabulary; the three ChatML special tokens follow it."""
    lm_hidden: int = 128
    """The adapter's projector output size."""
    lm_layers: int = 4
    lm_heads: int = 8
    lm_intermediate: int = 344
    lm_steps: int = 6000
    lm_short_fraction: float = 0.5
    """Fraction of the LM steps trained on short contexts (a curriculum) before image-length ones."""
    lm_batch_size: int = 32
    lm_lr: float = 2e-3
    lm_kinds: tuple[tuple[str, float], ...] = (("open", 0.25), ("yesno", 0.35), ("choice", 0.4))
    """(question kind, weight) of the LM's conversations: yes/no and multiple choice need more steps than open ones."""
    lm_turns: tuple[int, ...] = (2, 3, 4, 5)
    """Questions per LM conversation, drawn uniformly from these."""
    lm_eval_prompts: int = 400
    """Held-out text prompts for the LM's context-reading accuracy (and the draft's agreement with the LM)."""

    draft_layers: int = 2
    """The draft LM's decoder layers: half the LM's, as the 7B costs about half the 14B per token."""
    draft_hidden: int = 128
    """The draft's width, its projector's output size. Equal to `lm_hidden`, the draft starts as a copy of the LM's
    embeddings, head and evenly spaced layers (DistilBERT's start); otherwise from scratch."""
    draft_heads: int = 8
    draft_intermediate: int = 344
    draft_steps: int = 1000
    """Distillation steps on the LM's kind of corpus (answers only), short contexts first as for the LM."""
    draft_short_fraction: float = 0.3
    draft_batch_size: int = 32
    draft_lr: float = 1e-3
    draft_ce_weight: float = 0.5
    """Weight of the cross-entropy on the right answers beside the KL to the LM's next-token distribution."""

    backbones: str = "bundled"
    """"bundled": the CLIP, LM and draft trained once with these settings (seed 0) and shipped in
    `projector_training/toy/bundled/` (rebuilt by `python -m projector_training.toy.pretrain`), as the real
    backbones are downloaded rather than trained; "train": train them here, seeded by `seed`."""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.clip_images > self.n_train:
            raise ValueError(f"clip_images ({self.clip_images}) cannot exceed n_train ({self.n_train})")
        if self.clip_layers < 2:
            raise ValueError("the CLIP needs at least 2 blocks: the adapter reads the second-to-last one")
        if self.backbones not in ("bundled", "train"):
            raise ValueError(f"backbones must be 'bundled' or 'train'; got {self.backbones!r}")
        if not 1 <= self.draft_layers <= self.lm_layers:
            raise ValueError(f"draft_layers must be 1 to lm_layers ({self.lm_layers}); got {self.draft_layers}")
        if (
            self.clip_width % self.clip_head_width
            or self.lm_hidden % self.lm_heads
            or self.draft_hidden % self.draft_heads
        ):
            raise ValueError("widths must be multiples of the head widths / head counts")

    @classmethod
    def micro(cls) -> ToyConfig:
        """A seconds-fast world for tests: everything tiny, nothing learned to speak of."""
        return cls(
            n_train=144,
            n_eval=72,
            image_size=32,
            clip_width=32,
            clip_layers=2,
            clip_head_width=16,
            clip_embed_dim=32,
            clip_text_width=32,
            clip_text_layers=1,
            clip_steps=3,
            clip_images=144,
            vocab_size=300,
            lm_hidden=32,
            lm_layers=1,
            lm_heads=2,
            lm_intermediate=64,
            lm_steps=3,
            lm_batch_size=8,
            lm_eval_prompts=8,
            draft_layers=1,
            draft_hidden=16,
            draft_heads=2,
            draft_intermediate=32,
            draft_steps=3,
            draft_batch_size=8,
            backbones="train",
        )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ToyWorld:
    """A built miniature world: where everything is, and how good the backbones are."""

    root: Path
    world_dir: Path
    images_dir: Path
    train_json: Path
    eval_captions_json: Path
    eval_vqa_json: Path
    clip_dir: Path
    """open_clip local-dir checkpoint: load with `open_clip.create_model("local-dir:" + str(clip_dir))`."""
    lm_dir: Path
    """`LlamaForCausalLM` + tokenizer (`from_pretrained`)."""
    num_image_tokens: int
    """Patch tokens per image (CLS excluded)."""
    clip_metrics: dict[str, Any]
    """Held-out zero-shot caption retrieval: `accuracy` and per-attribute accuracies."""
    lm_metrics: dict[str, Any]
    """Greedy exact match on held-out description-in-context prompts: `accuracy` and per task."""
    draft_lm_dir: Path
    """The draft LM distilled from the LM (`from_pretrained`), with the same tokenizer and embedding rows."""
    draft_lm_metrics: dict[str, Any]
    """As `lm_metrics` for the draft, plus its greedy agreement with the LM (`token_agreement`,
    `answer_agreement`), its size (`parameters`, `layer_cost_vs_teacher`) and the LM layers it started from."""
    built: tuple[str, ...]
    """Pieces built by this call (the others were reused): a subset of ("world", "clip", "lm", "draft_lm")."""

    @property
    def vision_tower(self) -> str:
        """The tower id for `AdapterConfig(vision_backend="open_clip")`."""
        return f"local-dir:{self.clip_dir}"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _cosine_lr(step: int, total: int, peak: float, warmup_fraction: float = 0.05) -> float:
    warmup = max(1, round(total * warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---------------------------------------------------------------- CLIP


def _clip_model_cfg(config: ToyConfig) -> dict[str, Any]:
    return {
        "embed_dim": config.clip_embed_dim,
        "vision_cfg": {
            "image_size": config.image_size,
            "patch_size": config.patch_size,
            "width": config.clip_width,
            "layers": config.clip_layers,
            "head_width": config.clip_head_width,
            # Average pooling makes every patch token carry the image's content, and the adapter
            # reads patch tokens (CLS dropped).
            "pool_type": "avg",
        },
        "text_cfg": {
            "context_length": config.clip_context_length,
            "vocab_size": 49408,  # open_clip's built-in SimpleTokenizer, available offline
            "width": config.clip_text_width,
            "heads": max(1, config.clip_text_width // 32),
            "layers": config.clip_text_layers,
        },
    }


def _load_images(
    world: WorldFiles, records: Sequence[dict[str, Any]], limit: int | None = None
) -> tuple[torch.Tensor, list[ToyObject]]:
    """Unique images of caption records (the first `limit`) -> (uint8 pixels (M, 3, S, S), their objects)."""
    by_caption = {obj.caption: obj for obj in OBJECTS}
    pixels, objects = [], []
    for record in [r for r in records if r["id"].endswith("-caption")][:limit]:
        image = Image.open(world.root / record["image"]).convert("RGB")
        pixels.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))  # (3, S, S)
        objects.append(by_caption[record["conversations"][1]["value"]])
    return torch.stack(pixels), objects


def _normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float (B, 3, S, S), the way `vlm.processing.image_processor.preprocess_image` does it."""
    mean_t = torch.tensor(mean)[None, :, None, None]
    std_t = torch.tensor(std)[None, :, None, None]
    return (pixels.float() / 255.0 - mean_t) / std_t


@torch.no_grad()
def _zero_shot(
    model: open_clip.CLIP, pixels: torch.Tensor, objects: Sequence[ToyObject], texts: torch.Tensor
) -> dict[str, Any]:
    """Classify each image among all distinct captions (`texts`: (C, T) tokens of `OBJECTS`)."""
    model.eval()
    text_features = nn.functional.normalize(model.encode_text(texts), dim=-1)  # (C, E)
    predictions = []
    for batch in pixels.split(256):
        image_features = nn.functional.normalize(model.encode_image(batch), dim=-1)  # (b, E)
        predictions += (image_features @ text_features.T).argmax(dim=-1).tolist()
    predicted = [OBJECTS[p] for p in predictions]
    metrics: dict[str, Any] = {"accuracy": float(np.mean([p == o for p, o in zip(predicted, objects, strict=True)]))}
    for attribute in ATTRIBUTES:
        hits = [p.answer(attribute) == o.answer(attribute) for p, o in zip(predicted, objects, strict=True)]
        metrics[f"{attribute}_accuracy"] = float(np.mean(hits))
    metrics["n_images"] = len(objects)
    return metrics


def _train_clip(config: ToyConfig, world: WorldFiles, out: Path, log: Log, device: torch.device) -> dict[str, Any]:
    _seed_everything(config.seed)
    train_pixels, train_objects = _load_images(world, load_records(world.train_json), limit=config.clip_images)
    eval_pixels, eval_objects = _load_images(world, load_records(world.eval_captions_json))
    # The world's own pixel statistics, saved with the model so every loader normalises the same way.
    scaled = train_pixels.float() / 255.0  # (M, 3, S, S)
    mean = [round(float(m), 4) for m in scaled.mean(dim=(0, 2, 3))]
    std = [round(float(s), 4) for s in scaled.std(dim=(0, 2, 3))]
    train_x, eval_x = _normalise(train_pixels, mean, std).to(device), _normalise(eval_pixels, mean, std).to(device)

    model_cfg = _clip_model_cfg(config)
    model = open_clip.CLIP(**model_cfg, output_dict=True).to(device)
    tokenize = open_clip.SimpleTokenizer(context_length=config.clip_context_length)
    texts = tokenize([obj.caption for obj in OBJECTS]).to(device)  # (C, T)
    by_object: dict[ToyObject, list[int]] = {obj: [] for obj in OBJECTS}
    for i, obj in enumerate(train_objects):
        by_object[obj].append(i)
    if any(not rows for rows in by_object.values()):
        raise ValueError(f"n_train={config.n_train} leaves some captions without a training image")

    # The captions use a few dozen of the 49408 token rows: random fixed rows serve, and updating the
    # whole table every step would cost a quarter of the training time.
    model.token_embedding.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(trainable, lr=config.clip_lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    model.train()
    for step in range(config.clip_steps):
        # One image per distinct caption: a batch without duplicate captions has no false negatives.
        rows = [r[int(torch.randint(len(r), (), generator=generator))] for r in by_object.values()]
        images = train_x[rows]  # (C, 3, S, S)
        flip = (torch.rand(len(rows), generator=generator) < 0.5).to(device)  # mirroring keeps every attribute
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, config.clip_steps, config.clip_lr)
        output = model(images, texts)
        loss = loss_fn(output["image_features"], output["text_features"], output["logit_scale"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == config.clip_steps - 1:
            log(f"  clip step {step}/{config.clip_steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)")

    metrics = _zero_shot(model, eval_x, eval_objects, texts)
    metrics["train_seconds"] = round(time.perf_counter() - start, 1)
    out.mkdir(parents=True)
    preprocess_cfg = {"size": config.image_size, "mode": "RGB", "mean": mean, "std": std}
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2) + "\n"
    )
    model = model.cpu()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    _check_clip_reload(model, out, eval_x[:4].cpu(), texts.cpu())
    return metrics


@torch.no_grad()
def _check_clip_reload(model: open_clip.CLIP, path: Path, images: torch.Tensor, texts: torch.Tensor) -> None:
    """The saved directory must load through open_clip's `local-dir:` schema and compute the same thing."""
    reloaded = open_clip.create_model(f"local-dir:{path}", device="cpu").eval()
    model.eval()
    if not (
        torch.equal(model.encode_image(images), reloaded.encode_image(images))
        and torch.equal(model.encode_text(texts), reloaded.encode_text(texts))
    ):
        raise RuntimeError(f"the CLIP saved in {path} does not reload to identical outputs")


# ---------------------------------------------------------------- LM


@dataclass(frozen=True)
class _Example:
    """One LM training conversation; `context` stands in for the image slots of its first user turn."""

    system: str
    context: list[str]
    """Words (filler and a description), joined with spaces."""
    turns: tuple[Turn, ...]
    """The questions and answers, in order; the loss covers every answer."""

    @property
    def task(self) -> str:
        """What the last question asks: a kind, with "_later" when it is not the first question."""
        last = self.turns[-1]
        return last.kind if len(self.turns) == 1 else f"{last.kind}_later"


def _context(obj: ToyObject, rng: random.Random, num_patches: int) -> list[str]:
    """What stands in the image slots: a description alone, a description amid filler, or a bag of
    repeated attribute words and filler (what a per-patch projector most naturally writes); the long
    ones about as many tokens as there are slots."""
    style = rng.random()
    if style < 0.3:
        return describe(obj, rng).split()
    length = rng.randint(num_patches // 2, num_patches * 5 // 4)
    if style < 0.65:
        description = describe(obj, rng).split()
        filler = [rng.choice(FILLER_WORDS) for _ in range(max(0, length - len(description)))]
        cut = rng.randint(0, len(filler))
        return filler[:cut] + description + filler[cut:]
    attributes = [obj.size, obj.colour, obj.shape]
    density = rng.uniform(0.2, 1.0)
    words = attributes + [
        rng.choice(attributes) if rng.random() < density else rng.choice(FILLER_WORDS) for _ in range(length - 3)
    ]
    rng.shuffle(words)
    return words


def _example(rng: random.Random, num_patches: int, config: ToyConfig) -> _Example:
    """A conversation of `config.lm_turns` questions about one object, of the kinds the world's records ask
    (`config.lm_kinds`: open, yes/no with POPE's negatives, multiple choice), sometimes a caption request first.
    An attribute may be asked again in another form: the LM must read the context each time."""
    obj = rng.choice(OBJECTS)
    context = _context(obj, rng, num_patches)
    kinds = dict(config.lm_kinds)
    turns = []
    for k in range(rng.choice(config.lm_turns)):
        if k == 0 and rng.random() < 0.2:
            turns.append(caption_turn(obj, rng))
        else:
            turns.append(question_turn(obj, rng.choice(list(ATTRIBUTES)), rng, kinds))
    system = DEFAULT_SYSTEM_PROMPT if rng.random() < 0.8 else rng.choice(SYSTEM_PROMPTS)
    return _Example(system, context, tuple(turns))


def _render(example: _Example) -> str:
    text = f"<|im_start|>system\n{example.system}<|im_end|>\n"
    for k, turn in enumerate(example.turns):
        question = f"{' '.join(example.context)}\n{turn.question}" if k == 0 else turn.question
        text += f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{turn.answer}<|im_end|>\n"
    return text


class _Encoder:
    """Example -> ids, tokenized in the same pieces as `vlm.processing.chat.encode_chat` (text between special
    tokens separately; the image slots, here the context, on their own)."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer = tokenizer
        self.im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self._cache: dict[str, list[int]] = {}

    def text(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = encode_text(self.tokenizer, text)
        return self._cache[text]

    def context(self, words: Sequence[str]) -> list[int]:
        # Byte-level BPE never merges across a space-word boundary, so word-wise ids equal the ids of
        # the joined text; the cache makes this fast.
        return [i for k, w in enumerate(words) for i in self.text(w if k == 0 else f" {w}")]

    def pieces(self, example: _Example) -> list[tuple[list[int], list[int]]]:
        """Per turn: (prompt ids up to and including "assistant\n", answer ids with `<|im_end|>`); the
        prompt of the first turn starts with the system message, later ones follow the previous answer."""
        out = []
        for k, turn in enumerate(example.turns):
            if k == 0:
                ids = [self.im_start, *self.text(f"system\n{example.system}"), self.im_end, *self.text("\n")]
                ids += [self.im_start, *self.text("user\n"), *self.context(example.context)]
                ids += self.text(f"\n{turn.question}")
            else:
                ids = [*self.text("\n"), self.im_start, *self.text(f"user\n{turn.question}")]
            ids += [self.im_end, *self.text("\n"), self.im_start, *self.text("assistant\n")]
            out.append((ids, [*self.text(turn.answer), self.im_end]))
        return out

    def prompt(self, example: _Example) -> list[int]:
        """Ids up to the last answer: earlier turns with their answers, then "assistant\n"."""
        pieces = self.pieces(example)
        return [i for prompt, answer in pieces[:-1] for i in prompt + answer] + pieces[-1][0]

    def answer(self, example: _Example) -> list[int]:
        return self.pieces(example)[-1][1]


def _lm_batch(encoder: _Encoder, examples: Sequence[_Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded training batch with the loss on each answer and its `<|im_end|>` only, as in the
    adapter's training: the answers are the signal; the rest of the prompt is fixed or random."""
    rows = []
    for example in examples:
        ids: list[int] = []
        labels: list[int] = []
        for prompt, answer in encoder.pieces(example):
            ids += prompt + answer
            labels += [IGNORE_INDEX] * len(prompt) + answer
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for b, (ids, row_labels) in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention_mask[b, : len(ids)] = 1
        labels[b, : len(ids)] = torch.tensor(row_labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def _greedy(model: LlamaForCausalLM, encoder: _Encoder, prompts: Sequence[list[int]], max_new: int) -> list[list[int]]:
    """Greedy continuations of left-padded prompts, each cut at its first `<|im_end|>`."""
    width = max(len(p) for p in prompts)
    pad = model.config.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # (B, T)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # (B, T)
    generated = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=[encoder.im_end, model.config.eos_token_id],
        pad_token_id=pad,
    )[:, width:]  # (B, new)
    out = []
    for row in generated.tolist():
        out.append(row[: row.index(encoder.im_end)] if encoder.im_end in row else row)
    return out


def _evaluate_lm(model: LlamaForCausalLM, encoder: _Encoder, config: ToyConfig) -> dict[str, Any]:
    """Greedy exact match on held-out prompts drawn like the image-length training ones."""
    rng = random.Random(f"{config.seed}/lm-eval")
    examples = [_example(rng, config.num_patches, config) for _ in range(config.lm_eval_prompts)]
    model.eval()
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(examples), 64):
        chunk = examples[start : start + 64]
        outputs = _greedy(model, encoder, [encoder.prompt(e) for e in chunk], max_new=12)
        for example, ids in zip(chunk, outputs, strict=True):
            hits.setdefault(example.task, []).append(encoder.tokenizer.decode(ids) == example.turns[-1].answer)
    metrics: dict[str, Any] = {"accuracy": float(np.mean([h for v in hits.values() for h in v]))}
    metrics.update({f"{task}_accuracy": float(np.mean(v)) for task, v in sorted(hits.items())})
    metrics["n_prompts"] = len(examples)
    return metrics


@torch.no_grad()
def _pair_word_forms(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    """Start each bare word token ("red", as an answer begins) close to its spaced form ("Ġred", as in
    running text) in the input and output embeddings, the way a pretrained LM holds them.

    Without it a tiny LM learns to copy " red" from its context into a caption at once, but learns only
    slowly, one attribute at a time, that " red" in the context means the answer "red".
    """
    vocab = tokenizer.get_vocab()
    pairs = [(vocab[t], vocab[t[1:]]) for t in vocab if t.startswith("Ġ") and t[1:] in vocab]
    spaced, bare = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    for table in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        table[bare] = (table[spaced] + table[bare]) / math.sqrt(2)


def _train_lm(config: ToyConfig, out: Path, log: Log, device: torch.device) -> dict[str, Any]:
    _seed_everything(config.seed)
    rng = random.Random(f"{config.seed}/lm-train")
    corpus_rng = random.Random(f"{config.seed}/lm-corpus")
    corpus = [_render(_example(corpus_rng, config.num_patches, config)) for _ in range(2000)]
    tokenizer = build_tokenizer(corpus, config.vocab_size)
    encoder = _Encoder(tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    lm_config = LlamaConfig(
        # Spare rows past the tokenizer, like CausalLM's 152064 > 151646: the adapter's image token.
        vocab_size=(len(tokenizer) // 64 + 1) * 64,
        hidden_size=config.lm_hidden,
        intermediate_size=config.lm_intermediate,
        num_hidden_layers=config.lm_layers,
        num_attention_heads=config.lm_heads,
        num_key_value_heads=config.lm_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
    )
    model = LlamaForCausalLM(lm_config)
    _pair_word_forms(model, tokenizer)
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lm_lr, weight_decay=0.0)
    start = time.perf_counter()
    model.train()
    for step in range(config.lm_steps):
        # Short contexts first: the question -> attribute lookup is learned several times faster on
        # short sequences; the long ones then teach it to search as many slots as an image has.
        slots = config.num_patches if step >= config.lm_steps * config.lm_short_fraction else SHORT_CONTEXT
        batch = _lm_batch(encoder, [_example(rng, slots, config) for _ in range(config.lm_batch_size)], end)
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, config.lm_steps, config.lm_lr)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == config.lm_steps - 1:
            log(f"  lm step {step}/{config.lm_steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)")
    train_seconds = round(time.perf_counter() - start, 1)

    metrics = _evaluate_lm(model, encoder, config)
    metrics["train_seconds"] = train_seconds
    out.mkdir(parents=True)
    model = model.cpu()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_lm_reload(model, out)
    return metrics


BUNDLED = Path(__file__).with_name("bundled")
"""The backbones trained once with `ToyConfig`'s settings (seed 0) by `python -m projector_training.toy.pretrain`:
one folder per piece of `PIECES`, each with its `PRETRAINING` record."""
PIECES = ("clip", "lm", "draft_lm")
PRETRAINING = "pretraining.json"
"""Beside each bundled piece: the settings it was trained with, its metrics, the command, versions and commit."""


def piece_settings(config: ToyConfig, piece: str) -> dict[str, Any]:
    """What makes `piece` (not where it comes from, nor how it is evaluated), as JSON values: its own prefixed
    settings, the sizes it is built for, and for the draft the LM's settings too (it is distilled from the LM)."""

    def prefixed(prefix: str) -> dict[str, Any]:
        names = [f.name for f in dataclasses.fields(config) if f.name.startswith(prefix)]
        return {n: getattr(config, n) for n in names if n != "lm_eval_prompts"}

    if piece == "clip":  # trained on the first `clip_images` training images of the world of seed 0
        values = {**prefixed("clip_"), "image_size": config.image_size, "patch_size": config.patch_size}
    elif piece == "lm":
        values = {**prefixed("lm_"), "vocab_size": config.vocab_size, "slots": config.num_patches}
    elif piece == "draft_lm":
        values = {**prefixed("draft_"), "lm": piece_settings(config, "lm")}
    else:
        raise ValueError(f"no toy backbone named {piece!r}; the pieces are {', '.join(PIECES)}")
    return json.loads(json.dumps(values))


def _copy_bundled(config: ToyConfig, piece: str, out: Path) -> dict[str, Any]:
    """Copy the bundled `piece` into `out` after checking it was made with `config`'s settings; returns its
    pretraining metrics."""
    source = BUNDLED / piece
    made = json.loads((source / PRETRAINING).read_text())
    wanted = piece_settings(config, piece)
    if made["settings"] != wanted:
        changed = sorted(k for k, v in wanted.items() if made["settings"].get(k) != v)
        raise ValueError(
            f"the bundled toy {piece} ({source}) was trained with other settings than these ({', '.join(changed)}): "
            f"run `python -m projector_training.toy.pretrain --pieces {piece}` to train and bundle one with them, "
            "or use backbones='train'"
        )
    shutil.copytree(source, out)
    return made["metrics"]


COMPACT_CLIP = "open_clip_model.compact.safetensors"
"""The bundled CLIP's weights with only the token-table rows its captions use (`compact_clip`)."""


def compact_clip(directory: Path, config: ToyConfig) -> None:
    """Replace the saved CLIP's token table by the rows the world's captions use (`COMPACT_CLIP`). The table has
    open_clip's 49,408 rows, frozen random ones (`_train_clip`), 25 MB of the 29; `_expand_clip` restores it with
    zeros in the rows no caption uses, which only a text the world never writes would look up."""
    state = load_file(directory / "open_clip_model.safetensors")
    table = state.pop("token_embedding.weight")  # (V, W)
    tokens = open_clip.SimpleTokenizer(context_length=config.clip_context_length)([o.caption for o in OBJECTS])
    ids = torch.unique(tokens)  # padding (0) included
    state.update({"token_embedding.ids": ids, "token_embedding.rows": table[ids].contiguous()})
    state["token_embedding.shape"] = torch.tensor(table.shape)
    save_file(state, str(directory / COMPACT_CLIP))
    (directory / "open_clip_model.safetensors").unlink()


def _expand_clip(directory: Path) -> None:
    state = load_file(directory / COMPACT_CLIP)
    ids, rows, shape = (state.pop(f"token_embedding.{k}") for k in ("ids", "rows", "shape"))
    table = torch.zeros(tuple(shape.tolist()), dtype=rows.dtype)
    table[ids] = rows
    state["token_embedding.weight"] = table
    save_file(state, str(directory / "open_clip_model.safetensors"))
    (directory / COMPACT_CLIP).unlink()


def _bundled_clip(config: ToyConfig, world: WorldFiles, out: Path) -> dict[str, Any]:
    """The bundled CLIP in `out`, its zero-shot accuracy measured again on this world's held-out images."""
    made = _copy_bundled(config, "clip", out)
    _expand_clip(out)
    preprocess = json.loads((out / "open_clip_config.json").read_text())["preprocess_cfg"]
    pixels, objects = _load_images(world, load_records(world.eval_captions_json))
    model = open_clip.create_model(f"local-dir:{out}", device="cpu")
    texts = open_clip.SimpleTokenizer(context_length=config.clip_context_length)([o.caption for o in OBJECTS])
    metrics = _zero_shot(model, _normalise(pixels, preprocess["mean"], preprocess["std"]), objects, texts)
    return {**metrics, "source": "bundled", "pretraining": made}


def _bundled_lm(config: ToyConfig, out: Path) -> dict[str, Any]:
    """The bundled LM in `out`, its context reading measured again with `config.seed`'s prompts."""
    made = _copy_bundled(config, "lm", out)
    model = AutoModelForCausalLM.from_pretrained(out)
    metrics = _evaluate_lm(model, _Encoder(AutoTokenizer.from_pretrained(out)), config)
    return {**metrics, "source": "bundled", "pretraining": made}


def _bundled_draft_lm(config: ToyConfig, lm_dir: Path, out: Path) -> dict[str, Any]:
    """The bundled draft in `out`, measured again as `_train_draft_lm` measures it, against the LM in `lm_dir`."""
    made = _copy_bundled(config, "draft_lm", out)
    encoder = _Encoder(AutoTokenizer.from_pretrained(out))
    draft = AutoModelForCausalLM.from_pretrained(out)
    teacher = AutoModelForCausalLM.from_pretrained(lm_dir)
    metrics = {**_evaluate_lm(draft, encoder, config), **_agreement(draft, teacher, encoder, config)}
    return {**metrics, **_sizes(draft, teacher), "source": "bundled", "pretraining": made}


@torch.no_grad()
def _check_lm_reload(model: LlamaForCausalLM, path: Path) -> None:
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tokenizer("<|im_start|>user\nWhat shape is it?<|im_end|>")["input_ids"]])  # (1, T)
    if not torch.equal(model.eval()(ids).logits, reloaded(ids).logits):
        raise RuntimeError(f"the LM saved in {path} does not reload to identical outputs")


# ---------------------------------------------------------------- draft LM


def _draft_config(config: ToyConfig, teacher: LlamaConfig) -> LlamaConfig:
    """The draft's architecture: the teacher's vocabulary rows, special ids and norms, its own depth and width."""
    return LlamaConfig(
        vocab_size=teacher.vocab_size,
        hidden_size=config.draft_hidden,
        intermediate_size=config.draft_intermediate,
        num_hidden_layers=config.draft_layers,
        num_attention_heads=config.draft_heads,
        num_key_value_heads=config.draft_heads,
        max_position_embeddings=teacher.max_position_embeddings,
        rms_norm_eps=teacher.rms_norm_eps,
        tie_word_embeddings=False,
        bos_token_id=teacher.bos_token_id,
        eos_token_id=teacher.eos_token_id,
        pad_token_id=teacher.pad_token_id,
    )


@torch.no_grad()
def _init_from_teacher(draft: LlamaForCausalLM, teacher: LlamaForCausalLM) -> list[int]:
    """Start the draft as a shallower copy of the teacher, as DistilBERT does: its embeddings, final norm and head,
    and evenly spaced decoder layers (the first and the last always). Returns the teacher layers taken."""
    n_teacher, n_draft = len(teacher.model.layers), len(draft.model.layers)
    taken = [round(k * (n_teacher - 1) / max(1, n_draft - 1)) for k in range(n_draft)]
    draft.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
    draft.model.norm.load_state_dict(teacher.model.norm.state_dict())
    draft.lm_head.load_state_dict(teacher.lm_head.state_dict())
    for layer, source in zip(draft.model.layers, taken, strict=True):
        layer.load_state_dict(teacher.model.layers[source].state_dict())
    return taken


def _distillation_loss(
    draft_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, ce_weight: float
) -> torch.Tensor:
    """KL(teacher || draft) of the next-token distributions at the answer positions, plus `ce_weight` times the
    usual cross-entropy there: the answers are where the draft will propose tokens."""
    targets = labels[:, 1:]  # (B, T-1): the token each position predicts
    scored = targets != IGNORE_INDEX
    draft_log_p = draft_logits[:, :-1][scored].float().log_softmax(dim=-1)  # (N, V)
    teacher_log_p = teacher_logits[:, :-1][scored].float().log_softmax(dim=-1)  # (N, V)
    kl = nn.functional.kl_div(draft_log_p, teacher_log_p, log_target=True, reduction="batchmean")
    return kl + ce_weight * nn.functional.nll_loss(draft_log_p, targets[scored])


@torch.no_grad()
def _agreement(
    draft: LlamaForCausalLM, teacher: LlamaForCausalLM, encoder: _Encoder, config: ToyConfig
) -> dict[str, Any]:
    """How often the draft's greedy next token equals the teacher's along the teacher's own greedy answers to the
    held-out prompts of `_evaluate_lm` (the closing `<|im_end|>` included): per token, the chance that greedy
    speculative decoding accepts a drafted token; per answer, that it accepts a whole answer."""
    rng = random.Random(f"{config.seed}/lm-eval")
    examples = [_example(rng, config.num_patches, config) for _ in range(config.lm_eval_prompts)]
    draft.eval()
    teacher.eval()
    tokens, answers = [], []
    for start in range(0, len(examples), 64):
        prompts = [encoder.prompt(e) for e in examples[start : start + 64]]
        continuations = [[*c, encoder.im_end] for c in _greedy(teacher, encoder, prompts, max_new=12)]
        rows = [p + c for p, c in zip(prompts, continuations, strict=True)]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [encoder.im_end] * (width - len(r)) for r in rows])  # (B, T)
        attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # (B, T)
        inputs = {"input_ids": input_ids.to(draft.device), "attention_mask": attention_mask.to(draft.device)}
        same = draft(**inputs).logits.argmax(-1) == teacher(**inputs).logits.argmax(-1)  # (B, T)
        for b, (prompt, continuation) in enumerate(zip(prompts, continuations, strict=True)):
            # Position i predicts token i + 1: the continuation's tokens are predicted from len(prompt) - 1 on.
            hits = same[b, len(prompt) - 1 : len(prompt) - 1 + len(continuation)].tolist()
            tokens += hits
            answers.append(all(hits))
    return {
        "token_agreement": round(float(np.mean(tokens)), 4),
        "answer_agreement": round(float(np.mean(answers)), 4),
        "n_tokens": len(tokens),
    }


def _train_draft_lm(config: ToyConfig, lm_dir: Path, out: Path, log: Log, device: torch.device) -> dict[str, Any]:
    _seed_everything(config.seed)
    rng = random.Random(f"{config.seed}/draft-train")
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    encoder = _Encoder(tokenizer)
    teacher = AutoModelForCausalLM.from_pretrained(lm_dir).to(device).eval().requires_grad_(False)
    draft = LlamaForCausalLM(_draft_config(config, teacher.config))
    if config.draft_hidden == teacher.config.hidden_size:
        taken = _init_from_teacher(draft, teacher)
    else:
        taken = None
        _pair_word_forms(draft, tokenizer)
    draft = draft.to(device)
    optimizer = torch.optim.AdamW(draft.parameters(), lr=config.draft_lr, weight_decay=0.0)
    start = time.perf_counter()
    draft.train()
    for step in range(config.draft_steps):
        slots = config.num_patches if step >= config.draft_steps * config.draft_short_fraction else SHORT_CONTEXT
        examples = [_example(rng, slots, config) for _ in range(config.draft_batch_size)]
        batch = {k: v.to(device) for k, v in _lm_batch(encoder, examples, teacher.config.pad_token_id).items()}
        labels = batch.pop("labels")
        with torch.no_grad():
            teacher_logits = teacher(**batch).logits  # (B, T, V)
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, config.draft_steps, config.draft_lr)
        loss = _distillation_loss(draft(**batch).logits, teacher_logits, labels, config.draft_ce_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == config.draft_steps - 1:
            log(f"  draft step {step}/{config.draft_steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
    train_seconds = round(time.perf_counter() - start, 1)

    metrics = _evaluate_lm(draft, encoder, config)
    metrics.update(_agreement(draft, teacher, encoder, config))
    metrics.update(train_seconds=train_seconds, initialised_from_layers=taken, **_sizes(draft, teacher))
    out.mkdir(parents=True)
    draft = draft.cpu()
    draft.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_lm_reload(draft, out)
    return metrics


def _sizes(draft: LlamaForCausalLM, teacher: LlamaForCausalLM) -> dict[str, Any]:
    """Parameter counts, and the draft's decoder-layer compute per token relative to the teacher's."""

    def layer_params(model: LlamaForCausalLM) -> int:
        return sum(p.numel() for p in model.model.layers.parameters())

    return {
        "parameters": sum(p.numel() for p in draft.parameters()),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "layer_cost_vs_teacher": round(layer_params(draft) / layer_params(teacher), 3),
    }


# ---------------------------------------------------------------- caching


def _fingerprint(config: ToyConfig, fields: Sequence[str], upstream: str = "") -> str:
    values = {name: getattr(config, name) for name in fields}
    key = json.dumps([BUILD_VERSION, values, upstream], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _fingerprints(config: ToyConfig) -> dict[str, str]:
    """Each piece's fingerprint: the settings it is built from, and the fingerprint of the piece it learns from."""

    def prefixed(prefix: str) -> list[str]:
        return [f.name for f in dataclasses.fields(config) if f.name.startswith(prefix)]

    world = _fingerprint(config, ["seed", "n_train", "n_eval", "image_size"])
    if config.backbones == "bundled":  # the shipped weights, measured with this seed's held-out data
        measured = ["backbones", "seed", "n_eval", "lm_eval_prompts"]
        clip = _fingerprint(config, measured, world + _file_sha256(BUNDLED / "clip" / COMPACT_CLIP))
        lm = _fingerprint(config, measured, _file_sha256(BUNDLED / "lm" / "model.safetensors"))
        draft = _fingerprint(config, measured, lm + _file_sha256(BUNDLED / "draft_lm" / "model.safetensors"))
        return {"world": world, "clip": clip, "lm": lm, "draft_lm": draft}
    lm = _fingerprint(config, [*prefixed("lm_"), "vocab_size", "seed", "image_size", "patch_size"])
    draft_fields = [*prefixed("draft_"), "seed", "image_size", "patch_size", "lm_eval_prompts"]
    return {
        "world": world,
        "clip": _fingerprint(config, [*prefixed("clip_"), "patch_size", "seed"], world),
        "lm": lm,
        "draft_lm": _fingerprint(config, draft_fields, lm),
    }


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached(directory: Path, fingerprint: str) -> dict[str, Any] | None:
    """The metrics of a completed piece built with these settings, or None."""
    try:
        done = json.loads((directory / DONE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return done["metrics"] if done.get("fingerprint") == fingerprint else None


def _finish(directory: Path, fingerprint: str, metrics: dict[str, Any]) -> None:
    (directory / DONE).write_text(json.dumps({"fingerprint": fingerprint, "metrics": metrics}, indent=2) + "\n")


def _backbone_builders(
    config: ToyConfig, root: Path, world_files: WorldFiles, log: Log, device: torch.device
) -> dict[str, Callable[[Path], dict[str, Any]]]:
    """How each backbone piece is made into its directory, in `PIECES` order: copied from the bundle and measured
    again, or trained here."""
    if config.backbones == "bundled":
        return {
            "clip": lambda d: _bundled_clip(config, world_files, d),
            "lm": lambda d: _bundled_lm(config, d),
            "draft_lm": lambda d: _bundled_draft_lm(config, root / "lm", d),
        }
    return {
        "clip": lambda d: _train_clip(config, world_files, d, log, device),
        "lm": lambda d: _train_lm(config, d, log, device),
        "draft_lm": lambda d: _train_draft_lm(config, root / "lm", d, log, device),
    }


def ensure_toy_world(
    root: Path, *, config: ToyConfig | None = None, log: Log = print, device: str | torch.device = "cpu"
) -> ToyWorld:
    """Build whatever part of the miniature world under `root` is missing or stale; reuse the rest.

    Training runs on `device`; the result is deterministic on CPU (an accelerator gives other weights,
    which the cache does not tell apart).
    """
    config = config or ToyConfig()
    device = torch.device(device)
    root = Path(root)
    built: list[str] = []
    pieces: dict[str, dict[str, Any]] = {}
    world_files = WorldFiles.at(root / "world")

    def piece(name: str, fingerprint: str, build: Callable[[Path], dict[str, Any]]) -> None:
        directory = root / name
        metrics = _cached(directory, fingerprint)
        if metrics is None:
            log(f"toy world: building {name} in {directory}")
            start = time.perf_counter()
            shutil.rmtree(directory, ignore_errors=True)
            metrics = build(directory)
            metrics["build_seconds"] = round(time.perf_counter() - start, 1)
            _finish(directory, fingerprint, metrics)
            built.append(name)
            log(f"toy world: {name} done in {metrics['build_seconds']}s: {metrics}")
        pieces[name] = metrics

    def build_world_piece(directory: Path) -> dict[str, Any]:
        build_world(
            directory, seed=config.seed, n_train=config.n_train, n_eval=config.n_eval, image_size=config.image_size
        )
        return {"n_train_images": config.n_train, "n_eval_images": config.n_eval}

    fingerprints = _fingerprints(config)
    piece("world", fingerprints["world"], build_world_piece)
    for name, build in _backbone_builders(config, root, world_files, log, device).items():
        piece(name, fingerprints[name], build)
    return ToyWorld(
        root=root,
        world_dir=world_files.root,
        images_dir=world_files.images,
        train_json=world_files.train_json,
        eval_captions_json=world_files.eval_captions_json,
        eval_vqa_json=world_files.eval_vqa_json,
        clip_dir=root / "clip",
        lm_dir=root / "lm",
        num_image_tokens=config.num_patches,
        clip_metrics=pieces["clip"],
        lm_metrics=pieces["lm"],
        draft_lm_dir=root / "draft_lm",
        draft_lm_metrics=pieces["draft_lm"],
        built=tuple(built),
    )
