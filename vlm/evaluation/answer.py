"""`vlm eval answer`: answer a LLaVA question file with an adapter, as LLaVA's `model_vqa_loader.py` does.

Questions are split as LLaVA splits them (`num_chunks`, `chunk_idx`) and, under `accelerate launch`, among the
processes (`rank` of `world`); each process answers its share in batches of similar length (sorted by prompt
length, so little of a batch is padding), greedy unless told otherwise, and appends whole lines to its own file as
batches finish. A restarted run reads what is there, cuts off a half-written last line and answers only the rest.
At the end the answers are written once more, in question order, into one file (process 0 merges the shares).
An image that cannot be read gets an answer line with an empty text and `metadata.error`, is counted, and the run
goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm.errors import VLMError
from vlm.evaluation.files import (
    answer_record,
    append_answers,
    chunk,
    question_key,
    read_answers,
    read_questions,
    write_answers,
)
from vlm.processing.images import load_image

__all__ = ["AnswerSummary", "answer_file", "part_path"]

DEFAULT_MAX_NEW_TOKENS = 128
"""LLaVA's `model_vqa_loader.py` default; its answers are a word or a phrase."""


@dataclass
class AnswerSummary:
    """What a run did: questions in its share, answered now, found answered before, answered with an error."""

    questions: int = 0
    answered: int = 0
    skipped: int = 0
    errors: int = 0


def part_path(answers: Path, rank: int, world: int) -> Path:
    """Where process `rank` of `world` writes its share before the merge (the answer file itself for one process)."""
    return answers if world == 1 else answers.with_name(f"{answers.name}.part{rank}-of-{world}")


def _messages(question: dict[str, Any], image: Any) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [] if image is None else [{"type": "image", "image": image}]
    return [{"role": "user", "content": [*content, {"type": "text", "text": question["text"]}]}]


def _image_path(question: dict[str, Any], image_folder: Path) -> Path | None:
    return None if question.get("image") in (None, "") else image_folder / question["image"]


def _by_length(model: Any, questions: Sequence[dict[str, Any]], image_folder: Path) -> list[dict[str, Any]]:
    """The questions, longest prompt first (images are not read: each takes the same number of slots)."""
    lengths = {}
    for question in questions:
        path = _image_path(question, image_folder)
        lengths[question_key(question["question_id"])] = len(model.encode_messages(_messages(question, path)))
    return sorted(questions, key=lambda q: -lengths[question_key(q["question_id"])])


def _answer_batch(
    model: Any, batch: Sequence[dict[str, Any]], image_folder: Path, model_id: str, batch_size: int,
    generation: dict[str, Any],
) -> tuple[list[dict[str, Any]], int]:  # fmt: skip
    """Answer lines for one batch (in batch order) and how many are errors: each image is read once, and one that
    cannot be read answers its question with an error instead of stopping the batch."""
    records: dict[int, dict[str, Any]] = {}
    conversations, slots = [], []
    for i, question in enumerate(batch):
        path = _image_path(question, image_folder)
        try:
            image = None if path is None else load_image(path)
        except VLMError as e:
            records[i] = answer_record(question, "", model_id, error=str(e))
            continue
        conversations.append(_messages(question, image))
        slots.append(i)
    texts = model.chat_batch(conversations, batch_size=batch_size, **generation) if conversations else []
    for i, text in zip(slots, texts, strict=True):
        records[i] = answer_record(batch[i], text.strip(), model_id)
    return [records[i] for i in range(len(batch))], len(batch) - len(slots)


def answer_file(
    model: Any,
    questions_file: str | Path,
    answers_file: str | Path,
    image_folder: str | Path = ".",
    *,
    model_id: str = "vlm",
    batch_size: int = 8,
    num_chunks: int = 1,
    chunk_idx: int = 0,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
    **generation: Any,
) -> AnswerSummary:
    """Answer this process's share of the question file into `answers_file` (see the module docstring).
    `generation`: as `model.chat`; greedy, at most DEFAULT_MAX_NEW_TOKENS new tokens unless given."""
    from tqdm import tqdm

    if batch_size < 1:
        raise VLMError(f"--batch-size must be at least 1, got {batch_size}")
    generation = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, **generation}
    answers_file, image_folder = Path(answers_file), Path(image_folder)
    questions = read_questions(questions_file)
    share = chunk(chunk(questions, num_chunks, chunk_idx), world, rank)
    answers_file.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(answers_file, rank, world)
    done = {**read_answers(answers_file, repair=world == 1), **read_answers(part, repair=True)}
    todo = [q for q in share if question_key(q["question_id"]) not in done]
    summary = AnswerSummary(questions=len(share), skipped=len(share) - len(todo))
    ordered = _by_length(model, todo, image_folder)
    with part.open("a", encoding="utf-8") as out, tqdm(
        total=len(share), initial=summary.skipped, desc=f"answering {rank}" if world > 1 else "answering",
        position=rank, disable=not progress, unit="q",
    ) as bar:  # fmt: skip
        for start in range(0, len(ordered), batch_size):
            records, errors = _answer_batch(
                model, ordered[start : start + batch_size], image_folder, model_id, batch_size, generation
            )
            append_answers(out, records)
            summary.answered += len(records) - errors
            summary.errors += errors
            bar.update(len(records))
    _merge(questions, answers_file, rank, world, barrier)
    return summary


def _merge(
    questions: Sequence[dict[str, Any]], answers_file: Path, rank: int, world: int,
    barrier: Callable[[], None] | None,
) -> None:  # fmt: skip
    """Every process's answers (and any from an earlier run) into `answers_file` in question order, by process 0
    once all have finished; the shares' files are removed after."""
    if world > 1:
        if barrier is None:
            raise VLMError("several processes need a barrier to merge their answers")
        barrier()
    if rank != 0:
        return
    parts = [part_path(answers_file, r, world) for r in range(world)]
    merged = read_answers(answers_file)
    for part in parts:
        merged.update(read_answers(part))
    write_answers(answers_file, questions, merged)
    for part in parts:
        if part != answers_file:
            part.unlink(missing_ok=True)
