"""LLaVA's evaluation files: question files in, answer files out, and the resumable writing of answer files.

A question file is JSONL, one question per line: `question_id`, `image` (relative to an image folder; absent for a
text-only question), `text`, and optionally `category`; other keys (gold answers, for instance) are kept for
scoring. An answer file is JSONL too: `question_id`, `prompt`, `text`, `answer_id`, `model_id`, `metadata`, one line
per question, which is what LLaVA's scoring and submission scripts read.

Answer files are written a whole line at a time and flushed, so that an interrupted run leaves complete lines and
at most one partial last line, which `read_answers(..., repair=True)` cuts off before the run goes on.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vlm.errors import VLMError

__all__ = [
    "answer_record",
    "append_answers",
    "chunk",
    "question_key",
    "read_answers",
    "read_jsonl",
    "read_questions",
    "write_answers",
]

_ANSWER_IDS = uuid.UUID("6f1c7a52-3f4e-4b8e-9a51-0c7a0e5d2b19")
"""Namespace of the answer ids: an id is a function of the model and question, so reruns give the same file."""


def read_jsonl(path: str | Path, what: str = "records") -> list[dict[str, Any]]:
    """Every JSON object of a JSONL file, or of a JSON list; a bad line is a VLMError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise VLMError(f"{what} file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise VLMError(f"{path} is not valid JSON ({e})") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise VLMError(f"{path}, line {number}: not a JSON object ({e})") from None
    if not all(isinstance(r, dict) for r in records):
        raise VLMError(f"{path}: every record must be a JSON object")
    return records


def read_questions(path: str | Path) -> list[dict[str, Any]]:
    """A LLaVA question file, checked: each question has a `question_id` (once) and a `text`."""
    questions = read_jsonl(path, "question")
    seen: set[Any] = set()
    for number, question in enumerate(questions, 1):
        missing = [key for key in ("question_id", "text") if key not in question]
        if missing:
            raise VLMError(f"{path}, question {number}: no {' or '.join(missing)} (LLaVA's question files have "
                           "question_id, image, text and optionally category)")  # fmt: skip
        key = question_key(question["question_id"])
        if key in seen:
            raise VLMError(f"{path}: question_id {question['question_id']!r} appears twice")
        seen.add(key)
    return questions


def question_key(question_id: Any) -> str:
    """A question id as a comparable key (ids may be numbers or strings)."""
    return json.dumps(question_id)


def chunk(items: Sequence[Any], chunks: int, index: int) -> list[Any]:
    """Chunk `index` of `chunks` contiguous chunks, as LLaVA's `--num-chunks --chunk-idx` split a question file
    (ceil(n / chunks) items each, the last one shorter; a chunk past the end is empty)."""
    if chunks < 1 or not 0 <= index < chunks:
        raise VLMError(f"--chunk-idx must be in 0..{chunks - 1} and --num-chunks at least 1, got {index} of {chunks}")
    size = -(-len(items) // chunks)
    return list(items[index * size : (index + 1) * size])


def answer_record(question: dict[str, Any], text: str, model_id: str, error: str | None = None) -> dict[str, Any]:
    """An answer line in LLaVA's layout; `metadata` holds the question's category and, for a question that could
    not be answered (an unreadable image), the error."""
    metadata: dict[str, Any] = {}
    if "category" in question:
        metadata["category"] = question["category"]
    if error is not None:
        metadata["error"] = error
    answer_id = uuid.uuid5(_ANSWER_IDS, f"{model_id}\n{question_key(question['question_id'])}").hex[:22]
    return {"question_id": question["question_id"], "prompt": question["text"], "text": text,
            "answer_id": answer_id, "model_id": model_id, "metadata": metadata}  # fmt: skip


def read_answers(path: str | Path, repair: bool = False) -> dict[str, dict[str, Any]]:
    """Question key -> answer, for the complete lines of an answer file (empty if there is none). A last line
    without its newline is an interrupted write: with `repair` it is cut off the file, else ignored."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        with path.open("r+b") as f:
            f.truncate(end)
    answers = {}
    for number, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise VLMError(
                    f"{path}, line {number}: not an answer line ({e}); move the file away to start over"
                ) from None
            answers[question_key(record["question_id"])] = record
    return answers


def append_answers(handle: Any, records: Iterable[dict[str, Any]]) -> None:
    """Write whole lines and flush them: a kill leaves at most one partial last line."""
    for record in records:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    handle.flush()


def write_answers(path: str | Path, questions: Sequence[dict[str, Any]], answers: dict[str, dict[str, Any]]) -> int:
    """Write the answers to `questions`, in question order, to `path` at once (a temporary file renamed into
    place) -> how many were written."""
    path = Path(path)
    keys = [question_key(q["question_id"]) for q in questions]
    lines = [json.dumps(answers[k], ensure_ascii=False) + "\n" for k in keys if k in answers]
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text("".join(lines), encoding="utf-8")
    os.replace(temporary, path)
    return len(lines)
