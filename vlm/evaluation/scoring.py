"""`vlm eval score`: an answer file scored against gold labels with one of the benchmarks' rules.

The gold labels are read from annotation files (JSONL or a JSON list) keyed by `question_id`: `answer` or `label`
(POPE's annotation files call it label) for one gold answer, `answers` (strings, or VQA's `{"answer": ...}`
objects) for VQA's ten, `category` for per-category figures (else the answer's `metadata.category`), `image` to
pair MME's two questions about one image, and `options` (a count or the list) for multiple choice. A question
file that carries those keys is its own annotation file, as the miniature world's are.

Questions without an answer are counted (`missing`) and left out; answers with `metadata.error` (an unreadable
image) are counted (`errors`) and scored as wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vlm.errors import VLMError
from vlm.evaluation import scorers
from vlm.evaluation.files import question_key, read_answers, read_jsonl

__all__ = ["METRICS", "score_answers", "score_files"]

Row = tuple[dict[str, Any], str | None]
"""A gold record and the answer's text (None for an error answer)."""


def _gold(record: dict[str, Any]) -> str:
    for key in ("answer", "label"):
        if isinstance(record.get(key), str):
            return record[key]
    raise VLMError(f"question {record.get('question_id')!r}: the annotation has no `answer` or `label` string")


def _references(record: dict[str, Any]) -> list[str]:
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers:
        raise VLMError(f"question {record.get('question_id')!r}: VQA accuracy needs an `answers` list (the humans')")
    return [a["answer"] if isinstance(a, dict) else str(a) for a in answers]


def _options(record: dict[str, Any]) -> int:
    options = record.get("options", len(scorers.LETTERS))
    return len(options) if isinstance(options, list) else int(options)


def _by_category(rows: Sequence[Row], score: Callable[[Sequence[Row]], dict[str, Any]]) -> dict[str, Any]:
    """`score` over all rows, and per category when there is more than one."""
    report = {"all": score(rows)}
    categories = sorted({str(gold.get("category")) for gold, _ in rows if gold.get("category") is not None})
    if len(categories) > 1:
        report["categories"] = {c: score([r for r in rows if str(r[0].get("category")) == c]) for c in categories}
    return report


def _pope(rows: Sequence[Row]) -> dict[str, Any]:
    return _by_category(rows, lambda rs: scorers.pope_scores([a for _, a in rs], [_gold(g) for g, _ in rs]))


def _mme(rows: Sequence[Row]) -> dict[str, Any]:
    items = []
    for gold, answer in rows:
        if "category" not in gold:
            raise VLMError(f"question {gold['question_id']!r}: MME needs each question's `category` (its subtask)")
        image = str(gold.get("image", gold["question_id"]))
        items.append(scorers.MMEItem(str(gold["category"]), image, answer, _gold(gold)))
    return scorers.mme_scores(items)


def _accuracy(right: Callable[[dict[str, Any], str], bool]) -> Callable[[Sequence[Row]], dict[str, Any]]:
    def score(rows: Sequence[Row]) -> dict[str, Any]:
        return _by_category(rows, lambda rs: {"accuracy": _mean([a is not None and right(g, a) for g, a in rs]),
                                              "n": len(rs)})  # fmt: skip

    return score


def _vqa(rows: Sequence[Row]) -> dict[str, Any]:
    def one(rs: Sequence[Row]) -> dict[str, Any]:
        values = [0.0 if a is None else scorers.vqa_accuracy(a, _references(g)) for g, a in rs]
        return {"accuracy": _mean(values), "n": len(rs)}

    return _by_category(rows, one)


def _mean(values: Sequence[float | bool]) -> float:
    return sum(values) / len(values) if values else 0.0


METRICS: dict[str, Callable[[Sequence[Row]], dict[str, Any]]] = {
    "pope": _pope,
    "mme": _mme,
    "exact": _accuracy(lambda gold, answer: scorers.exact_match(answer, _gold(gold))),
    "vqa": _vqa,
    "choice": _accuracy(lambda gold, answer: scorers.choice_letter(answer, _options(gold)) == _gold(gold).strip()),
}
"""Metric name -> the function that scores (gold, answer) rows."""


def score_answers(metric: str, answers: dict[str, dict[str, Any]], gold: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Score answers (question key -> answer record) against gold records with `metric` (one of METRICS)."""
    if metric not in METRICS:
        raise VLMError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    rows: list[Row] = []
    missing = errors = 0
    for record in gold:
        answer = answers.get(question_key(record["question_id"]))
        if answer is None:
            missing += 1
            continue
        error = bool(answer.get("metadata", {}).get("error"))
        errors += error
        category = record.get("category", answer.get("metadata", {}).get("category"))
        rows.append(({**record, "category": category} if category is not None else record,
                     None if error else str(answer["text"])))  # fmt: skip
    if not rows:
        raise VLMError("no answer matches an annotated question_id: are these the answers to these questions?")
    return {"metric": metric, "answered": len(rows), "missing": missing, "errors": errors, **METRICS[metric](rows)}


def score_files(metric: str, answers_file: str | Path, annotation_files: Sequence[str | Path]) -> dict[str, Any]:
    """Score an answer file against annotation files (later files add questions; see the module docstring)."""
    gold: dict[str, dict[str, Any]] = {}
    for path in annotation_files:
        for record in read_jsonl(path, "annotation"):
            if "question_id" not in record:
                raise VLMError(f"{path}: an annotation without a question_id")
            gold.setdefault(question_key(record["question_id"]), record)
    answers = read_answers(answers_file)
    if not answers:
        raise VLMError(f"no answers in {answers_file}")
    return score_answers(metric, answers, list(gold.values()))
