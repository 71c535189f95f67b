"""The functions the miniature world's lmms-eval tasks call (see benchmarks.py): prompts, images, and scores.

Scores come from `vlm.evaluation.scoring`, the code `vlm eval score` runs, so lmms-eval's figures for a task and
`vlm eval score` on the same answers are the same rule applied twice. (lmms-eval's own POPE task differs from
LLaVA's rule: it takes only a bare "yes"/"no" and its yes ratio counts the gold labels.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlm.evaluation.files import question_key
from vlm.evaluation.lmms_eval_model import strict_images
from vlm.evaluation.scoring import score_answers
from vlm.processing.images import load_image

METRICS: dict[str, tuple[str, ...]] = {
    "pope": ("accuracy", "precision", "recall", "f1", "yes_ratio"),
    "mme": ("total",),
    "choice": ("accuracy",),
    "vqa": ("accuracy",),
}
"""Metric kind -> the figures its tasks report (lmms-eval's metric names are KIND_FIGURE)."""


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    return doc["text"]


def image_loader(image_folder: str) -> Callable[[dict[str, Any]], list[Any]]:
    """doc_to_visual for question files whose images are relative to `image_folder`."""

    def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
        strict_images()  # lmms-eval turns Pillow's truncated-image check off at import; vlm keeps it on
        return [load_image(Path(image_folder) / doc["image"])]

    return doc_to_visual


def _only(category: str) -> Callable[[Any], Any]:
    def keep(dataset: Any) -> Any:
        return dataset.filter(lambda doc: doc["category"] == category)

    return keep


only_random, only_popular, only_adversarial = _only("random"), _only("popular"), _only("adversarial")


def _item(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    return {"gold": {k: v for k, v in doc.items() if v is not None}, "text": results[0]}


def _score(kind: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    answers = {question_key(i["gold"]["question_id"]): {"question_id": i["gold"]["question_id"], "text": i["text"]}
               for i in items}  # fmt: skip
    return score_answers(kind, answers, [i["gold"] for i in items])


def _results(kind: str) -> Callable[[dict[str, Any], list[str]], dict[str, Any]]:
    def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
        item = _item(doc, results)
        return {f"{kind}_{name}": item for name in METRICS[kind]}

    return process_results


def _figure(kind: str, name: str) -> Callable[[list[dict[str, Any]]], float]:
    def aggregate(items: list[dict[str, Any]]) -> float:
        report = _score(kind, items)
        return report[name] if kind == "mme" else report["all"][name]

    return aggregate


pope_results, mme_results, choice_results, vqa_results = (_results(k) for k in ("pope", "mme", "choice", "vqa"))
pope_accuracy, pope_precision, pope_recall, pope_f1, pope_yes_ratio = (_figure("pope", n) for n in METRICS["pope"])
mme_total = _figure("mme", "total")
choice_accuracy = _figure("choice", "accuracy")
vqa_accuracy = _figure("vqa", "accuracy")
