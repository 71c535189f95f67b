"""LLaVA conversation records -> training samples, the collator, and a resumable length-grouped sampler.

A record (JSON list or JSONL):
    {"id": ..., "image": "rel/path.jpg" | ["a.jpg", "b.jpg"] | absent,
     "conversations": [{"from": "human" | "gpt" | "system", "value": "...<image>..."}, ...]}

Each `<image>` in a value marks where an image goes (LLaVA-Pretrain's "...photo.\\n<image>" and
mix665k's "<image>\\n..." both load unchanged); a record with one image and no placeholder gets it in
front of the first human turn, as LLaVA does.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlm.errors import ImageError, PromptError, VLMError
from vlm.processing.chat import IGNORE_INDEX, EncodedChat
from vlm.processing.processor import Processor, right_padded

__all__ = [
    "Collator",
    "ConversationDataset",
    "DataError",
    "GlobalBatchSampler",
    "load_records",
    "malformed",
    "record_to_messages",
    "truncate",
]

PLACEHOLDER = "<image>"
ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(VLMError):
    """The training data cannot be used (bad file, bad record, too many unreadable samples)."""


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON list or JSONL file of LLaVA conversation records."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"training data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some editors write, is fine
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from e
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not a valid JSON list: {e}") from e
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not a JSON object ({e.msg}, column {e.colno})") from e
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path} must hold a list of objects")
    return records


def malformed(record: dict[str, Any]) -> str | None:
    """Why a record cannot be a training sample, from its shape alone (None when it can): conversations must be
    a list of {"from": str, "value": str} turns with an answer among them, images a path or a list of paths."""
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return "no conversations list"
    for turn in conversations:
        if not isinstance(turn, dict) or not all(isinstance(turn.get(key), str) for key in ("from", "value")):
            return f"a turn that is not {{'from': str, 'value': str}}: {turn!r:.60}"
        if turn["from"] not in ROLE:
            return f"unknown speaker {turn['from']!r}"
    if not any(ROLE[turn["from"]] == "assistant" for turn in conversations):
        return "no gpt turn to learn from"
    if not any(ROLE[turn["from"]] == "assistant" for turn in _without_opening_answer(conversations)):
        return "only an opening gpt turn, which answers no question (dropped, as LLaVA does)"
    image = record.get("image")
    if image is None or isinstance(image, str) or (isinstance(image, list) and all(isinstance(i, str) for i in image)):
        return None
    return f"image is neither a path nor a list of paths: {image!r:.60}"


def _without_opening_answer(conversations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The turns less a gpt turn that opens the conversation (after any system turn), which answers no question:
    LLaVA's preprocessing drops it too."""
    start = next((i for i, t in enumerate(conversations) if ROLE.get(t["from"]) != "system"), len(conversations))
    if start < len(conversations) and ROLE.get(conversations[start]["from"]) == "assistant":
        return conversations[:start] + conversations[start + 1 :]
    return conversations


def record_images(record: dict[str, Any]) -> list[str]:
    image = record.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def record_to_messages(record: dict[str, Any], image_root: Path) -> list[dict[str, Any]]:
    """One record -> OpenAI-style messages whose image parts are paths under `image_root`."""
    if (reason := malformed(record)) is not None:
        raise DataError(f"record {record.get('id')!r}: {reason}")
    conversations = _without_opening_answer(record["conversations"])
    images = [image_root / p for p in record_images(record)]
    values = [turn["value"] for turn in conversations]
    placeholders = sum(v.count(PLACEHOLDER) for v in values)
    if placeholders == 0 and len(images) == 1:
        first_human = next((i for i, t in enumerate(conversations) if ROLE[t["from"]] == "user"), None)
        if first_human is None:
            raise DataError(f"record {record.get('id')!r} has an image but no human turn")
        values[first_human] = f"{PLACEHOLDER}\n{values[first_human]}"
        placeholders = 1
    if placeholders != len(images):
        raise DataError(f"record {record.get('id')!r} has {placeholders} {PLACEHOLDER} marks for {len(images)} images")
    remaining = iter(images)
    messages = []
    for turn, value in zip(conversations, values, strict=True):
        role = ROLE[turn["from"]]  # a known speaker: `malformed` checked
        parts: list[Any] = []
        for i, piece in enumerate(value.split(PLACEHOLDER)):
            if i:
                parts.append({"type": "image", "image": next(remaining)})
                piece = piece.removeprefix("\n")  # the image part brings its own newline
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": parts})
    return messages


def truncate(chat: EncodedChat, max_length: int, image_token_id: int) -> EncodedChat | None:
    """Cut to `max_length` tokens without splitting an image's slots (cut before it instead).
    None if nothing to learn from is left."""
    if len(chat) <= max_length:
        return chat
    ids, labels = chat.input_ids[:max_length], chat.labels[:max_length]
    if ids[-1] == image_token_id and chat.input_ids[max_length] == image_token_id:
        start = max_length
        while start > 0 and ids[start - 1] == image_token_id:
            start -= 1
        ids, labels = ids[:start], labels[:start]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    runs = sum(1 for i, t in enumerate(ids) if t == image_token_id and (i == 0 or ids[i - 1] != image_token_id))
    return EncodedChat(ids, labels, chat.images[:runs])


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None  # (I, 3, S, S)


class ConversationDataset(torch.utils.data.Dataset):
    """Records -> tokenized samples with preprocessed images. A sample that cannot be used (unreadable
    image, malformed record, nothing left to learn after truncation) comes back as None: the collator
    drops it and the training loop counts it."""

    def __init__(
        self, records: Sequence[dict[str, Any]], image_root: str | Path, processor: Processor, max_length: int
    ):
        self.records = records
        self.image_root = Path(image_root)
        self.processor = processor
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.records)

    def length(self, index: int) -> int:
        """The sample's token count (its ChatML ids with the image slots, before truncation), for length grouping
        and for the micro-batch search, which tries the longest samples. Measured, not guessed: Chinese runs
        about 0.6 tokens a character and English 0.2, so characters / 4 missed the longest Chinese samples.
        No image is read. A record that cannot be a sample counts its characters (its sample is dropped)."""
        record = self.records[index]
        try:
            messages = record_to_messages(record, self.image_root)
            return len(self.processor.encode(messages, add_generation_prompt=False))
        except (DataError, PromptError):
            return sum(len(str(t.get("value", ""))) for t in record.get("conversations", []) if isinstance(t, dict))

    def __getitem__(self, index: int) -> Sample | None:
        try:
            messages = record_to_messages(self.records[index], self.image_root)
            chat = self.processor.encode(messages, add_generation_prompt=False)
            chat = truncate(chat, self.max_length, self.processor.image_token_id)
            if chat is None:
                return None
            pixels = self.processor.pixel_values(chat.images)
        except (ImageError, DataError, PromptError):
            return None
        return Sample(chat.input_ids, chat.labels, pixels)


class Collator:
    """Right-pads a micro-batch; keeps the count of dropped (None) samples."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples: Sequence[Sample | None]) -> dict[str, Any]:
        good = [s for s in samples if s is not None]
        padded = right_padded([s.input_ids for s in good], [s.labels for s in good], self.pad_id)
        pixels = [s.pixel_values for s in good if s.pixel_values is not None]
        return {
            **padded,
            "pixel_values": torch.cat(pixels) if pixels else None,
            "num_samples": len(good),
            "num_skipped": len(samples) - len(good),
        }


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this process's micro-batches, step after step, from `start_step` on.

    Each epoch is a seeded permutation cut into global batches; with `group_by_length`, samples are
    sorted by length inside mega-batches of 8 global batches so padding stays low. A global batch is
    split into `num_processes * accumulation` micro-batches of neighbouring lengths; process `rank`
    takes micro-batches rank, rank + P, ... . The order depends only on
    (seed, epoch, step), which is what makes mid-epoch resume exact.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        global_batch: int,
        num_processes: int,
        rank: int,
        accumulation: int,
        seed: int,
        group_by_length: bool = True,
        start_step: int = 0,
        epochs: int = 1,
    ):
        self.lengths = lengths
        self.global_batch = global_batch
        self.num_processes, self.rank, self.accumulation = num_processes, rank, accumulation
        self.seed, self.group_by_length, self.epochs = seed, group_by_length, epochs
        self.start_step = start_step
        if global_batch % (num_processes * accumulation):
            raise DataError(
                f"global batch {global_batch} is not divisible by processes x accumulation "
                f"({num_processes} x {accumulation})"
            )

    @property
    def steps_per_epoch(self) -> int:
        return len(self.lengths) // self.global_batch

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch * self.epochs - self.start_step) * self.accumulation

    def global_batches(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        batches = [
            order[i : i + self.global_batch]
            for i in range(0, self.steps_per_epoch * self.global_batch, self.global_batch)
        ]
        if self.group_by_length:
            mega = 8
            grouped = []
            for i in range(0, len(batches), mega):
                flat = sorted((j for b in batches[i : i + mega] for j in b), key=lambda j: -self.lengths[j])
                grouped += [flat[k : k + self.global_batch] for k in range(0, len(flat), self.global_batch)]
            batches = grouped
        return batches

    def micro_batches(self, batch: list[int]) -> list[list[int]]:
        """This process's `accumulation` micro-batches of one global batch."""
        parts = self.num_processes * self.accumulation
        size = len(batch) // parts
        ordered = sorted(batch, key=lambda j: -self.lengths[j])  # similar lengths share a micro-batch
        micro = [ordered[k * size : (k + 1) * size] for k in range(parts)]
        return micro[self.rank :: self.num_processes]

    def __iter__(self) -> Iterator[list[int]]:
        step = 0
        for epoch in range(self.epochs):
            for batch in self.global_batches(epoch):
                if step >= self.start_step:
                    yield from self.micro_batches(batch)
                step += 1
